"""The one training loop, shared by retrieval fine-tuning and pretraining: the parts, wired.

The parts, each testable on its own:

- :mod:`clipvip.engine.step`: one optimizer step (schedule of the learning rate, micro-batches,
  backward, clipping, the guarded update of :mod:`clipvip.engine.guard`);
- :mod:`clipvip.engine.schedule`: the run's numbers (:class:`TrainPlan`) and its cadence: which
  steps log, validate, save; which validation keeps ``model_best.pt`` (ties: the later step);
- :mod:`clipvip.engine.state`: ``ckpt/train_state.pt`` and the check that a rerun of the same
  command resumes the same run;
- :mod:`clipvip.engine.signals`: Ctrl-C / SIGTERM as a stop between two steps;
- :mod:`clipvip.engine.logger`: ``log/metrics.jsonl`` and its mirrors.

Here: DDP wrapping, the fit loop, the accounting of skipped (non-finite) steps and the stop after
``max_nonfinite_steps`` of them in a row (with a checkpoint), validation and the last line. The
training state (``ckpt/train_state.pt``) is written every ``save_steps_ratio`` of the run, at each
validation, at the end and on Ctrl-C; rerunning the same command resumes from it.
"""
from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from clipvip import distributed
from clipvip.data import bad_samples
from clipvip.data.loader import DevicePrefetcher
from clipvip.engine.checkpoints import BEST_MODEL, step_checkpoint, write_checkpoint_info
from clipvip.engine.evaluate import scored_by
from clipvip.engine.guard import PendingUpdate, UpdateReport
from clipvip.engine.logger import LogSettings, RunLogger, Throughput
from clipvip.engine.optim import OptimizerSettings
from clipvip.engine.schedule import TrainPlan, actions_at, best_model_change, needs_final_validation
from clipvip.engine.signals import StopRequest
from clipvip.engine.state import (STATE_FILE, Progress, resume_settings, resume_training, run_fingerprint,
                                  save_training_state)
from clipvip.engine.step import OptimizerStep, StepResult, StepSettings, train_mode
from clipvip.errors import ClipvipError
from clipvip.logging_utils import get_logger
from clipvip.loss import ContrastiveLoss
from clipvip.model.weights import save_checkpoint

LOGGER = get_logger("train")

class TrainingStopped(ClipvipError):
    """Training cannot go on (repeated non-finite losses); the state was saved first."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM ended the training; the message says where the state was saved and how to
    go on (the command line prints it as the run's last line, without a traceback)."""


# DistributedDataParallel's keyword for "no buffer broadcast before every forward": torch 2.13 renamed
# broadcast_buffers (deprecated, with a FutureWarning at every construction) to forward_sync_buffers.
_DDP_BUFFER_SYNC = ("forward_sync_buffers"
                    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
                    else "broadcast_buffers")


@dataclass(frozen=True)
class TrainerSettings:
    """What the loop reads of the config; the step's, optimizer's and logger's settings inside."""

    output_dir: str
    seed: int  # part of the resume fingerprint
    prefetch_to_device: bool  # CUDA: copy the next batch on a side stream during the step
    save_models: bool  # if_model_saver: ckpt/model_step_N.pt and model_best.pt
    log_interval: int  # steps between lines of log/metrics.jsonl
    max_nonfinite_steps: int  # stop after this many non-finite steps in a row
    step: StepSettings
    optimizer: OptimizerSettings
    log: LogSettings
    resume: dict = field(default_factory=dict)  # the settings a resumed run is checked against (state.resume_settings)

    @classmethod
    def from_config(cls, cfg) -> "TrainerSettings":
        return cls(output_dir=cfg.output_dir, seed=int(cfg.seed), prefetch_to_device=bool(cfg.prefetch_to_device),
                   save_models=bool(cfg.if_model_saver), log_interval=max(int(cfg.log_interval), 1),
                   max_nonfinite_steps=int(cfg.max_nonfinite_steps), step=StepSettings.from_config(cfg),
                   optimizer=OptimizerSettings.from_config(cfg), log=LogSettings.from_config(cfg),
                   resume=resume_settings(cfg))


