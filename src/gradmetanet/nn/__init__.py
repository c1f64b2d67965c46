"""Metanetworks on gradients: GradMetaNet, GradMetaNet++, their blocks, heads and baselines."""

from .baselines import (BatchAsymmetric, MLPConcat, NeuronAsymmetric, WeightSpaceLayer, WeightSpaceNet,
                        unflatten_weight_space, weight_space_inputs)
from .encoding import neuron_codes, neuron_ids, sinusoidal_codes
from .gradmetanet import GradMetaNet, GradMetaNetPlusPlus, as_gradient_batch
from .heads import InvariantHead, ProductHead, SetProductHead
from .layers import MLP, NeuronLayer, SetNeuronLayer, SetPool

__all__ = [
    "BatchAsymmetric", "GradMetaNet", "GradMetaNetPlusPlus", "InvariantHead", "MLP", "MLPConcat",
    "NeuronAsymmetric", "NeuronLayer", "ProductHead", "SetNeuronLayer", "SetPool", "SetProductHead",
    "WeightSpaceLayer", "WeightSpaceNet", "as_gradient_batch", "neuron_codes", "neuron_ids", "sinusoidal_codes",
    "unflatten_weight_space", "weight_space_inputs",
]
