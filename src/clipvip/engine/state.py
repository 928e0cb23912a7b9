"""The training state written next to the checkpoints, so that a rerun resumes where it stopped.

``ckpt/train_state.pt`` holds the model, optimizer and GradScaler states, the RNG states and the
data position, written atomically (temporary file + rename) after complete optimizer steps only,
so a kill at any moment leaves either the previous state or the new one. It loads with
``torch.load(weights_only=True)``: only tensors, numbers, strings, lists and dicts inside.

A state resumes only a run with the same numbers (:func:`run_fingerprint`): another world size,
batch, accumulation, length or seed would continue a different run from the middle.
"""
from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from clipvip.engine.schedule import TrainPlan
from clipvip.errors import CheckpointError
from clipvip.logging_utils import get_logger
from clipvip.model.weights import atomic_torch_save, unwrap_model

LOGGER = get_logger("train")

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


def run_fingerprint(plan: TrainPlan, seed: int) -> dict:
    """The numbers a saved state must share with the run that resumes it."""
    return {"world_size": plan.world_size, "train_batch_size": plan.per_device_batch,
            "gradient_accumulation_steps": plan.accumulation, "total_steps": plan.total_steps, "seed": int(seed)}


def check_fingerprint(saved: dict, current: dict, folder: str) -> None:
    """Refuse to resume a state of ``folder`` written with other numbers, naming each of them."""
    differs = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if differs:
        details = ", ".join(f"{k}: saved {a}, now {b}" for k, (a, b) in differs.items())
        raise CheckpointError(
            f"{folder}/{STATE_FILE} was written by a run with other settings ({details}); "
            "use another output_dir, or start from its weights with --e2e_weights_path")


def resume_training(folder: str, fingerprint: dict, model, optimizer, scaler, stream) -> Progress | None:
    """Load ``folder/train_state.pt`` into the run's parts (weights, optimizer, loss scale, RNGs,
    data position) and return its progress; None, touching nothing, when there is no state."""
    state = load_training_state(folder)
    if state is None:
        return None
    check_fingerprint(state["fingerprint"], fingerprint, folder)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    restore_rng(state["rng"])
    stream.load_state_dict(state["data"])
    progress = Progress.from_dict(state["progress"])
    LOGGER.info("resumed from %s/%s at step %d", folder, STATE_FILE, progress.step)
    return progress
