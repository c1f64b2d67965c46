"""Fully-amortized fine-tuning (Kuipers et al.): a metanetwork maps a trained network's weights to better weights
in one forward pass, against fine-tuning every network by SGD on the same objective."""

from .objective import ZooMetrics, evaluate_networks, l1_norms, objective
from .model import OnePassFineTuner, gradient_features
from .sgd import sgd_finetune

__all__ = ["OnePassFineTuner", "gradient_features", "ZooMetrics", "evaluate_networks", "l1_norms", "objective", "sgd_finetune"]
