"""Where a converted model is: a local folder, or a Hugging Face Hub id read through the HF cache.

Offline (``HF_HUB_OFFLINE=1``) a Hub id that was downloaded before resolves to its cached
snapshot; one that was not is a one-line :class:`ClipvipError` naming the download command.
"""
from __future__ import annotations

import json
import os
import re
from huggingface_hub import HfApi, snapshot_download

from clipvip.errors import CheckpointError, ClipvipError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_TYPE = "clipvip"
# from_pretrained options that say where the files come from (the rest go to transformers).
HUB_OPTIONS = ("cache_dir", "revision", "token", "local_files_only", "force_download")
# owner/name: one slash, no leading dot or slash (a path like runs/b32/ckpt.pt has more than one).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def download_command(repo_id: str) -> str:
    return f"hf download {repo_id}"


def hub_options_in(kwargs: dict) -> dict:
    """The ``from_pretrained`` options of ``kwargs`` that say where the files come from, removed from it."""
    return {key: kwargs.pop(key) for key in HUB_OPTIONS if key in kwargs}


def resolve_folder(name_or_path: str, cache_dir: str | None = None, revision: str | None = None,
                   token: str | bool | None = None, local_files_only: bool = False,
                   force_download: bool = False) -> str:
    """A local folder with the files of ``name_or_path``: the folder itself, or the Hub snapshot
    (downloaded if online and missing, from the cache otherwise)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path):
        raise ClipvipError(f"{name_or_path} is a file; a converted CLIP-ViP model is a folder "
                           f"(config.json, {WEIGHTS_FILE}, ...) or a Hub id owner/name")
    try:
        return snapshot_download(name_or_path, cache_dir=cache_dir, revision=revision, token=token,
                                 local_files_only=local_files_only, force_download=force_download)
    # Offline and not cached, no such repo or revision, no network (OSError); not a repo id (ValueError).
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClipvipError(
            f"'{name_or_path}' is not a local file or folder, and as a Hub id it cannot be had from the Hugging "
            f"Face Hub or its local cache ({type(e).__name__}: {reason}); download it where there is network with "
            f"`{download_command(name_or_path)}` (older huggingface_hub: `huggingface-cli download "
            f"{name_or_path}`) and run again, or pass the downloaded folder") from None


def is_hub_id(name: str) -> bool:
    """``name`` names no local path and is shaped like a Hub id (``owner/name``)."""
    return not os.path.exists(name) and bool(HUB_ID.match(name))


def checkpoint_file(path: str) -> str:
    """The weights file behind a checkpoint argument (``--e2e_weights_path``, ``--weights``):
    ``path`` itself, or the ``model.safetensors`` of a converted folder or of a Hub id (its
    snapshot in the HF cache; downloaded when online). Those hold the released ``clipmodel.*``
    layout, so they load as any checkpoint does."""
    if os.path.isdir(path) and is_converted_folder(path):
        return os.path.join(path, WEIGHTS_FILE)
    if is_hub_id(path):
        folder = resolve_folder(path)
        if not is_converted_folder(folder):
            raise CheckpointError(f"Hub model '{path}' is not a converted CLIP-ViP model (config.json of "
                                  f"model_type {MODEL_TYPE} and {WEIGHTS_FILE}; clipvip convert writes one)")
        return os.path.join(folder, WEIGHTS_FILE)
    return path


def is_converted_folder(path: str) -> bool:
    """``path`` is a folder written by ``clipvip convert`` / ``save_pretrained`` (config.json of
    ``model_type`` clipvip, and the safetensors weights)."""
    config = os.path.join(path, CONFIG_FILE)
    if not (os.path.isfile(config) and os.path.isfile(os.path.join(path, WEIGHTS_FILE))):
        return False
    try:
        with open(config, encoding="utf-8") as f:
            return json.load(f).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def push_folder(folder: str, repo_id: str, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload CLIP-ViP model") -> str:
    """Upload a converted folder as it is (model card included) to ``repo_id``; its URL."""
    if not is_converted_folder(folder):
        raise ClipvipError(f"{folder} is not a converted CLIP-ViP folder (clipvip convert --out DIR)")
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=folder, repo_id=repo.repo_id, commit_message=commit_message)
    return str(getattr(commit, "commit_url", commit))
