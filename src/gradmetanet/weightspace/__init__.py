"""Weight-space features and the equivariant layers generated from a spec's axis labels."""

from .features import WeightSpaceFeatures, flatten_weights, unflatten_weights
from .layers import LINEAR_SIGNATURES, WeightSpaceLayer

__all__ = ["LINEAR_SIGNATURES", "WeightSpaceFeatures", "WeightSpaceLayer", "flatten_weights", "unflatten_weights"]
