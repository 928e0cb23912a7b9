"""The Hub side of the Hugging Face classes: ``from_pretrained``'s options, uploading a folder.

Where a converted model is (a local folder, a Hub id through the HF cache) is resolved below the
model, in :mod:`clipvip.weights_ref`, which the model's loaders use too.
"""
from __future__ import annotations

from huggingface_hub import HfApi

from clipvip.errors import ClipvipError
from clipvip.weights_ref import is_converted_folder

# from_pretrained options that say where the files come from (the rest go to transformers).
HUB_OPTIONS = ("cache_dir", "revision", "token", "local_files_only", "force_download")


def hub_options_in(kwargs: dict) -> dict:
    """The ``from_pretrained`` options of ``kwargs`` that say where the files come from, removed from it."""
    return {key: kwargs.pop(key) for key in HUB_OPTIONS if key in kwargs}


def push_folder(folder: str, repo_id: str, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload CLIP-ViP model") -> str:
    """Upload a converted folder as it is (model card included) to ``repo_id``; its URL."""
    if not is_converted_folder(folder):
        raise ClipvipError(f"{folder} is not a converted CLIP-ViP folder (clipvip convert --out DIR)")
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=folder, repo_id=repo.repo_id, commit_message=commit_message)
    return str(getattr(commit, "commit_url", commit))
