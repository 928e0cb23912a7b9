"""The one training loop, shared by retrieval fine-tuning and pretraining.

What it does per optimizer step (DESIGN §4):

1. set the learning rate of step ``step + 1`` (warmup + cosine/linear; ``lr_mul`` groups);
2. run ``gradient_accumulation_steps`` micro-batches: forward under autocast, the registry loss on
   features gathered from every process, backward (DDP synchronises on the last micro-batch
   only). With ``accum_feature_cache`` the micro-batches are first encoded without gradient and
   each is then recomputed with gradient against the cached features of the others, so every
   loss sees the whole accumulated batch of negatives (open_clip's scheme);
3. unscale (fp16), clip at ``grad_norm``, and step the optimizer only if loss and gradient are
   finite: a non-finite step is skipped and counted; ``max_nonfinite_steps`` in a row stop the run
   with a checkpoint. ``nonfinite_check`` decides where (:mod:`clipvip.engine.guard`): on the host
   every step (the step's one host-device sync), or on the device, read at the loop's sync points
   only (logging, validation and state steps; the default on CUDA);
4. clamp ``logit_scale`` to ``[0, ln 200]``.

Validation runs at step 0 (zero-shot), every ``valid_steps`` (with ``ckpt/model_step_N.pt``),
every ``only_valid_steps`` and at the end (with the last ``model_step``), keeping
``ckpt/model_best.pt`` for the best text-to-video R@1 — the original's cadence. Of validations
with equal R@1 the later one wins (the original kept the first: a run whose validations only tie
the zero-shot score kept the untrained step-0 model as its "best"); the log line says so when a
tie moves ``model_best.pt``. The training state (``ckpt/train_state.pt``) is written every
``save_steps_ratio`` of the run, at each validation, at the end and on Ctrl-C; rerunning the same
command resumes from it.

Epochs, as the logs count them: the ``epoch`` of a metrics line and of the last line is the number
of epochs of data trained on so far, ``step * global_batch / examples`` (0 before the first step,
``num_train_epochs`` at the end, a little more when the total was rounded up). ``total_steps`` is
the original's ``ceil(num_train_epochs * examples / global_batch)``: 100 examples in batches of 8
are 12.5 steps per epoch, so 2 epochs are 25 steps, not 2 x 13. The loader's own passes over the
shuffled set are a little shorter (full batches only: 12 of 8, each pass leaving out 4 clips of its
shuffle), so a pass boundary need not fall on a whole epoch.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from dataclasses import dataclass

import torch
from torch import nn

from clipvip import distributed
from clipvip.data.loader import MODEL_INPUTS, DevicePrefetcher
from clipvip.errors import CheckpointError, ClipvipError
from clipvip.logging_utils import get_logger
from clipvip.model.weights import save_checkpoint
from clipvip.engine.logger import RunLogger
from clipvip.engine.guard import GuardedUpdate, UpdateReport, resolve_nonfinite_check
from clipvip.engine.optim import build_optimizer, learning_rate_at, set_learning_rate
from clipvip.precision import autocast, grad_scaler
from clipvip.engine.state import Progress, load_training_state, restore_rng, save_training_state

LOGGER = get_logger("train")


class TrainingStopped(ClipvipError):
    """Training cannot go on (repeated non-finite losses); the state was saved first."""


@dataclass(frozen=True)
class TrainPlan:
    """The numbers of a run, derived from the config as the original derives them."""

    world_size: int
    per_device_batch: int
    accumulation: int
    global_batch: int
    num_examples: int
    steps_per_epoch: int
    total_steps: int
    valid_steps: int
    only_valid_steps: int
    state_steps: int
    epochs: float  # num_train_epochs
    epoch_steps: float  # optimizer steps one epoch of data takes: examples / global_batch (not rounded)

    @classmethod
    def from_config(cls, cfg, num_examples: int, world_size: int) -> "TrainPlan":
        accumulation = int(cfg.gradient_accumulation_steps)
        global_batch = world_size * cfg.train_batch_size * accumulation * cfg.max_n_example_per_group
        examples = num_examples * cfg.max_n_example_per_group
        total = int(math.ceil(cfg.num_train_epochs * examples / global_batch))
        valid = int(math.ceil(total / cfg.num_valid / cfg.min_valid_steps)) * cfg.min_valid_steps
        return cls(
            world_size=world_size, per_device_batch=cfg.train_batch_size, accumulation=accumulation,
            global_batch=global_batch, num_examples=num_examples,
            # The original's n_steps_in_epoch (rounded up); the plan line prints epoch_steps.
            steps_per_epoch=int(math.ceil(examples / global_batch)), total_steps=total,
            valid_steps=max(valid, 1), only_valid_steps=max(int(cfg.only_valid_steps), 1),
            state_steps=max(int(cfg.save_steps_ratio * total), 1),
            epochs=float(cfg.num_train_epochs), epoch_steps=examples / global_batch,
        )

    def epochs_at(self, step: int) -> float:
        """Epochs of data trained on after ``step`` optimizer steps (the ``epoch`` of the logs)."""
        return step / self.epoch_steps

    def describe(self) -> str:
        exact = self.epochs * self.epoch_steps
        # Say where the total comes from, so that "12.5 steps per epoch, 2 epochs" reads as 25.
        rounded = "" if math.isclose(exact, self.total_steps, rel_tol=1e-9) else f" ({exact:g} rounded up)"
        return (f"world size {self.world_size}, per-device batch {self.per_device_batch}, accumulation "
                f"{self.accumulation}, global batch {self.global_batch}; {self.num_examples} examples: "
                f"{self.epoch_steps:g} steps per epoch, {self.epochs:g} epochs = {self.total_steps} steps"
                f"{rounded}; validate+save every {self.valid_steps}, validate every {self.only_valid_steps}, "
                f"training state every {self.state_steps}")


def _model_inputs(batch: dict, device: torch.device) -> dict:
    return {k: batch[k].to(device, non_blocking=True) for k in MODEL_INPUTS if batch.get(k) is not None}


def _float_features(outputs: dict) -> dict:
    # The loss runs in fp32 whatever the autocast dtype of the towers.
    return {k: v.float() for k, v in outputs.items()}


class StopRequest:
    """Ctrl-C / SIGTERM during training: finish the current step, save the state, then stop.

    A signal only sets a flag that the loop checks between steps (a second Ctrl-C interrupts at
    once). Raising KeyboardInterrupt wherever the signal lands is not enough: inside a decoder's
    C callback (decord) it is printed and swallowed, and mid-step it would leave processes of a
    distributed job at different steps. With several processes the flag is combined over all of
    them each step, so every process stops after the same step.
    """

    def __init__(self, when: str = "after this step"):
        self.requested = False
        self.when = when  # where the loop looks at the flag, for the message
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        LOGGER.warning("%s: stopping %s and saving the training state (Ctrl-C again to stop now)",
                       signal.Signals(signum).name, self.when)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def anywhere(self, world_size: int, device: torch.device) -> bool:
        """Whether any process was asked to stop."""
        if world_size <= 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=device)
        return bool(distributed.all_reduce_mean(flag).item() > 0)


class Trainer:
    """Fits ``model`` on batches from ``stream`` and validates with ``evaluate``.

    ``stream``: an iterator of batch dicts with ``state_dict()``/``load_state_dict()`` for its
    position (see :class:`clipvip.data.loader.LoaderStream`). ``evaluate(model) -> {name: eval block}`` runs on
    every process. ``loss_fn(outputs, logit_scale)`` is a :mod:`clipvip.loss` loss.
    """

    def __init__(self, cfg, model: nn.Module, loss_fn: nn.Module, stream, plan: TrainPlan, evaluate,
                 env: distributed.DistEnv, precision: str):
        self.cfg, self.plan, self.env, self.precision = cfg, plan, env, precision
        self.evaluate, self.loss_fn = evaluate, loss_fn
        self.device = torch.device(env.device)
        self.device_type = self.device.type
        if self.device_type == "cuda" and cfg.get("prefetch_to_device", 1):
            stream = DevicePrefetcher(stream, self.device)
        self.stream = stream
        self.raw_model = model.to(self.device)
        if cfg.get("freeze_text_encoder"):
            model.freeze_text_encoder(bool(cfg.get("freeze_text_proj")))
        self.model = self.raw_model
        if env.world_size > 1 and env.backend in distributed.TORCH_BACKENDS:
            self.model = nn.parallel.DistributedDataParallel(
                self.raw_model, device_ids=[self.device] if self.device_type == "cuda" else None,
                broadcast_buffers=False)
        self.optimizer = build_optimizer(self.raw_model, cfg)
        self.scaler = grad_scaler(precision, self.device_type)
        check = resolve_nonfinite_check(str(cfg.get("nonfinite_check", "auto")), self.device_type, self.optimizer)
        self.update = GuardedUpdate(self.optimizer, self.scaler, precision, check)
        self.params = [p for p in self.raw_model.parameters() if p.requires_grad]
        self.progress = Progress()
        self.nonfinite_in_a_row = 0
        self.longest_nonfinite_run = 0  # in the steps of the last report (deferred: since the last read)
        self.last_results: dict = {}
        self.ckpt_dir = os.path.join(cfg.output_dir, "ckpt")
        self.fingerprint = {"world_size": plan.world_size, "train_batch_size": plan.per_device_batch,
                            "gradient_accumulation_steps": plan.accumulation, "total_steps": plan.total_steps,
                            "seed": int(cfg.seed)}
        # The run's log file first, so that it holds the resume message too.
        self.run_log = RunLogger(cfg, env.is_main)
        try:
            self.resumed = self._resume()
        except BaseException:
            self.run_log.close()
            raise
        self.run_log.forget_after(self.progress.step)
        self._unreported_from = self.progress.step + 1  # the first step not yet in a report
        self.accum_feature_cache = bool(cfg.get("accum_feature_cache")) and plan.accumulation > 1

    # ------------------------------------------------------------------------------------------
    # Resume and save
    # ------------------------------------------------------------------------------------------
    def _resume(self) -> bool:
        state = load_training_state(self.ckpt_dir)
        if state is None:
            return False
        saved = state["fingerprint"]
        differs = {k: (saved.get(k), v) for k, v in self.fingerprint.items() if saved.get(k) != v}
        if differs:
            details = ", ".join(f"{k}: saved {a}, now {b}" for k, (a, b) in differs.items())
            raise CheckpointError(
                f"{self.ckpt_dir}/train_state.pt was written by a run with other settings ({details}); "
                "use another output_dir, or start from its weights with --e2e_weights_path")
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"])
        self.progress = Progress.from_dict(state["progress"])
        self.stream.load_state_dict(state["data"])
        LOGGER.info("resumed from %s/train_state.pt at step %d", self.ckpt_dir, self.progress.step)
        return True

    def save_state(self) -> None:
        self.settle()  # the counts of deferred steps belong in the saved progress
        if self.env.is_main:
            save_training_state(self.ckpt_dir, self.raw_model, self.optimizer, self.scaler, self.progress,
                                self.fingerprint, data=self.stream.state_dict())
        distributed.barrier()

    def save_model(self, name: str) -> None:
        if self.env.is_main and self.cfg.get("if_model_saver", 1):
            save_checkpoint(self.raw_model, os.path.join(self.ckpt_dir, name))

    # ------------------------------------------------------------------------------------------
    # One optimizer step
    # ------------------------------------------------------------------------------------------
    def _sync_context(self, last: bool):
        if not last and isinstance(self.model, nn.parallel.DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def _loss(self, batch: dict, logit_scale: torch.Tensor) -> torch.Tensor:
        with autocast(self.precision, self.device_type):
            outputs = self.model(**_model_inputs(batch, self.device))
        return self.loss_fn(_float_features(outputs), logit_scale)

    def _backward_plain(self, batches: list[dict]) -> torch.Tensor:
        """Each micro-batch its own contrastive batch; gradients averaged over micro-batches."""
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            with self._sync_context(last=i == len(batches) - 1):
                loss = self._loss(batch, self.raw_model.logit_scale) / len(batches)
                self.scaler.scale(loss).backward()
            total += loss.detach()
        return total

    def _backward_feature_cache(self, batches: list[dict]) -> torch.Tensor:
        """The loss of the whole accumulated batch, its gradient computed micro-batch by micro-batch."""
        with torch.no_grad(), autocast(self.precision, self.device_type):
            cached = [_float_features(self.model(**_model_inputs(b, self.device))) for b in batches]
        total = torch.zeros((), device=self.device)
        for j, batch in enumerate(batches):
            last = j == len(batches) - 1
            with self._sync_context(last):
                with autocast(self.precision, self.device_type):
                    fresh = _float_features(self.model(**_model_inputs(batch, self.device)))
                merged = {k: torch.cat([fresh[k] if i == j else cached[i][k] for i in range(len(batches))])
                          for k in fresh}
                # logit_scale's gradient must be counted once, not once per recomputation, and in
                # the last micro-batch: the one DDP synchronises (the others run under no_sync).
                scale = self.raw_model.logit_scale if last else self.raw_model.logit_scale.detach()
                loss = self.loss_fn(merged, scale)
                self.scaler.scale(loss).backward()
            if j == 0:  # every recomputation gives the same value
                total += loss.detach()
        return total

    def train_step(self) -> dict:
        step = self.progress.step + 1
        lr = learning_rate_at(step, self.cfg, self.plan.total_steps)
        set_learning_rate(self.optimizer, lr)
        batches = [next(self.stream) for _ in range(self.plan.accumulation)]
        self.progress.skipped_samples += sum(int(b.get("num_skipped", 0)) for b in batches)
        backward = self._backward_feature_cache if self.accum_feature_cache else self._backward_plain
        loss = backward(batches)
        if self.env.backend == "horovod":  # no DDP there: average the gradients ourselves
            distributed.all_reduce_mean_([p.grad for p in self.params if p.grad is not None])
        self.scaler.unscale_(self.optimizer)
        max_norm = float(self.cfg.grad_norm) if self.cfg.grad_norm and self.cfg.grad_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        report = self.update(loss, grad_norm)  # None when the check is deferred (see settle())
        self.optimizer.zero_grad(set_to_none=True)
        self.raw_model.clamp_logit_scale()
        self.progress.step = step
        out = {"lr": lr, "clips": sum(int(b["video"].shape[0]) for b in batches if "video" in b),
               "loss": None, "grad_norm": None, "finite": None}
        if report is not None:
            out.update(self._account(report))
        return out

    def settle(self) -> dict:
        """Deferred check: read the device's counts of the steps since the last read (a host sync).

        Returns the last step's ``loss``/``grad_norm``/``finite`` ({} when nothing was pending).
        """
        report = self.update.read()
        return self._account(report) if report is not None else {}

    def _account(self, report: UpdateReport) -> dict:
        """Add a report's counts to the progress and say what was skipped."""
        first, step = self._unreported_from, self.progress.step
        self._unreported_from = step + 1
        self.progress.nonfinite_steps += report.nonfinite
        self.progress.scale_overflow_steps += report.overflows
        self.nonfinite_in_a_row, self.longest_nonfinite_run = report.in_a_row, report.longest_in_a_row
        steps = f"step {step}" if first == step else f"steps {first}-{step}"
        if report.nonfinite:
            LOGGER.warning("%s: %d non-finite step(s) skipped (last loss %s, gradient norm %s; %d in a row)",
                           steps, report.nonfinite, report.loss, report.grad_norm, report.in_a_row)
        if report.overflows:
            # fp16 loss-scale overflow: GradScaler lowered the scale and the step was skipped. Normal
            # while the scale settles, so it does not count towards max_nonfinite_steps.
            LOGGER.debug("%s: %d fp16 gradient overflow(s); loss scale lowered, step(s) skipped",
                         steps, report.overflows)
        return {"loss": report.loss, "grad_norm": report.grad_norm, "finite": report.finite}

    # ------------------------------------------------------------------------------------------
    # Validation
    # ------------------------------------------------------------------------------------------
    def validate(self, save_step_checkpoint: bool) -> None:
        step = self.progress.step
        LOGGER.info("step %d: validation%s", step, " and checkpoint" if save_step_checkpoint else "")
        was_training = self.raw_model.training
        self.raw_model.eval()
        results = self.last_results = self.evaluate(self.raw_model)
        self.raw_model.train(was_training)
        metrics = {}
        for name, block in results.items():
            for direction in ("t2v", "v2t", "t2v_dsl", "v2t_dsl"):
                for key, value in block[direction].items():
                    metrics[f"val/{name}/{direction}_{key}"] = value
        self.run_log.log(step, metrics)
        if save_step_checkpoint:
            self.save_model(f"model_step_{step}.pt")
        if results:
            self._keep_best(next(iter(results.values()))["t2v"]["R1"], step)
        distributed.barrier()

    def _keep_best(self, r1: float, step: int) -> None:
        """``model_best.pt`` := this step if its R@1 is the best so far; of equals, the later step."""
        best, best_step = self.progress.best_r1, self.progress.best_step
        if r1 < best:
            return
        self.progress.best_r1, self.progress.best_step = r1, step
        self.save_model("model_best.pt")
        saved = ": ckpt/model_best.pt" if self.cfg.if_model_saver else ""
        if best_step < 0:
            LOGGER.info("step %d: text-to-video R@1 %.2f, the best so far%s", step, r1, saved)
        elif r1 > best:
            LOGGER.info("step %d: new best text-to-video R@1 %.2f (was %.2f at step %d)%s",
                        step, r1, best, best_step, saved)
        else:
            LOGGER.info("step %d: text-to-video R@1 %.2f ties step %d; ties go to the later step%s",
                        step, r1, best_step, saved)

    # ------------------------------------------------------------------------------------------
    # The run
    # ------------------------------------------------------------------------------------------
    def fit(self) -> Progress:
        plan, cfg = self.plan, self.cfg
        LOGGER.info("training: %s", plan.describe())
        self.raw_model.train()
        if cfg.get("freeze_text_encoder"):
            self.raw_model.clipmodel.text_model.eval()
        if not self.resumed:
            self.validate(save_step_checkpoint=False)  # zero-shot, as the original at step 0
        log_every = max(int(cfg.get("log_interval", 10)), 1)
        max_nonfinite = int(cfg.get("max_nonfinite_steps", 5))
        bar = None
        if self.env.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=plan.total_steps, initial=self.progress.step, desc="train", dynamic_ncols=True)
        # With several processes, reading the stop flag is a collective and a host sync: a deferred
        # check looks at it only where the loop syncs anyway.
        stop_everywhere = self.env.world_size <= 1 or not self.update.deferred
        stop = StopRequest("after this step" if stop_everywhere else "at the next logging step")
        try:
            with stop:
                self._run_steps(stop, bar, log_every, max_nonfinite, stop_everywhere)
        except KeyboardInterrupt:
            LOGGER.warning("interrupted at step %d: saving the training state", self.progress.step)
            self.save_state()
            raise
        finally:
            if bar is not None:
                bar.close()
        self._finish()
        return self.progress

    def _run_steps(self, stop: StopRequest, bar, log_every: int, max_nonfinite: int, stop_everywhere: bool) -> None:
        plan = self.plan
        window_clips, window_start = 0, time.perf_counter()
        while self.progress.step < plan.total_steps:
            out = self.train_step()
            step = self.progress.step
            window_clips += out["clips"]
            sync_point = (step % log_every == 0 or step == plan.total_steps or step % plan.valid_steps == 0
                          or step % plan.only_valid_steps == 0 or step % plan.state_steps == 0)
            if out["loss"] is None and sync_point:
                out.update(self.settle())
            if bar is not None:
                bar.update(1)
                if out["loss"] is not None:
                    bar.set_postfix(loss=f"{out['loss']:.4f}", lr=f"{out['lr']:.2e}")
            if self.longest_nonfinite_run >= max_nonfinite:
                self.save_state()
                raise TrainingStopped(
                    f"{self.longest_nonfinite_run} steps in a row had a non-finite loss or gradient "
                    f"(seen at step {step}); state saved in {self.ckpt_dir}. Lower the learning rate, "
                    "use --bf16 1 instead of fp16, or check the data")
            if step % log_every == 0 or step == plan.total_steps:
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                self.run_log.log(step, {
                    "loss": out["loss"], "lr": out["lr"], "grad_norm": out["grad_norm"],
                    "logit_scale": self.raw_model.logit_scale.item(), "epoch": round(plan.epochs_at(step), 4),
                    "clips_per_s": window_clips * self.env.world_size / elapsed,
                    "skipped_samples": self.progress.skipped_samples,
                    "nonfinite_steps": self.progress.nonfinite_steps,
                    "scale_overflow_steps": self.progress.scale_overflow_steps,
                    **{f"loss/{k}": v for k, v in self.loss_fn.last_terms.items()},
                })
                window_clips, window_start = 0, time.perf_counter()
            if step % plan.valid_steps == 0:
                self.validate(save_step_checkpoint=True)
                self.save_state()
            elif step % plan.only_valid_steps == 0:
                self.validate(save_step_checkpoint=False)
                self.save_state()
            elif step % plan.state_steps == 0:
                self.save_state()
            if (stop_everywhere or sync_point) and stop.anywhere(self.env.world_size, self.device):
                raise KeyboardInterrupt  # saved by fit(), after this complete step

    def _finish(self) -> None:
        if self.progress.step % self.plan.valid_steps != 0:
            self.validate(save_step_checkpoint=True)
        self.save_state()
        if self.progress.skipped_samples:
            LOGGER.warning("%d unreadable training samples were replaced by others", self.progress.skipped_samples)
        LOGGER.info("done: %s", self.summary())
        self.run_log.close()

    def summary(self) -> str:
        """The last line of a run, e.g. ``25 steps (2 epochs); best text-to-video R@1 62.50 at
        step 20; 0 non-finite steps skipped, 0 fp16 overflow steps, 0 unreadable clips replaced``."""
        p = self.progress
        best = (f"best text-to-video R@1 {p.best_r1:.2f} at step {p.best_step}" if p.best_step >= 0
                else "no validation results")
        return (f"{p.step} steps ({self.plan.epochs_at(p.step):.4g} epochs); {best}; {p.nonfinite_steps} non-finite "
                f"steps skipped, {p.scale_overflow_steps} fp16 overflow steps, {p.skipped_samples} unreadable "
                "clips replaced")
