"""One optimizer step, as training runs it and as ``clipvip bench`` times it (DESIGN §4).

1. set the learning rate of the step (warmup + cosine/linear; ``lr_mul`` groups);
2. run the micro-batches of the step: the frames of each made model input on the device
   (:class:`~clipvip.data.transforms.VideoTransform`; they arrive as uint8), forward under
   autocast, the loss on features gathered from every process, backward (DDP synchronises on
   the last micro-batch only). With ``accum_feature_cache`` the micro-batches are first encoded
   without gradient and each is then recomputed with gradient against the cached features of the
   others, so every loss sees the whole accumulated batch of negatives (open_clip's scheme);
3. average the gradients over processes where no DDP does it (horovod), unscale (fp16), clip at
   ``grad_norm``, and step the optimizer only if loss and gradient are finite
   (:mod:`clipvip.engine.guard`: decided on the host, or on the device and read later);
4. clamp ``logit_scale`` to ``[0, ln 200]``.

The step knows nothing of the run around it (schedule of validation, logging, saving): it is
handed its step number and its micro-batches and returns a :class:`StepResult`.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from clipvip.data.loader import FRAME_INPUTS, MODEL_INPUTS, to_device
from clipvip.data.transforms import VideoTransform
from clipvip.engine.guard import GuardedUpdate, PendingUpdate, UpdateReport, resolve_nonfinite_check
from clipvip.engine.optim import OptimizerSettings, build_optimizer, learning_rate_at, set_learning_rate
from clipvip.loss import ContrastiveLoss, LossOutput
from clipvip.precision import autocast, grad_scaler


@dataclass(frozen=True)
class StepSettings:
    """What the config says about the step itself."""

    grad_norm: float  # clip the gradient norm at this; <= 0: no clipping
    accum_feature_cache: bool  # with accumulation: every micro-batch's loss sees the whole step's batch
    freeze_text_encoder: bool  # the text tower gets no gradient and stays in eval mode
    freeze_text_proj: bool  # with freeze_text_encoder: text_projection too
    frozen_text_cache: int  # with freeze_text_encoder: remember the tower's output for this many captions
    nonfinite_check: str  # auto | step | deferred (clipvip.engine.guard)
    transform: VideoTransform = VideoTransform()  # the batches' uint8 frames -> model input, on the device

    @classmethod
    def from_config(cls, cfg) -> "StepSettings":
        return cls(grad_norm=float(cfg.grad_norm or 0), accum_feature_cache=bool(cfg.accum_feature_cache),
                   freeze_text_encoder=bool(cfg.freeze_text_encoder), freeze_text_proj=bool(cfg.freeze_text_proj),
                   frozen_text_cache=int(cfg.frozen_text_cache or 0), nonfinite_check=str(cfg.nonfinite_check),
                   transform=VideoTransform.from_config(cfg))


def train_mode(model: nn.Module, settings: StepSettings) -> None:
    """``model.train()``, the text tower frozen (no gradient, eval mode) when the settings say so.

    The one place that freezes it: before the optimizer and DDP see the parameters, and again
    whenever the model returns to training after a validation (``train()`` would put the frozen
    tower back in train mode).
    """
    model.train()
    if settings.freeze_text_encoder:
        model.freeze_text_encoder(settings.freeze_text_proj, settings.frozen_text_cache)


def model_inputs(batch: dict, device: torch.device, transform: VideoTransform) -> dict:
    """The model's arguments out of a batch dict, on ``device``: its frames (uint8 ``video``
    [B, T, H, W, 3], ``image`` [B, H, W, 3]) made model input there by ``transform``."""
    inputs = {k: to_device(batch[k], device) for k in MODEL_INPUTS if batch.get(k) is not None}
    for key in FRAME_INPUTS:
        if key in inputs:
            inputs[key] = transform(inputs[key])  # (B, T, 3, h, w) / (B, 3, h, w) float
    return inputs


def float_features(outputs: dict) -> dict:
    # The loss runs in fp32 whatever the autocast dtype of the towers.
    return {k: v.float() for k, v in outputs.items()}


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step did. Tensors stay on the device: reading them is a host sync."""

    step: int  # 1-based number of this optimizer step
    lr: float  # the scheduled learning rate (x lr_scale per group)
    clips: int  # training clips in the step's micro-batches, on this process
    loss: torch.Tensor  # [] detached: the step's loss (mean over plain micro-batches)
    grad_norm: torch.Tensor  # [] the gradient norm before clipping
    terms: dict[str, torch.Tensor]  # the loss's terms, detached, of the last micro-batch
    update: UpdateReport | PendingUpdate  # host check: the report; deferred: read at a sync point


