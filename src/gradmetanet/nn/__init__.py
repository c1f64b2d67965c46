"""Metanetworks on gradients: GradMetaNet, GradMetaNet++, their blocks, heads and baselines."""

from .baselines import BatchAsymmetric, MLPConcat, NeuronAsymmetric, WeightSpaceNet, weight_space_inputs
from .normalise import GradientScale, NeuronNormaliser, WeightSpaceNormaliser
from .gradmetanet import GradMetaNet, GradMetaNetPlusPlus, as_gradient_batch
from .heads import InvariantHead, ProductHead, SetProductHead
from .layers import MLP, NeuronLayer, SetNeuronLayer, SetPool

__all__ = [
    "BatchAsymmetric", "GradMetaNet", "GradMetaNetPlusPlus", "InvariantHead", "MLP", "MLPConcat", "NeuronNormaliser",
    "GradientScale", "NeuronAsymmetric", "NeuronLayer", "ProductHead", "SetNeuronLayer", "SetPool", "SetProductHead",
    "WeightSpaceNet", "WeightSpaceNormaliser", "as_gradient_batch", "weight_space_inputs",
]
