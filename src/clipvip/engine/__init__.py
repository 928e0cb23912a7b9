"""Training and evaluation apps' shared machinery: one loop, one evaluator, precision, optimizer."""
from clipvip.engine.evaluate import evaluate_all, format_results_table, write_results
from clipvip.engine.trainer import Trainer, TrainingStopped, TrainPlan
from clipvip.engine.optim import build_optimizer, learning_rate_at, lr_multiplier, param_groups
from clipvip.precision import autocast, grad_scaler, precision_from_config

__all__ = [
    "Trainer", "TrainPlan", "TrainingStopped", "evaluate_all", "format_results_table", "write_results",
    "build_optimizer", "learning_rate_at", "lr_multiplier", "param_groups", "autocast", "grad_scaler",
    "precision_from_config",
]
