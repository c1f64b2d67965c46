"""Deprecated alias (until 1.0) of the 0.9.0 package layout: the one-pass fine-tuner now lives in
:mod:`gradmetanet.metanets`, the zoo objective and SGD fine-tuning in :mod:`gradmetanet.zoos`. Imports of the
names below keep working; its submodules moved with them (``gradmetanet.moved``)."""

from ..metanets import OnePassFineTuner, gradient_features
from ..zoos import ZooMetrics, evaluate_networks, l1_norms, objective, sgd_finetune

__all__ = ["OnePassFineTuner", "gradient_features", "ZooMetrics", "evaluate_networks", "l1_norms", "objective",
           "sgd_finetune"]
