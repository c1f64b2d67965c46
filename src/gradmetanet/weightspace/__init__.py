"""Weight-space features, the equivariant layers generated from a spec's axis labels, the graph view,
the weight-space backbones (DWSNet, GMN, ScaleGMN) and function-preserving changes of networks."""

from .features import WeightSpaceFeatures, flatten_weights, unflatten_weights
from .graph import NetworkGraph
from .layers import LINEAR_SIGNATURES, TRANSFORMER_SIGNATURES, Signature, WeightSpaceLayer
from .backbones import DWSNet, GMN, ScaleGMN
from .transforms import random_symmetry, widen

__all__ = ["DWSNet", "GMN", "LINEAR_SIGNATURES", "NetworkGraph", "ScaleGMN", "Signature", "TRANSFORMER_SIGNATURES",
           "WeightSpaceFeatures", "WeightSpaceLayer", "flatten_weights", "random_symmetry", "unflatten_weights", "widen"]