class OptimizerStep:
    """One optimizer step of ``model`` with ``loss_fn`` (see the module docstring).

    ``model`` is the plain model, prepared by :func:`train_mode`; ``forward_model`` what runs the
    forward pass (its DDP wrapper; default ``model``). ``average_gradients`` averages the
    parameter gradients over processes where no DDP does it (horovod:
    :func:`clipvip.distributed.all_reduce_mean_`); None where nothing needs it.
    ``total_steps`` is the length of the learning-rate schedule.
    """

    def __init__(self, model: nn.Module, loss_fn: ContrastiveLoss, settings: StepSettings,
                 optimizer: OptimizerSettings, precision: str, device: torch.device, total_steps: int,
                 forward_model: Optional[nn.Module] = None,
                 average_gradients: Optional[Callable[[list[torch.Tensor]], None]] = None):
        self.model, self.loss_fn, self.settings = model, loss_fn, settings
        self.forward_model = forward_model if forward_model is not None else model
        self.optimizer_settings, self.total_steps = optimizer, total_steps
        self.precision, self.device = precision, torch.device(device)
        self.average_gradients = average_gradients
        self.optimizer = build_optimizer(model, optimizer)
        self.scaler = grad_scaler(precision, self.device.type)
        check = resolve_nonfinite_check(settings.nonfinite_check, self.device.type, self.optimizer)
        self.update = GuardedUpdate(self.optimizer, self.scaler, precision, check)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.max_norm = settings.grad_norm if settings.grad_norm > 0 else math.inf

    def _sync_context(self, last: bool):
        if not last and isinstance(self.forward_model, nn.parallel.DistributedDataParallel):
            return self.forward_model.no_sync()
        return contextlib.nullcontext()

    def _features(self, batch: dict) -> dict:
        # The transform is a function of the frames alone (no random draw): with the feature
        # cache, the recomputation of a micro-batch transforms its frames again into the same
        # input, and only one micro-batch's float input is on the device at a time. It runs
        # before autocast, in float32, as the input was computed on the host before.
        inputs = model_inputs(batch, self.device, self.settings.transform)
        with autocast(self.precision, self.device.type):
            return float_features(self.forward_model(**inputs))

    def backward_plain(self, batches: list[dict]) -> LossOutput:
        """Each micro-batch its own contrastive batch; gradients averaged over micro-batches.

        Returns the mean loss and the last micro-batch's terms, detached.
        """
        total = torch.zeros((), device=self.device)
        terms: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(batches):
            with self._sync_context(last=i == len(batches) - 1):
                out = self.loss_fn(self._features(batch), self.model.logit_scale)
                loss = out.total / len(batches)
                self.scaler.scale(loss).backward()
            total += loss.detach()
            terms = out.terms
        return LossOutput(total, {name: value.detach() for name, value in terms.items()})

    def backward_feature_cache(self, batches: list[dict]) -> LossOutput:
        """The loss of the whole accumulated batch, its gradient computed micro-batch by micro-batch."""
        with torch.no_grad():
            cached = [self._features(b) for b in batches]
        first: Optional[LossOutput] = None
        for j, batch in enumerate(batches):
            last = j == len(batches) - 1
            with self._sync_context(last):
                fresh = self._features(batch)
                merged = {k: torch.cat([fresh[k] if i == j else cached[i][k] for i in range(len(batches))])
                          for k in fresh}
                # logit_scale's gradient must be counted once, not once per recomputation, and in
                # the last micro-batch: the one DDP synchronises (the others run under no_sync).
                scale = self.model.logit_scale if last else self.model.logit_scale.detach()
                out = self.loss_fn(merged, scale)
                self.scaler.scale(out.total).backward()
            if first is None:  # every recomputation gives the same value
                first = out
        return LossOutput(first.total.detach(), {name: value.detach() for name, value in first.terms.items()})

    def __call__(self, step: int, batches: list[dict]) -> StepResult:
        """Optimizer step number ``step`` (1-based) on ``batches``, its micro-batches."""
        lr = learning_rate_at(step, self.optimizer_settings, self.total_steps)
        set_learning_rate(self.optimizer, lr)
        feature_cache = self.settings.accum_feature_cache and len(batches) > 1
        loss = self.backward_feature_cache(batches) if feature_cache else self.backward_plain(batches)
        if self.average_gradients is not None:
            self.average_gradients([p.grad for p in self.params if p.grad is not None])
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        update = self.update(loss.total, grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        self.model.clamp_logit_scale()
        clips = sum(len(b["video"]) for b in batches if "video" in b)  # a tensor [B, ...] or a list of B clips
        return StepResult(step, lr, clips, loss.total, grad_norm.detach(), loss.terms, update)
