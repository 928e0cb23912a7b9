"""The training state written next to the checkpoints, so that a rerun resumes where it stopped.

``ckpt/train_state.pt`` holds the model, optimizer and GradScaler states, the RNG states and the
data position, written atomically (temporary file + rename) after complete optimizer steps only,
so a kill at any moment leaves either the previous state or the new one. It loads with
``torch.load(weights_only=True)``: only tensors, numbers, strings, lists and dicts inside.

A state resumes only the same run. Its numbers (:func:`run_fingerprint`: world size, batch,
accumulation, length, seed) and the config's other settings (:func:`resume_settings`) are saved
with it; on resume each changed setting is looked up in :data:`RESUME_RULES`: a setting that
changes the run's course from here on (learning rate, schedule, loss, data, frames, precision...)
is refused in one line naming it, since resuming would continue another run from the middle of
this one; one whose change is legitimate (workers, logging, validation cadence, the initial
weights a state replaces anyway) is logged in one line.
"""
from __future__ import annotations

import json
import os
import random
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

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
    best_results: dict = field(default_factory=dict)  # the validation of model_best.pt: {dataset: eval block}

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
                        data: dict, settings: Mapping | None = None) -> str:
    """Write ``folder/train_state.pt``; ``data`` is the position of the batch stream, ``settings``
    the run's :func:`resume_settings` (compared when it resumes)."""
    path = os.path.join(folder, STATE_FILE)
    atomic_torch_save({
        "format_version": FORMAT_VERSION,
        "progress": asdict(progress),
        "model": {k: v.detach().cpu() for k, v in unwrap_model(model).state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": capture_rng(),
        "fingerprint": fingerprint,
        **({"settings": dict(settings)} if settings is not None else {}),
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


REFUSE, LOG = "refuse", "log"
# What a resumed run may change, per setting: a config key, a sub-key (``loss_config``, a dataset
# entry's keys) or a number of the run's plan. A key without its own rule takes its parent's;
# one unknown to the table is refused. tests/test_run_folder.py checks that every config key is here.
RESUME_RULES: dict[str, str] = {
    # The run's numbers: the schedule, the data position and the random streams depend on them.
    "world_size": REFUSE, "train_batch_size": REFUSE, "gradient_accumulation_steps": REFUSE,
    "total_steps": REFUSE, "seed": REFUSE, "num_train_epochs": REFUSE, "max_n_example_per_group": REFUSE,
    # The optimisation: the learning rate and its schedule, the update, the loss, the precision.
    "learning_rate": REFUSE, "lr_mul": REFUSE, "lr_mul_prefix": REFUSE, "warmup_ratio": REFUSE, "decay": REFUSE,
    "optim": REFUSE, "betas": REFUSE, "weight_decay": REFUSE, "grad_norm": REFUSE, "loss_config": REFUSE,
    "accum_feature_cache": REFUSE, "fp16": REFUSE, "bf16": REFUSE,
    "freeze_text_encoder": REFUSE, "freeze_text_proj": REFUSE,
    # What a training example is: clips, frames, their size, captions, batch partners.
    "train_datasets": REFUSE, "train_n_clips": REFUSE, "train_num_frms": REFUSE, "sample_rate": REFUSE,
    "sample_jitter": REFUSE, "input_res": REFUSE, "resize_antialias": REFUSE, "max_txt_len": REFUSE,
    "train_pair_field": REFUSE, "dummy_data": REFUSE,
    # The model: its shape is checked on the weights themselves (another clip_config folder with
    # the same architecture is a moved folder); these change what the same weights compute.
    "clip_vision_additional_config": REFUSE, "attn_implementation": LOG, "clip_config": LOG,
    # Where the data lives may move (another mount point): same files, another path.
    **{f"train_datasets.{key}": LOG for key in ("txt", "vis", "vid_cap_path", "shards", "shard_index",
                                                "img_dir", "cap_path", "img_source", "img_ratio")},
    # Used to build a fresh run only: a resumed run takes its weights from the state.
    "e2e_weights_path": LOG, "clip_weights": LOG, "clip_vision_additional_config.logit_scale_init_value": LOG,
    "clip_vision_additional_config.temporal_init_std": LOG,
    # The same computation, done otherwise (equal results up to rounding) or read otherwise.
    "gradient_checkpointing": LOG, "compile": LOG, "compile_mode": LOG, "compile_backend": LOG, "fast_paths": LOG,
    "frozen_text_cache": LOG, "cache_clips": LOG,
    "video_backend": LOG, "video_res": LOG, "n_workers": LOG, "pin_mem": LOG, "prefetch_to_device": LOG,
    "persistent_workers": LOG, "prefetch_factor": LOG,
    "nonfinite_check": LOG, "max_nonfinite_steps": LOG,
    # Validation (which steps are scored, on what) and what the run writes: the weights' course stays.
    "val_datasets": LOG, "inference_datasets": LOG, "test_n_clips": LOG, "test_num_frms": LOG,
    "test_batch_size": LOG, "min_valid_steps": LOG, "num_valid": LOG, "only_valid_steps": LOG,
    "save_steps_ratio": LOG, "log_interval": LOG, "if_tb_log": LOG, "if_model_saver": LOG, "save_hf": LOG,
    "if_log2file": LOG, "wandb_project": LOG,
}
# Config keys not compared: they name the run rather than set it, or are read nowhere.
NOT_COMPARED = frozenset({"config", "comment", "blob_mount_dir", "output_dir", "is_train", "amp_level"})


def _plain(value: Any) -> Any:
    """A config value as plain JSON types (a saved state holds no custom classes: weights_only)."""
    return json.loads(json.dumps(value))


def _flatten(key: str, value: Any, into: dict) -> None:
    """``{"a": {"b": 1}}`` -> ``a.b``; a list of dicts (datasets) -> ``a[count]`` and ``a[0].b``...;
    other values stay whole."""
    if isinstance(value, dict):
        for sub, item in value.items():
            _flatten(f"{key}.{sub}", item, into)
    elif isinstance(value, list) and all(isinstance(item, dict) for item in value):
        into[f"{key}[count]"] = len(value)
        for i, item in enumerate(value):
            _flatten(f"{key}[{i}]", item, into)
    else:
        into[key] = value


def resume_settings(cfg: Mapping) -> dict:
    """The config's settings a saved state records, flattened (``loss_config.loss_name``,
    ``train_datasets[0].vis``); the numbers of :func:`run_fingerprint` are not repeated."""
    flat: dict = {}
    for key, value in cfg.items():
        if key not in NOT_COMPARED and key not in ("train_batch_size", "gradient_accumulation_steps", "seed"):
            _flatten(key, _plain(value), flat)
    return flat


def resume_rule(key: str) -> str:
    """The rule of a flattened key: its own, else its nearest parent's, else :data:`REFUSE`."""
    name = re.sub(r"\[[^\]]*\]", "", key)  # train_datasets[0].vis -> train_datasets.vis
    while name:
        if name in RESUME_RULES:
            return RESUME_RULES[name]
        name = name.rpartition(".")[0]
    return REFUSE


def _changes(saved: Mapping, current: Mapping) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, current value)`` of every key both hold with different values."""
    return [(k, saved[k], v) for k, v in current.items() if k in saved and saved[k] != v]


def _describe(changes: list[tuple[str, Any, Any]], limit: int = 6) -> str:
    text = "; ".join(f"{k}: saved {a!r}, now {b!r}" if isinstance(a, str) or isinstance(b, str)
                     else f"{k}: saved {a}, now {b}" for k, a, b in changes[:limit])
    return text + (f"; and {len(changes) - limit} more" if len(changes) > limit else "")


def check_fingerprint(saved: dict, current: dict, folder: str, saved_settings: Mapping | None = None,
                      settings: Mapping | None = None) -> None:
    """Refuse to resume a state of ``folder`` written with settings whose change is refused
    (:data:`RESUME_RULES`), naming each with both values, in one line; log the allowed changes in
    one line. ``saved``/``current``: the runs' :func:`run_fingerprint`; ``saved_settings`` /
    ``settings``: their :func:`resume_settings` (None: a state written before they were saved).
    A setting only one side records (a version with other keys) is not compared: the line says so."""
    changes = _changes(saved, current)
    unrecorded: list[str] = []
    if saved_settings is not None and settings is not None:
        changes += _changes(saved_settings, settings)
        # A dataset's keys come and go with the dataset: its list's [count] is compared instead.
        unrecorded = sorted(k for k in set(saved_settings) ^ set(settings) if not re.search(r"\[\d+\]", k))
    refused = [c for c in changes if resume_rule(c[0]) == REFUSE]
    if refused:
        raise CheckpointError(
            f"{folder}/{STATE_FILE} was written by a run with other settings ({_describe(refused)}): "
            "resuming would continue another run from the middle of this one. Rerun with the saved values "
            f"to resume; to start a fresh run, use another --output_dir (or move {folder} away), and "
            f"--e2e_weights_path {folder}/model_best.pt to start from its weights")
    if changes:
        LOGGER.info("resuming with changed settings that leave the run's course alone: %s", _describe(changes))
    if settings is not None and saved_settings is None:
        LOGGER.info("%s/%s records no settings besides world size, batch, accumulation, length and seed (an "
                    "older version wrote it): the others were not compared", folder, STATE_FILE)
    elif unrecorded:
        LOGGER.info("settings not compared with %s/%s (the version that wrote it had other keys): %s", folder,
                    STATE_FILE, ", ".join(unrecorded[:6]) + (f" and {len(unrecorded) - 6} more"
                                                            if len(unrecorded) > 6 else ""))


def _check_shapes(saved: Mapping, model, folder: str) -> None:
    """The saved weights must fit the model built now: a changed architecture is refused, not loaded."""
    own = model.state_dict()
    differs = [f"{k}: saved {tuple(saved[k].shape)}, now {tuple(own[k].shape)}" for k in own
               if k in saved and tuple(saved[k].shape) != tuple(own[k].shape)]
    missing, extra = [k for k in own if k not in saved], [k for k in saved if k not in own]
    if differs or missing or extra:
        details = differs[:3] + [f"{len(missing)} tensors missing"] * bool(missing) + \
            [f"{len(extra)} unexpected"] * bool(extra)
        raise CheckpointError(
            f"{folder}/{STATE_FILE} holds a model of another shape ({'; '.join(details)}): the architecture "
            "(clip_config, clip_vision_additional_config) changed. Rerun with the saved one to resume, or start "
            "a fresh run with another --output_dir")


def resume_training(folder: str, fingerprint: dict, model, optimizer, scaler, stream,
                    settings: Mapping | None = None) -> Progress | None:
    """Load ``folder/train_state.pt`` into the run's parts (weights, optimizer, loss scale, RNGs,
    data position) and return its progress; None, touching nothing, when there is no state.
    ``settings``: this run's :func:`resume_settings`, compared with the saved run's."""
    state = load_training_state(folder)
    if state is None:
        return None
    check_fingerprint(state["fingerprint"], fingerprint, folder, state.get("settings"), settings)
    _check_shapes(state["model"], unwrap_model(model), folder)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    restore_rng(state["rng"])
    stream.load_state_dict(state["data"])
    progress = Progress.from_dict(state["progress"])
    LOGGER.info("resumed from %s/%s at step %d", folder, STATE_FILE, progress.step)
    return progress
