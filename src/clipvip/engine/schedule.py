"""The cadence of a run: how many steps, and at which of them to log, validate and save.

Pure arithmetic on the config's numbers, testable without a model. Validation runs at step 0
(zero-shot), every ``valid_steps`` (with ``ckpt/model_step_N.pt``), every ``only_valid_steps``
and at the end (with the last ``model_step``), keeping ``ckpt/model_best.pt`` for the best
text-to-video R@1 — the original's cadence. Of validations with equal R@1 the later one wins (the
original kept the first: a run whose validations only tie the zero-shot score kept the untrained
step-0 model as its "best"). The training state is written every ``save_steps_ratio`` of the run,
at each validation and at the end.

Epochs, as the logs count them: the ``epoch`` of a metrics line and of the last line is the number
of epochs of data trained on so far, ``step * global_batch / examples`` (0 before the first step,
``num_train_epochs`` at the end, a little more when the total was rounded up). ``total_steps`` is
the original's ``ceil(num_train_epochs * examples / global_batch)``: 100 examples in batches of 8
are 12.5 steps per epoch, so 2 epochs are 25 steps, not 2 x 13. The loader's own passes over the
shuffled set are a little shorter (full batches only: 12 of 8, each pass leaving out 4 clips of its
shuffle), so a pass boundary need not fall on a whole epoch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


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


@dataclass(frozen=True)
class StepActions:
    """What the loop does after optimizer step ``step``."""

    log: bool  # a line of log/metrics.jsonl
    validate: bool
    step_checkpoint: bool  # with the validation: ckpt/model_step_N.pt
    save_state: bool  # ckpt/train_state.pt

    @property
    def sync_point(self) -> bool:
        """Whether the host waits for the device here anyway: where a deferred check is read."""
        return self.log or self.validate or self.save_state


def actions_at(plan: TrainPlan, step: int, log_every: int) -> StepActions:
    """The cadence at ``step`` (1-based): log every ``log_every`` and at the last step; validate
    with a step checkpoint every ``valid_steps``, without one every ``only_valid_steps``; the state
    with each validation and every ``state_steps``."""
    log = step % log_every == 0 or step == plan.total_steps
    if step % plan.valid_steps == 0:
        return StepActions(log, validate=True, step_checkpoint=True, save_state=True)
    if step % plan.only_valid_steps == 0:
        return StepActions(log, validate=True, step_checkpoint=False, save_state=True)
    return StepActions(log, validate=False, step_checkpoint=False, save_state=step % plan.state_steps == 0)


def needs_final_validation(plan: TrainPlan, step: int) -> bool:
    """Whether the run's end still needs its validation (with ``model_step``): not when the last
    step was a ``valid_steps`` step, which validated and saved it already."""
    return step % plan.valid_steps != 0


def best_model_change(r1: float, best_r1: float, best_step: int) -> str:
    """How a validation's text-to-video ``r1`` compares with the best so far (``best_step`` < 0:
    none yet): ``"first"``, ``"better"``, ``"tie"`` (ties go to the later step, so it becomes the
    best) or ``"worse"`` (the best stays)."""
    if r1 < best_r1:
        return "worse"
    if best_step < 0:
        return "first"
    return "better" if r1 > best_r1 else "tie"
