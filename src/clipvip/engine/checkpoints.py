"""The model files of a run folder's ``ckpt/`` and the step each one holds.

``model_step_N.pt`` says its step in its name. ``model_best.pt`` is replaced whenever a validation
beats the best so far, so its step is written beside it in ``model_best.json``
(``{"checkpoint": "model_best.pt", "step": N, "t2v_R1": R}``): an evaluation of the file, its
Hugging Face conversion and the model card can then say which step of the run they describe.
The released ``.pt`` layout (a plain dict of tensors) has no room for it, and a training state
(``train_state.pt``, the size of the model and its optimizer) is too large to open for one number.

The note is written just after the model file. A crash between the two leaves the previous
step's note beside the new weights until the run is resumed, which repeats that validation and
writes both again.
"""
from __future__ import annotations

import json
import os
import re

from clipvip.files import atomic_write_json

BEST_MODEL = "model_best.pt"
STEP_FILE = re.compile(r"model_step_(\d+)\.pt")


def step_checkpoint(step: int) -> str:
    """The file name of the checkpoint saved at ``step``."""
    return f"model_step_{step}.pt"


def info_path(checkpoint: str) -> str:
    """The note beside a checkpoint file: ``ckpt/model_best.pt`` -> ``ckpt/model_best.json``."""
    return os.path.splitext(checkpoint)[0] + ".json"


def write_checkpoint_info(checkpoint: str, step: int, **extra) -> str:
    """Record beside ``checkpoint`` the training step its weights are from (and ``extra`` facts)."""
    path = info_path(checkpoint)
    atomic_write_json(path, {"checkpoint": os.path.basename(checkpoint), "step": int(step), **extra}, indent=2)
    return path


def checkpoint_step(checkpoint: str | None) -> int | None:
    """The training step of a checkpoint file, or None where nothing says it (a released
    checkpoint, a folder, a Hub id, a copy made without its note)."""
    if not checkpoint:
        return None
    match = STEP_FILE.fullmatch(os.path.basename(checkpoint))
    if match:
        return int(match.group(1))
    if not os.path.isfile(checkpoint):
        return None
    try:
        with open(info_path(checkpoint), encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    # The note must be this file's: a note beside another name (a renamed copy) says nothing.
    if not isinstance(info, dict) or info.get("checkpoint") != os.path.basename(checkpoint):
        return None
    step = info.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None
