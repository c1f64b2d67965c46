"""Learned optimizers on (decomposed) gradients: features, update rules and torch.optim wrappers."""

from .features import N_FEATURES, parameter_features, time_features
from .optimizers import LearnedOptimizer, UpdateRule, deepsets_rule, learnable_sgdm

__all__ = ["LearnedOptimizer", "N_FEATURES", "UpdateRule", "deepsets_rule", "learnable_sgdm",
           "parameter_features", "time_features"]
