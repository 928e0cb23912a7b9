"""Run logging on the main process: log/log.txt, log/metrics.jsonl, TensorBoard, wandb."""
from __future__ import annotations

import json
import math
import os
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