class Trainer:
    """Fits ``model`` on batches from ``stream`` and validates with ``evaluate``.

    ``stream``: an iterator of batch dicts with ``state_dict()``/``load_state_dict()`` for its
    position (see :class:`clipvip.data.loader.LoaderStream`). ``evaluate(model) -> {name: eval block}`` runs on
    every process. ``loss_fn(outputs, logit_scale)`` is a :mod:`clipvip.loss` loss.
    """

    def __init__(self, settings: TrainerSettings, model: nn.Module, loss_fn: ContrastiveLoss, stream,
                 plan: TrainPlan, evaluate, env: distributed.DistEnv, precision: str):
        self.settings, self.plan, self.env, self.precision = settings, plan, env, precision
        self.evaluate, self.loss_fn = evaluate, loss_fn
        self.device = torch.device(env.device)
        if self.device.type == "cuda" and settings.prefetch_to_device:
            stream = DevicePrefetcher(stream, self.device)
        self.stream = stream
        self.raw_model = model.to(self.device)
        train_mode(self.raw_model, settings.step)  # frozen parameters first: DDP and the optimizer skip them
        self.model = self.raw_model
        if env.world_size > 1 and env.backend in distributed.TORCH_BACKENDS:
            # Buffers (position ids) are equal on every rank: synced once at construction, not per forward.
            self.model = nn.parallel.DistributedDataParallel(
                self.raw_model, device_ids=[self.device] if self.device.type == "cuda" else None,
                **{_DDP_BUFFER_SYNC: False})
        self.optimizer_step = OptimizerStep(
            self.raw_model, loss_fn, settings.step, settings.optimizer, precision, self.device, plan.total_steps,
            forward_model=self.model,
            # no DDP there: the gradients are averaged by hand
            average_gradients=distributed.all_reduce_mean_ if env.backend == "horovod" else None)
        self.optimizer, self.scaler, self.update = (self.optimizer_step.optimizer, self.optimizer_step.scaler,
                                                 self.optimizer_step.update)
        self.progress = Progress()
        self.throughput = Throughput(getattr(self.stream, "workers", 1), env.world_size)
        self.nonfinite_in_a_row = 0
        self.longest_nonfinite_run = 0  # in the steps of the last report (deferred: since the last read)
        self.last_results: dict = {}  # the latest validation's blocks
        self.last_validated_step = -1
        self.ckpt_dir = os.path.join(settings.output_dir, "ckpt")
        self.fingerprint = run_fingerprint(plan, settings.seed)
        # The run's log file first, so that it holds the resume message too.
        self.run_log = RunLogger(settings.log, env.is_main)
        try:
            resumed = resume_training(self.ckpt_dir, self.fingerprint, self.raw_model, self.optimizer,
                                      self.scaler, self.stream, settings.resume)
        except BaseException:
            self.run_log.close()
            raise
        self.resumed = resumed is not None
        if resumed is not None:
            self.progress = resumed
        self.run_log.forget_after(self.progress.step)
        # Bad training samples: one warning each per rank and run, the list in log/ at every save.
        self.bad_samples_path = os.path.join(settings.output_dir, "log", bad_samples.FILE_NAME)
        self.bad_sample_rows = bad_samples.carried_over(self.bad_samples_path, self.resumed, env.is_main)
        self.bad_samples = bad_samples.BadSampleLog(env.rank, env.world_size, known=self.bad_sample_rows)
        self.earlier_bad_samples = self.bad_sample_rows  # the part of the run before a resume
        self._unreported_from = self.progress.step + 1  # the first step not yet in a report

    # ------------------------------------------------------------------------------------------
    # Save
    # ------------------------------------------------------------------------------------------
    def save_state(self) -> None:
        self.settle()  # the counts of deferred steps belong in the saved progress
        self.bad_sample_rows = bad_samples.merge(distributed.gather_objects(self.bad_samples.entries()),
                                                 self.earlier_bad_samples)
        if self.env.is_main:
            save_training_state(self.ckpt_dir, self.raw_model, self.optimizer, self.scaler, self.progress,
                                self.fingerprint, data=self.stream.state_dict(), settings=self.settings.resume)
            if self.bad_sample_rows:
                bad_samples.write(self.bad_samples_path, self.bad_sample_rows)
        distributed.barrier()

    def save_model(self, name: str) -> None:
        if self.env.is_main and self.settings.save_models:
            save_checkpoint(self.raw_model, os.path.join(self.ckpt_dir, name))

    # ------------------------------------------------------------------------------------------
    # One optimizer step and its accounting
    # ------------------------------------------------------------------------------------------
    def train_step(self) -> StepResult:
        """The next optimizer step; a host-checked step is accounted for at once, a deferred one
        when :meth:`settle` reads it."""
        waiting = time.perf_counter()
        batches = [next(self.stream) for _ in range(self.plan.accumulation)]
        waited = time.perf_counter() - waiting
        self.progress.skipped_samples += sum(int(b.get("num_skipped", 0)) for b in batches)
        self.bad_samples.add(bad for b in batches for bad in b.get(bad_samples.KEY, ()))
        result = self.optimizer_step(self.progress.step + 1, batches)
        self.throughput.add(result.clips, waited, sum(float(b.get("load_s", 0.0)) for b in batches))
        self.progress.step = result.step
        if isinstance(result.update, UpdateReport):
            self._account(result.update)
        return result

    def settle(self) -> Optional[UpdateReport]:
        """Deferred check: read the device's counts of the steps since the last read (a host sync)
        and account for them; None when nothing was pending."""
        report = self.update.read()
        if report is not None:
            self._account(report)
        return report

    def _account(self, report: UpdateReport) -> None:
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

    # ------------------------------------------------------------------------------------------
    # Validation
    # ------------------------------------------------------------------------------------------
    def validate(self, save_step_checkpoint: bool) -> None:
        step = self.progress.step
        LOGGER.info("step %d: validation%s", step, " and checkpoint" if save_step_checkpoint else "")
        self.raw_model.eval()
        results = self.last_results = self.evaluate(self.raw_model)
        self.last_validated_step = step
        train_mode(self.raw_model, self.settings.step)
        metrics = {}
        for name, block in results.items():
            for direction in ("t2v", "v2t", "t2v_dsl", "v2t_dsl"):
                for key, value in block[direction].items():
                    metrics[f"val/{name}/{direction}_{key}"] = value
        self.run_log.log(step, metrics)
        if save_step_checkpoint:
            self.save_model(step_checkpoint(step))
        if results:
            self._keep_best(results, step)
        distributed.barrier()

    def _keep_best(self, results: dict, step: int) -> None:
        """``model_best.pt`` := this step if its R@1 (of the first set) is the best so far; of equals,
        the later step. Its step is noted beside it (``model_best.json``), its results kept."""
        name, block = next(iter(results.items()))
        r1 = block["t2v"]["R1"]
        best, best_step = self.progress.best_r1, self.progress.best_step
        change = best_model_change(r1, best, best_step)
        if change == "worse":
            return
        self.progress.best_r1, self.progress.best_step, self.progress.best_results = r1, step, results
        self.save_model(BEST_MODEL)
        if self.env.is_main and self.settings.save_models:
            write_checkpoint_info(os.path.join(self.ckpt_dir, BEST_MODEL), step, t2v_R1=r1, dataset=name)
        saved = ": ckpt/model_best.pt" if self.settings.save_models else ""
        if change == "first":
            LOGGER.info("step %d: text-to-video R@1 %.2f, the best so far%s", step, r1, saved)
        elif change == "better":
            LOGGER.info("step %d: new best text-to-video R@1 %.2f (was %.2f at step %d)%s",
                        step, r1, best, best_step, saved)
        else:
            LOGGER.info("step %d: text-to-video R@1 %.2f ties step %d; ties go to the later step%s",
                        step, r1, best_step, saved)

    # ------------------------------------------------------------------------------------------
    # The run
    # ------------------------------------------------------------------------------------------
    def fit(self) -> Progress:
        plan = self.plan
        LOGGER.info("training: %s", plan.describe())
        train_mode(self.raw_model, self.settings.step)
        if not self.resumed:
            self.validate(save_step_checkpoint=False)  # zero-shot, as the original at step 0
        bar = None
        if self.env.is_main:
            bar = tqdm(total=plan.total_steps, initial=self.progress.step, desc="train", dynamic_ncols=True)
        # With several processes, reading the stop flag is a collective and a host sync: a deferred
        # check looks at it only where the loop syncs anyway.
        stop_everywhere = self.env.world_size <= 1 or not self.update.deferred
        stop = StopRequest("after this step" if stop_everywhere else "at the next logging step")
        try:
            with stop:
                self._run_steps(stop, bar, stop_everywhere)
        except KeyboardInterrupt:
            self.save_state()
            self.run_log.close()
            raise TrainingInterrupted(
                f"interrupted at step {self.progress.step}: the training state is saved in "
                f"{os.path.join(self.ckpt_dir, STATE_FILE)}; rerun the same command to resume from it") from None
        finally:
            if bar is not None:
                bar.close()
        self._finish()
        return self.progress

    def _run_steps(self, stop: StopRequest, bar, stop_everywhere: bool) -> None:
        plan, settings = self.plan, self.settings
        self.throughput.metrics()  # the first window starts here, after the zero-shot validation
        while self.progress.step < plan.total_steps:
            result = self.train_step()
            step = result.step
            actions = actions_at(plan, step, settings.log_interval)
            report = result.update
            if isinstance(report, PendingUpdate):
                # Read at the loop's sync points only; in between, nothing waits for the device.
                report = self.settle() if actions.sync_point else None
            if bar is not None:
                bar.update(1)
                if report is not None:
                    bar.set_postfix(loss=f"{report.loss:.4f}", lr=f"{result.lr:.2e}")
            if self.longest_nonfinite_run >= settings.max_nonfinite_steps:
                self.save_state()
                raise TrainingStopped(
                    f"{self.longest_nonfinite_run} steps in a row had a non-finite loss or gradient "
                    f"(seen at step {step}); state saved in {self.ckpt_dir}. Lower the learning rate, "
                    "use --bf16 1 instead of fp16, or check the data")
            if actions.log:
                self.run_log.log(step, {
                    "loss": report.loss if report is not None else None, "lr": result.lr,
                    "grad_norm": report.grad_norm if report is not None else None,
                    "logit_scale": self.raw_model.logit_scale.item(), "epoch": round(plan.epochs_at(step), 4),
                    **self.throughput.metrics(),  # clips/s of the run, the step and the loader
                    "skipped_samples": self.progress.skipped_samples,
                    "nonfinite_steps": self.progress.nonfinite_steps,
                    "scale_overflow_steps": self.progress.scale_overflow_steps,
                    **{f"loss/{k}": v for k, v in result.terms.items()},
                })
            if actions.validate:
                self.validate(save_step_checkpoint=actions.step_checkpoint)
            if actions.save_state:
                self.save_state()
            if (stop_everywhere or actions.sync_point) and stop.anywhere(self.env.world_size, self.device):
                raise KeyboardInterrupt  # saved by fit(), after this complete step

    def _finish(self) -> None:
        if needs_final_validation(self.plan, self.progress.step):
            self.validate(save_step_checkpoint=True)
        self.save_state()
        if self.env.is_main and self.bad_sample_rows:
            LOGGER.warning("%s", bad_samples.describe(self.bad_sample_rows, self.bad_samples_path,
                                                      show_ranks=self.env.world_size > 1))
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

    def reported_results(self) -> dict:
        """The run's results (``eval_results.json``): the validation of ``ckpt/model_best.pt``, the
        model the run keeps (and ``--save_hf`` converts), each block naming that file and its step.
        Without saved models (``if_model_saver 0``) the best weights are gone: the last validation,
        of the weights in the training state, naming no file. Empty when nothing was validated."""
        p = self.progress
        if self.settings.save_models and p.best_results:
            return scored_by(p.best_results, os.path.join(self.ckpt_dir, BEST_MODEL), p.best_step)
        if self.last_results:
            return scored_by(self.last_results, None, self.last_validated_step)
        return {}
