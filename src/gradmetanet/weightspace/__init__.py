"""Weight-space features and the equivariant layers generated from a spec's axis labels."""

from .features import WeightSpaceFeatures, flatten_weights, unflatten_weights
from .layers import LINEAR_SIGNATURES, TRANSFORMER_SIGNATURES, Signature, WeightSpaceLayer

__all__ = ["LINEAR_SIGNATURES", "TRANSFORMER_SIGNATURES", "Signature", "WeightSpaceFeatures", "WeightSpaceLayer", "flatten_weights", "unflatten_weights"]
