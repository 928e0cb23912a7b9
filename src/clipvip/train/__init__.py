"""Training and evaluation apps' shared machinery: one loop, one evaluator, precision, optimizer."""
from .evaluate import evaluate_all, format_results_table, write_results
from .loop import Trainer, TrainingStopped, TrainPlan
from .optim import build_optimizer, learning_rate_at, lr_multiplier, param_groups
from .precision import autocast, grad_scaler, precision_from_config

__all__ = [
    "Trainer", "TrainPlan", "TrainingStopped", "evaluate_all", "format_results_table", "write_results",
    "build_optimizer", "learning_rate_at", "lr_multiplier", "param_groups", "autocast", "grad_scaler",
    "precision_from_config",
]
