"""Every base network the library learns on or trains: MLPs with a choice of activation (one registry of activation
names), SIRENs, the Small CNN Zoo's CNN, the causal transformer of the language-model tasks."""

from .cnn import small_cnn_zoo_template
from .mlp import ACTIVATIONS, Sine, make_mlp
from .siren import siren_module, siren_spec, siren_template
from .transformer import CausalTransformer

__all__ = ["ACTIVATIONS", "CausalTransformer", "Sine", "make_mlp", "siren_module", "siren_spec", "siren_template",
           "small_cnn_zoo_template"]
