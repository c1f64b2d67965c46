"""Metanetworks: GradMetaNet and GradMetaNet++ (set and neuron layers, heads, attention) and their baselines on
gradients; the weight-space layers generated from a spec's axis labels and the weight-space backbones (DWSNet, GMN,
ScaleGMN)."""

from .backbones import DWSNet, GMN, ScaleGMN
from .editor import WeightEditor
from .gradient_input import WithGradientFeatures, join_gradient_features
from .finetuner import OnePassFineTuner, gradient_features
from .baselines import BatchAsymmetric, FlatMLP, FlatWeightMLP, MLPConcat, NeuronAsymmetric, WeightSpaceNet, weight_space_inputs
from .gradmetanet import GradMetaNet, GradMetaNetPlusPlus, as_gradient_batch
from .heads import InvariantHead, ProductHead, SetProductHead
from .layers import MLP, NeuronLayer, SetNeuronLayer, SetPool
from .training import FitResult, evaluate_mse, fit, fit_regression, has_converged
from .weightspace_layers import LINEAR_SIGNATURES, TRANSFORMER_SIGNATURES, Signature, WeightSpaceLayer

__all__ = [
    "BatchAsymmetric", "DWSNet", "FitResult", "OnePassFineTuner", "evaluate_mse", "fit", "fit_regression", "gradient_features", "has_converged", "FlatMLP", "FlatWeightMLP", "GMN", "GradMetaNet", "GradMetaNetPlusPlus", "InvariantHead", "LINEAR_SIGNATURES",
    "MLP", "MLPConcat", "NeuronAsymmetric", "NeuronLayer", "ProductHead", "ScaleGMN", "SetNeuronLayer", "SetPool",
    "SetProductHead", "Signature", "TRANSFORMER_SIGNATURES", "WeightEditor", "WeightSpaceLayer", "WeightSpaceNet", "WithGradientFeatures", "as_gradient_batch", "join_gradient_features",
    "weight_space_inputs",
]
