"""Learned optimizers on (decomposed) gradients: features, update rules, torch.optim wrappers, PES."""

from .features import N_FEATURES, parameter_features, time_features
from .optimizers import (GradMetaNetOptimizer, GradMetaNetRule, LearnedOptimizer, UpdateRule, deepsets_rule,
                         learnable_sgdm)
from .pes import PES, MetaTrainer, PESConfig, TruncatedInnerRuns
from .tasks import DigitsMLPTask, LinearRegressionTask, Task

__all__ = ["DigitsMLPTask", "GradMetaNetOptimizer", "GradMetaNetRule", "LearnedOptimizer", "LinearRegressionTask",
           "MetaTrainer", "N_FEATURES", "PES", "PESConfig", "Task", "TruncatedInnerRuns", "UpdateRule",
           "deepsets_rule", "learnable_sgdm", "parameter_features", "time_features"]
