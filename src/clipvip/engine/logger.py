"""Run logging on the main process: log/log.txt, log/metrics.jsonl, TensorBoard, wandb."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

from clipvip.logging_utils import LOGGER as ROOT_LOGGER
from clipvip.logging_utils import add_log_file, get_logger
from clipvip.files import atomic_write_text

LOGGER = get_logger("run")


def _scalar(value: Any):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN; keep it visible
    return value


@dataclass(frozen=True)
class LogSettings:
    """Where a run logs: ``output_dir/log/`` and the optional mirrors."""

    output_dir: str
    log_to_file: bool  # if_log2file: log/log.txt
    tensorboard: bool  # if_tb_log: log/tensorboard/
    wandb_project: str  # "" for none
    run_config: dict = field(default_factory=dict)  # the resolved config, as wandb records it

    @classmethod
    def from_config(cls, cfg) -> "LogSettings":
        return cls(output_dir=cfg.output_dir, log_to_file=bool(cfg.if_log2file), tensorboard=bool(cfg.if_tb_log),
                   wandb_project=cfg.wandb_project, run_config=cfg.to_dict())


@dataclass
class Throughput:
    """Clips/s of the run, of the step and of the loader, between two log lines: which is the wall.

    Per training step the loop adds its clips, the seconds it waited for their batches, and the
    seconds the loader's workers spent producing them (the batches' ``load_s``). ``metrics()``:

    * ``clips_per_s``: what the run did (every process together);
    * ``step_clips_per_s``: what the steps alone would do: the clips over the time not spent waiting;
    * ``loader_clips_per_s``: what the workers can deliver: ``workers`` loading in parallel, each at
      the rate it showed (clips over its seconds per batch);
    * ``data_wait_s``: seconds per step the loop waited for its batches.

    The loader is the wall where ``loader_clips_per_s`` is below ``step_clips_per_s`` (and
    ``data_wait_s`` is not near 0). On a GPU the host queues work ahead of the device, so a wait
    there can overlap the device's compute of earlier steps; the two rates are the comparison.
    """

    workers: int  # processes loading batches (DataLoader workers, or 1: the loop itself)
    world_size: int = 1  # processes that train: the rates are per process times this
    steps: int = 0
    clips: int = 0
    wait_s: float = 0.0
    load_s: float = 0.0
    start: float = field(default_factory=time.perf_counter)

    def add(self, clips: int, wait_s: float, load_s: float) -> None:
        self.steps, self.clips = self.steps + 1, self.clips + clips
        self.wait_s, self.load_s = self.wait_s + wait_s, self.load_s + load_s

    def metrics(self) -> dict:
        """The rates since the last call (or since this window began); starts the next window."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        clips = self.clips * self.world_size
        out = {"clips_per_s": clips / elapsed,
               "step_clips_per_s": clips / max(elapsed - self.wait_s, 1e-9),
               "loader_clips_per_s": clips * self.workers / self.load_s if self.load_s > 0 else None,
               "data_wait_s": self.wait_s / max(self.steps, 1)}
        self.steps, self.clips, self.wait_s, self.load_s = 0, 0, 0.0, 0.0
        self.start = time.perf_counter()
        return out


class RunLogger:
    """Writes one JSON object per logged step to ``log/metrics.jsonl`` and mirrors scalars to
    TensorBoard (``if_tb_log``) and Weights & Biases (``wandb_project``; offline unless
    ``WANDB_MODE`` says otherwise, so it needs neither network nor account)."""

    def __init__(self, settings: LogSettings, enabled: bool):
        self.enabled = enabled
        self.tb = None
        self.wandb_run = None
        if not enabled:
            return
        log_dir = os.path.join(settings.output_dir, "log")
        os.makedirs(log_dir, exist_ok=True)
        if settings.log_to_file:
            self._file_handler = add_log_file(os.path.join(log_dir, "log.txt"))
        self.metrics_path = os.path.join(log_dir, "metrics.jsonl")
        if settings.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # optional backend: imported when asked for

            self.tb = SummaryWriter(os.path.join(log_dir, "tensorboard"))
        if settings.wandb_project:
            import wandb  # optional backend

            self.wandb_run = wandb.init(project=settings.wandb_project, dir=log_dir, config=settings.run_config,
                                        mode=os.environ.get("WANDB_MODE", "offline"), resume="allow")

    def forget_after(self, step: int) -> None:
        """A resumed run repeats the steps after its last saved state: forget their old lines.

        Separate from the constructor so that the log file is open before the trainer resumes
        (and its "resumed from" line lands in ``log/log.txt``) while ``step`` is only known after.
        """
        if not self.enabled or not os.path.isfile(self.metrics_path):
            return
        with open(self.metrics_path, encoding="utf-8") as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write_text(self.metrics_path, "".join(kept))

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        numeric = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb is not None:
            for key, value in numeric.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(numeric, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.enabled and getattr(self, "_file_handler", None) is not None:
            ROOT_LOGGER.removeHandler(self._file_handler)
            self._file_handler.close()
