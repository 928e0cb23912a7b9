"""One precision helper: an autocast context and a GradScaler only where fp16 needs one.

``fp16: 1`` replaces the original's apex O2: fp16 autocast with dynamic loss scaling, the master
weights staying fp32. ``bf16: 1`` is bf16 autocast (no scaler: bf16 has fp32's range). What
remains of O2's speed, a half-precision model, comes from the fast paths: the weights of their
matmuls cast once per optimizer step (:func:`clipvip.model.fast_paths.weight_copies`, opened by
the training step and by evaluation with :func:`autocast_dtype`), not at every use.
"""
from __future__ import annotations

import contextlib

import torch

from clipvip.config import Config
from clipvip.logging_utils import get_logger

LOGGER = get_logger("precision")
PRECISIONS = ("fp32", "fp16", "bf16")
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def precision_from_config(cfg: Config, device_type: str, purpose: str = "inference") -> str:
    """fp32 | fp16 | bf16 from the config's ``fp16`` / ``bf16`` switches and the device (:func:`resolve_precision`)."""
    return resolve_precision(bool(cfg.fp16), bool(cfg.bf16), device_type, purpose)


def resolve_precision(fp16: bool, bf16: bool, device_type: str, purpose: str = "inference") -> str:
    """fp32 | fp16 | bf16 from the two switches and the device.

    ``fp16`` is CUDA-only here (fp16 matmuls on a CPU are emulated and slow), so elsewhere it
    falls back to fp32. The official configs all say ``fp16: 1``, and the search apps read the
    config of every index, so only ``purpose="training"`` warns about it (mixed precision
    training asked for and not given); inference (encoding, evaluation, search) just runs in fp32
    and says so at DEBUG level.
    """
    if bf16:
        return "bf16"
    if fp16:
        if device_type != "cuda":
            if purpose == "training":
                LOGGER.warning("fp16 was asked for on %s: training in fp32 (use --bf16 1 for mixed precision)",
                               device_type)
            else:
                LOGGER.debug("fp16 is for CUDA: %s in fp32 on %s", purpose, device_type)
            return "fp32"
        return "fp16"
    return "fp32"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``precision``; None for fp32 (no autocast)."""
    return AUTOCAST_DTYPES.get(precision)


def autocast(precision: str, device_type: str):
    """The context under which forward passes (and the loss) run."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=AUTOCAST_DTYPES[precision])


def grad_scaler(precision: str, device_type: str) -> torch.amp.GradScaler:
    """A GradScaler that is active for fp16 only (a no-op pass-through otherwise)."""
    return torch.amp.GradScaler(device_type, enabled=precision == "fp16")
