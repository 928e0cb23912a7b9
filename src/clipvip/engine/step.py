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

Under bf16/fp16 the micro-batches run inside :func:`clipvip.model.fast_paths.weight_copies`: the
fast paths' matmul weights are cast to the low dtype once per step (where they changed), not at
every use, the fp32 parameters staying the master weights of the optimizer
(:mod:`clipvip.model.low_precision`).

With ``compile`` the forward pass and the loss of a micro-batch are one ``torch.compile``d
function with ``fullgraph=True`` (no graph breaks: dynamo captures model and loss whole, and
AOTAutograd derives the backward from that graph): :func:`compile_step_function`, what
``clipvip bench --compile`` uses too. Where DDP wraps the model (or horovod averages the
gradients) the model's forward is compiled in place instead, so that DDP's hooks and
collectives stay outside the graph, and the loss runs eagerly.

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
from clipvip.logging_utils import get_logger
from clipvip.loss import ContrastiveLoss, LossOutput
from clipvip.model import fast_paths
from clipvip.precision import autocast, autocast_dtype, grad_scaler

LOGGER = get_logger("train")


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
    compile: bool = False  # torch.compile forward + loss (compile_step_function)
    compile_mode: str = "default"  # torch.compile mode (inductor): default | reduce-overhead | max-autotune ...
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager / eager: capture only)

    @classmethod
    def from_config(cls, cfg) -> "StepSettings":
        return cls(grad_norm=float(cfg.grad_norm or 0), accum_feature_cache=bool(cfg.accum_feature_cache),
                   freeze_text_encoder=bool(cfg.freeze_text_encoder), freeze_text_proj=bool(cfg.freeze_text_proj),
                   frozen_text_cache=int(cfg.frozen_text_cache or 0), nonfinite_check=str(cfg.nonfinite_check),
                   transform=VideoTransform.from_config(cfg), compile=bool(cfg.compile),
                   compile_mode=str(cfg.compile_mode), compile_backend=str(cfg.compile_backend))


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


def compile_options(settings: StepSettings) -> dict:
    """What the training step passes to torch.compile: one graph (``fullgraph=True``: a graph
    break is an error, not a silent split), the settings' backend and, for inductor, its mode
    (``reduce-overhead``: CUDA graphs, for static shapes)."""
    options = {"fullgraph": True, "backend": settings.compile_backend}
    if settings.compile_backend == "inductor" and settings.compile_mode != "default":
        options["mode"] = settings.compile_mode
    return options


def compile_step_function(fn: Callable, settings: StepSettings) -> Callable:
    """``torch.compile(fn)`` as the training step compiles it (:func:`compile_options`)."""
    return torch.compile(fn, **compile_options(settings))


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
        self.low_dtype = autocast_dtype(precision)
        self.features, self.forward_loss = self._features_eager, self._forward_loss_eager
        if settings.compile:
            if self.forward_model is self.model and average_gradients is None:
                self.features = compile_step_function(self._features_eager, settings)
                self.forward_loss = compile_step_function(self._forward_loss_eager, settings)
            else:  # DDP / horovod: their hooks and collectives outside the graph (module docstring)
                model.compile(**compile_options(settings))
            if settings.freeze_text_encoder and settings.frozen_text_cache:
                LOGGER.info("compile: the frozen text tower runs inside the compiled step every step "
                            "(frozen_text_cache is for eager steps: it reads the captions on the host)")

    def _sync_context(self, last: bool):
        if not last and isinstance(self.forward_model, nn.parallel.DistributedDataParallel):
            return self.forward_model.no_sync()
        return contextlib.nullcontext()

    def _inputs(self, batch: dict) -> dict:
        """A micro-batch's model arguments on the device: made outside the compiled function.

        The transform is a function of the frames alone (no random draw): with the feature cache,
        the recomputation of a micro-batch transforms its frames again into the same input, and
        only one micro-batch's float input is on the device at a time. It runs before autocast, in
        float32, as the input was computed on the host before."""
        return model_inputs(batch, self.device, self.settings.transform)

    def _features_eager(self, inputs: dict) -> dict:
        with autocast(self.precision, self.device.type):
            return float_features(self.forward_model(**inputs))

    def _forward_loss_eager(self, inputs: dict, logit_scale: torch.Tensor) -> LossOutput:
        """A micro-batch's forward pass and loss: what ``compile`` compiles as one graph."""
        return self.loss_fn(self._features_eager(inputs), logit_scale)

    def backward_plain(self, batches: list[dict]) -> LossOutput:
        """Each micro-batch its own contrastive batch; gradients averaged over micro-batches.

        Returns the mean loss and the last micro-batch's terms, detached.
        """
        total = torch.zeros((), device=self.device)
        terms: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(batches):
            with self._sync_context(last=i == len(batches) - 1):
                out = self.forward_loss(self._inputs(batch), self.model.logit_scale)
                loss = out.total / len(batches)
                self.scaler.scale(loss).backward()
            total += loss.detach()
            terms = out.terms
        return LossOutput(total, {name: value.detach() for name, value in terms.items()})

    def backward_feature_cache(self, batches: list[dict]) -> LossOutput:
        """The loss of the whole accumulated batch, its gradient computed micro-batch by micro-batch."""
        with torch.no_grad():
            # Copies ([B, P] each, small): under compile_mode "reduce-overhead" the compiled
            # function's outputs live in CUDA-graph memory that its next call overwrites.
            cached = [{k: v.clone() for k, v in self.features(self._inputs(b)).items()} for b in batches]
        first: Optional[LossOutput] = None
        for j, batch in enumerate(batches):
            last = j == len(batches) - 1
            with self._sync_context(last):
                fresh = self.features(self._inputs(batch))
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
        # The low-precision weights of the step, made here once for all its micro-batches.
        with fast_paths.weight_copies(self.model, self.low_dtype):
            loss = self.backward_feature_cache(batches) if feature_cache else self.backward_plain(batches)
        if self.average_gradients is not None:
            self.average_gradients([p.grad for p in self.params if p.grad is not None])
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        update = self.update(loss.total, grad_norm)
        # The fused AdamW kernel changes the parameters without bumping their version counters;
        # bump them, so that what keys on them (the low-precision weight copies) sees the change.
        torch.autograd.graph.increment_version(self.params)
        self.optimizer.zero_grad(set_to_none=True)
        self.model.clamp_logit_scale()
        clips = sum(len(b["video"]) for b in batches if "video" in b)  # a tensor [B, ...] or a list of B clips
        return StepResult(step, lr, clips, loss.total, grad_norm.detach(), loss.terms, update)
