"""Learned optimizers on (decomposed) gradients: features, update rules, torch.optim wrappers, PES."""

from .features import N_FEATURES, parameter_features, time_features
from .optimizers import (LearnedOptimizer, NetworkOptimizer, UpdateRule, deepsets_rule, gradmetanet_ds_rule,
                         gradmetanet_unf_rule, learnable_sgdm, unf_rule)
from .rule_files import available, describe, load_rule, pretrained, save_rule
from .pes import PES, MetaTrainer, PESConfig, TruncatedInnerRuns
from .task_family import FamilyRuns, TaskFamily, task_family
from .tasks import (DigitsMLPTask, LinearRegressionTask, MLPClassificationTask, Task, cifar_task,
                    classification_task, fashion_mnist_task)

__all__ = ["FamilyRuns", "TaskFamily", "classification_task", "task_family", "DigitsMLPTask", "LearnedOptimizer", "LinearRegressionTask", "MLPClassificationTask", "cifar_task",
           "fashion_mnist_task", "MetaTrainer", "N_FEATURES",
           "NetworkOptimizer", "PES", "PESConfig", "Task", "TruncatedInnerRuns", "UpdateRule", "deepsets_rule",
           "gradmetanet_ds_rule", "gradmetanet_unf_rule", "learnable_sgdm", "parameter_features", "time_features",
           "unf_rule", "available", "describe", "load_rule", "pretrained", "save_rule"]
