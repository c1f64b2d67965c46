"""gradmetanet: learning on the gradients and weights of neural networks."""

from .batch import GradientBatch
from .capture import CaptureError, Extractor, GradientCapture, explain, functional_factors, register_extractor, spec_of
from .core import (GL, Axis, Blocks, Group, NetworkSpec, Parameter, Perm, ScalePerm, SignPerm, Site, Space, Trivial,
                   UnsupportedModuleError)
from .gradients import GradientSet
from .provenance import package_version

__all__ = [
    "Axis", "Blocks", "CaptureError", "Extractor", "GL", "GradientBatch", "GradientCapture", "GradientSet", "Group",
    "NetworkSpec", "Parameter", "Perm", "ScalePerm", "SignPerm", "Site", "Space", "Trivial", "UnsupportedModuleError",
    "explain", "functional_factors", "register_extractor", "spec_of",
]
__version__ = package_version()
