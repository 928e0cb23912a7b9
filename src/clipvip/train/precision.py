"""One precision helper: an autocast context and a GradScaler only where fp16 needs one.

``fp16: 1`` replaces the original's apex O2: fp16 autocast with dynamic loss scaling, the master
weights staying fp32. ``bf16: 1`` is bf16 autocast (no scaler: bf16 has fp32's range).
"""
from __future__ import annotations

import contextlib

import torch

from ..logging_utils import get_logger

LOGGER = get_logger("precision")
PRECISIONS = ("fp32", "fp16", "bf16")


def precision_from_config(cfg, device_type: str) -> str:
    """fp32 | fp16 | bf16 from the config's ``fp16`` / ``bf16`` switches and the device."""
    if cfg.get("bf16"):
        return "bf16"
    if cfg.get("fp16"):
        if device_type != "cuda":
            # fp16 matmuls on a CPU are emulated and slow; the official configs all say fp16.
            LOGGER.warning("fp16 was asked for on %s: training in fp32 (use --bf16 1 for mixed precision)",
                           device_type)
            return "fp32"
        return "fp16"
    return "fp32"


def autocast(precision: str, device_type: str):
    """The context under which forward passes (and the loss) run."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return torch.autocast(device_type=device_type, dtype=dtype)


def grad_scaler(precision: str, device_type: str) -> torch.amp.GradScaler:
    """A GradScaler that is active for fp16 only (a no-op pass-through otherwise)."""
    return torch.amp.GradScaler(device_type, enabled=precision == "fp16")
