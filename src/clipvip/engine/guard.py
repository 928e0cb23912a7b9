"""The end of an optimizer step: apply it only when its loss and gradient are finite, and count.

A step whose loss or gradient norm is NaN/inf changes no weight and is counted; the loop stops
after ``max_nonfinite_steps`` of them in a row. An fp16 loss-scale overflow (finite loss, inf
gradient) is GradScaler's business: skipped, the scale lowered, counted apart. Where the decision
is taken is the config's ``nonfinite_check``:

- ``step``: on the host. Loss and gradient norm are read every step (the step's one host-device
  sync) and Python decides: each skipped step is known at once (a warning per step, the loss in
  the progress bar, the stop exactly at the ``max_nonfinite_steps``-th step in a row).
- ``deferred``: on the device. A fused Adam/AdamW skips its update inside the kernel when handed
  ``found_inf`` (the hook GradScaler drives), and the counts stay in device tensors until the loop
  reads them at its sync points (logging, validation and state steps): a deferred step hands back
  a :class:`PendingUpdate`, whose ``read()`` is that one host sync. Nothing in the step waits for the device, so the host queues the next step's kernels
  while the GPU still runs this one. A streak of non-finite steps is seen at the next sync point
  (up to ``log_interval`` steps late); the steps in between changed no weight.
- ``auto`` (default): ``deferred`` on CUDA with a fused optimizer, ``step`` elsewhere (on a CPU
  the sync costs nothing).

Both give the same weights: a finite step is the same optimizer call, a non-finite one none.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from clipvip.errors import ConfigError
from clipvip.logging_utils import get_logger

LOGGER = get_logger("train")
NONFINITE_CHECKS = ("auto", "step", "deferred")


@dataclass(frozen=True)
class UpdateReport:
    """What happened to the steps since the last report (one step in ``step`` mode)."""

    loss: float  # of the last step
    grad_norm: float  # of the last step, before clipping
    finite: bool  # whether the last step had a finite loss and gradient
    nonfinite: int  # non-finite steps skipped and counted
    overflows: int  # fp16 loss-scale overflows skipped (not counted as non-finite)
    in_a_row: int  # counted non-finite steps in a row, ending at the last step
    longest_in_a_row: int  # the longest such run among these steps (it may have ended since)


@dataclass(frozen=True)
class PendingUpdate:
    """A deferred step's outcome: decided on the device, not yet seen by the host.

    ``applied`` is the device's decision for this step (a bool tensor; reading it is a sync).
    :meth:`read` reads the counts of every step since the guard's last read (this one included),
    the one host sync the deferred check makes; None when a later read already took them.
    """

    applied: torch.Tensor  # [] bool, on the device
    guard: "GuardedUpdate"

    def read(self) -> Optional[UpdateReport]:
        return self.guard.read()


def supports_device_skip(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` honours ``optimizer.found_inf`` (fused Adam/AdamW do)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and bool(optimizer.defaults.get("fused"))


def resolve_nonfinite_check(mode: str, device_type: str, optimizer: torch.optim.Optimizer) -> str:
    """``step`` or ``deferred`` for the config value ``mode`` on this device and optimizer."""
    if mode not in NONFINITE_CHECKS:
        raise ConfigError(f"nonfinite_check '{mode}': expected one of {', '.join(NONFINITE_CHECKS)}")
    can_defer = supports_device_skip(optimizer)
    if mode == "auto":
        return "deferred" if device_type == "cuda" and can_defer else "step"
    if mode == "deferred" and not can_defer:
        LOGGER.warning("nonfinite_check deferred needs a fused Adam/AdamW (%s is not): checking on the host "
                       "every step instead", type(optimizer).__name__)
        return "step"
    return mode


class GuardedUpdate:
    """``optimizer`` (+ ``scaler``) step that skips non-finite steps, decided on host or device.

    Call it after ``scaler.unscale_(optimizer)`` and gradient clipping, with the step's loss and
    the gradient norm clipping returned. It steps the optimizer (or not) and updates the scaler;
    zeroing the gradients is the caller's. ``step`` mode returns the step's report; ``deferred``
    a :class:`PendingUpdate`, whose ``read()`` returns the report of all steps since the last read.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, precision: str,
                 mode: str = "step"):
        if mode not in ("step", "deferred"):
            raise ValueError(f"mode must be 'step' or 'deferred' (see resolve_nonfinite_check), got {mode!r}")
        if mode == "deferred" and not supports_device_skip(optimizer):
            raise ValueError(f"deferred needs a fused optimizer (it honours found_inf); got {type(optimizer).__name__}")
        self.optimizer, self.scaler, self.precision = optimizer, scaler, precision
        self.deferred = mode == "deferred"
        self.in_a_row = 0  # step mode's streak; deferred keeps it on the device
        # deferred: int64 [4] = (non-finite, overflows, in a row, longest in a row) since the last
        # read, and float32 [2] = (loss, gradient norm) of the last step; None before a step.
        self._counts: Optional[torch.Tensor] = None
        self._last: Optional[torch.Tensor] = None

    def __call__(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> UpdateReport | PendingUpdate:
        loss, grad_norm = loss.detach().float(), grad_norm.detach().float().to(loss.device)
        return self._on_device(loss, grad_norm) if self.deferred else self._on_host(loss, grad_norm)

    def _on_host(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> UpdateReport:
        loss_value, norm_value = torch.stack([loss, grad_norm]).tolist()  # the step's one sync
        finite = math.isfinite(loss_value) and math.isfinite(norm_value)
        overflow = not finite and math.isfinite(loss_value) and self.precision == "fp16"
        if finite:
            self.scaler.step(self.optimizer)
            self.in_a_row = 0
        elif not overflow:
            self.in_a_row += 1
        self.scaler.update()  # after an overflow: lowers the scale (from what unscale_ found)
        counted = int(not finite and not overflow)
        return UpdateReport(loss_value, norm_value, finite, counted, int(overflow), self.in_a_row, self.in_a_row)

    def _on_device(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> PendingUpdate:
        loss_ok, norm_ok = torch.isfinite(loss), torch.isfinite(grad_norm)
        applied = loss_ok & norm_ok
        overflow = loss_ok & ~norm_ok if self.precision == "fp16" else torch.zeros_like(applied)
        counted = (~applied & ~overflow).long()
        # The fused kernel skips the whole update (moments and step count included) when found_inf
        # is nonzero, on the device. unscale_ already ran, so no grad_scale goes with it.
        self.optimizer.found_inf = (~applied).float()
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf
        self.scaler.update()  # fp16: lowers the scale where unscale_ found inf/NaN, without a sync
        counts = self._counts if self._counts is not None else torch.zeros(4, dtype=torch.long, device=loss.device)
        # applied: 0; overflow: unchanged (counted is 0); counted: one more.
        in_a_row = torch.where(applied, torch.zeros_like(counts[2]), counts[2] + counted)
        self._counts = torch.stack([counts[0] + counted, counts[1] + overflow.long(), in_a_row,
                                    torch.maximum(counts[3], in_a_row)])
        self._last = torch.stack([loss, grad_norm])
        return PendingUpdate(applied, self)

    def read(self) -> Optional[UpdateReport]:
        """Deferred: the report of the steps since the last read (one host sync); None if none ran."""
        if not self.deferred or self._last is None:
            return None
        values = torch.cat([self._last.double(), self._counts.double()]).tolist()
        loss_value, norm_value = values[0], values[1]
        nonfinite, overflows, in_a_row, longest = (int(v) for v in values[2:])
        self.in_a_row = in_a_row
        self._counts = torch.tensor([0, 0, in_a_row, in_a_row], dtype=torch.long, device=self._counts.device)
        self._last = None
        return UpdateReport(loss_value, norm_value, math.isfinite(loss_value) and math.isfinite(norm_value),
                            nonfinite, overflows, in_a_row, longest)
