"""The training state written next to the checkpoints, so that a rerun resumes where it stopped.

``ckpt/train_state.pt`` holds the model, optimizer and GradScaler states, the RNG states and the
data position, written atomically (temporary file + rename) after complete optimizer steps only,
so a kill at any moment leaves either the previous state or the new one. It loads with
``torch.load(weights_only=True)``: only tensors, numbers, strings, lists and dicts inside.
"""
from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from clipvip.errors import CheckpointError
from clipvip.model.weights import atomic_torch_save, unwrap_model

STATE_FILE = "train_state.pt"
FORMAT_VERSION = 1


@dataclass
class Progress:
    """Where training stands; everything needed besides the tensors to continue exactly."""

    step: int = 0  # optimizer steps done (epochs: TrainPlan.epochs_at(step); the data position is the stream's)
    best_r1: float = -1.0  # best validation text-to-video R@1 so far
    best_step: int = -1  # the step of model_best.pt: of equal R@1, the latest
    nonfinite_steps: int = 0  # steps skipped for a NaN/inf loss or gradient, in all
    scale_overflow_steps: int = 0  # fp16 steps skipped by the loss scaler (finite loss, inf gradient)
    skipped_samples: int = 0  # unreadable training samples replaced by others, in all

    @classmethod
    def from_dict(cls, values: dict) -> "Progress":
        # Unknown keys are dropped: states written before ``epoch`` / ``batch_in_epoch`` went away
        # (never updated, always 0; the stream's own state holds the data position) still load.
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def capture_rng() -> dict:
    numpy_state = np.random.get_state()
    state = {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(folder: str, model, optimizer, scaler, progress: Progress, fingerprint: dict,
                        data: dict) -> str:
    """Write ``folder/train_state.pt``; ``data`` is the position of the batch stream."""
    path = os.path.join(folder, STATE_FILE)
    atomic_torch_save({
        "format_version": FORMAT_VERSION,
        "progress": asdict(progress),
        "model": {k: v.detach().cpu() for k, v in unwrap_model(model).state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": capture_rng(),
        "fingerprint": fingerprint,
        "data": data,
    }, path)
    return path


def load_training_state(folder: str) -> dict | None:
    """The saved state of a run folder's ``ckpt/``, or None when there is none."""
    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read training state {path}: {e}; move it away to start afresh") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a training state of this version; move it away to start afresh")
    return state
