"""Deprecated alias (until 1.0) of the package layout before version 0.9: GradMetaNet and its baselines now live in
:mod:`gradmetanet.metanets`, the normalisers in :mod:`gradmetanet.features`. Imports of the names below keep
working; submodules (``gradmetanet.nn.layers``) moved with them."""

from ..features import GradientScale, NeuronNormaliser, WeightSpaceNormaliser
from ..metanets import (MLP, BatchAsymmetric, GradMetaNet, GradMetaNetPlusPlus, InvariantHead, MLPConcat,
                        NeuronAsymmetric, NeuronLayer, ProductHead, SetNeuronLayer, SetPool, SetProductHead,
                        WeightSpaceNet, as_gradient_batch, weight_space_inputs)

__all__ = [
    "BatchAsymmetric", "GradMetaNet", "GradMetaNetPlusPlus", "InvariantHead", "MLP", "MLPConcat", "NeuronNormaliser",
    "GradientScale", "NeuronAsymmetric", "NeuronLayer", "ProductHead", "SetNeuronLayer", "SetPool", "SetProductHead",
    "WeightSpaceNet", "WeightSpaceNormaliser", "as_gradient_batch", "weight_space_inputs",
]
