"""The training engine: one loop and its parts (step, schedule, state, signals), one evaluator."""
from clipvip.engine.evaluate import evaluate_all, format_results_table, write_results
from clipvip.engine.optim import (OptimizerSettings, build_optimizer, learning_rate_at, lr_multiplier,
                                  param_groups)
from clipvip.engine.schedule import TrainPlan
from clipvip.engine.step import OptimizerStep, StepResult, StepSettings
from clipvip.engine.trainer import Trainer, TrainerSettings, TrainingInterrupted, TrainingStopped

__all__ = [
    "Trainer", "TrainerSettings", "TrainPlan", "TrainingInterrupted", "TrainingStopped", "OptimizerStep",
    "StepResult", "StepSettings",
    "evaluate_all", "format_results_table", "write_results", "OptimizerSettings", "build_optimizer",
    "learning_rate_at", "lr_multiplier", "param_groups",
]
