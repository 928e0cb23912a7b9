"""Where the weights a config or a command line names are: a file, a folder, a Hub id, the HF cache.

A weights reference is the value of ``e2e_weights_path``, ``clip_weights``, ``clip_config`` or
``--weights``:

- a file (``.pt``, ``.bin``, ``.safetensors``): itself;
- a folder written by ``clipvip convert`` / ``save_pretrained`` (``config.json`` of ``model_type``
  clipvip and ``model.safetensors``): that weights file, which holds the released ``clipmodel.*``
  layout;
- a Hugging Face CLIP folder (``model.safetensors`` or ``pytorch_model.bin``): its weights file;
- a Hub id ``owner/name``: its snapshot in the local HF cache (downloaded when online). Offline
  (``HF_HUB_OFFLINE=1``) an id downloaded before resolves to the cached snapshot; one that was not
  is a one-line :class:`ClipvipError` naming the download command.

It sits below the model: :mod:`clipvip.model` loads weights through it, and :mod:`clipvip.hf` (the
Hugging Face classes, above the model) imports it for ``from_pretrained``. It knows file names and
the Hub's cache (``huggingface_hub``), never transformers' model classes.
"""
from __future__ import annotations

import json
import os
import re

from huggingface_hub import snapshot_download, try_to_load_from_cache

from clipvip.errors import CheckpointError, ClipvipError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"  # of a converted CLIP-ViP folder
MODEL_TYPE = "clipvip"  # config.json's model_type of a converted folder (CLIPViPConfig.model_type)
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # of a HF CLIP folder, in order of preference
# owner/name: one slash, no leading dot or slash (a path like runs/b32/ckpt.pt has more than one).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def download_command(repo_id: str, local_dir: str | None = None) -> str:
    """How to download a Hub repo where there is network, for error messages (both CLIs' names)."""
    to = f" --local-dir {local_dir}" if local_dir else ""
    return f"`hf download {repo_id}{to}` (older huggingface_hub: `huggingface-cli download {repo_id}{to}`)"


def is_hub_id(name: str) -> bool:
    """``name`` names no local path and is shaped like a Hub id (``owner/name``)."""
    return not os.path.exists(name) and bool(HUB_ID.match(name))


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
            f"{download_command(name_or_path)} and run again, or pass the downloaded folder") from None


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


def hub_cached_folder(name: str, filename: str) -> str | None:
    """The local HF cache folder holding ``filename`` of repo ``name``, if it was downloaded before."""
    try:
        found = try_to_load_from_cache(name, filename)
    except Exception:  # not a valid repo id
        return None
    return os.path.dirname(found) if isinstance(found, str) else None


def hf_weights_file(folder: str) -> str:
    """The weights file of a Hugging Face CLIP folder."""
    for name in HF_WEIGHT_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise CheckpointError(f"no {' or '.join(HF_WEIGHT_FILES)} in {folder}")


def resolve_pretrained_path(name_or_path: str, kind: str) -> str:
    """A local folder or file with weights for ``name_or_path`` (``kind``: the option it came
    from, named in the error): as given, or the HF cache's copy of a model name."""
    if os.path.exists(name_or_path):
        return name_or_path
    for filename in HF_WEIGHT_FILES:
        folder = hub_cached_folder(name_or_path, filename)
        if folder:
            return folder
    raise CheckpointError(
        f"{kind} '{name_or_path}' is not a local folder or file and is not in the Hugging Face cache; "
        f"download it where there is network ({download_command(name_or_path, 'DIR')}) "
        f"and pass --{kind} DIR, or pass --{kind} none for random weights (docs/first-run.md)"
    )
