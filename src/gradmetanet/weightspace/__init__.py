"""Deprecated alias (until 1.0) of the package layout before version 0.9: weight-space features, the graph view and
function-preserving changes now live in :mod:`gradmetanet.features`, the weight-space layers and backbones in
:mod:`gradmetanet.metanets`. Imports of the names below keep working; submodules moved with them."""

from ..features import NetworkGraph, WeightSpaceFeatures, flatten_weights, random_symmetry, unflatten_weights, widen
from ..metanets import (GMN, LINEAR_SIGNATURES, TRANSFORMER_SIGNATURES, DWSNet, ScaleGMN, Signature,
                        WeightSpaceLayer)

__all__ = ["DWSNet", "GMN", "LINEAR_SIGNATURES", "NetworkGraph", "ScaleGMN", "Signature", "TRANSFORMER_SIGNATURES",
           "WeightSpaceFeatures", "WeightSpaceLayer", "flatten_weights", "random_symmetry", "unflatten_weights", "widen"]
