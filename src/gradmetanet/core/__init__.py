"""The core: groups acting on neuron axes, network specs (spaces, parameters, sites), data-flow
spec building and incidence features. Everything else in gradmetanet imports from here."""

from .groups import GL, Blocks, Element, Group, Identity, Matrix, Monomial, Perm, ScalePerm, SignPerm, Trivial
from .codes import neuron_codes, neuron_ids, sinusoidal_codes
from .incidence import neuron_tensor
from .spec import Axis, NetworkSpec, Parameter, Site, Space, SpecElement, UnsupportedModuleError, group_of_activation

__all__ = ["Axis", "Blocks", "Element", "GL", "Group", "Identity", "Matrix", "Monomial", "NetworkSpec", "Parameter",
           "Perm", "ScalePerm", "SignPerm", "Site", "Space", "SpecElement", "Trivial", "UnsupportedModuleError",
           "group_of_activation", "neuron_codes", "neuron_ids", "neuron_tensor", "sinusoidal_codes"]
