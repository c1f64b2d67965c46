"""gradmetanet: learning on the gradients and weights of neural networks."""

from .capture import CaptureError, Extractor, GradientCapture, GradientSet, explain, functional_factors, register_extractor, spec_of
from .core import (GL, Axis, Blocks, Group, NetworkSpec, Parameter, Perm, ScalePerm, SignPerm, Site, Space, Trivial,
                   UnsupportedModuleError)
from .features import GradientBatch
from .moved import install as _install_moved_modules
from .provenance import package_version

__all__ = [
    "Axis", "Blocks", "CaptureError", "Extractor", "GL", "GradientBatch", "GradientCapture", "GradientSet", "Group",
    "NetworkSpec", "Parameter", "Perm", "ScalePerm", "SignPerm", "Site", "Space", "Trivial", "UnsupportedModuleError",
    "explain", "functional_factors", "register_extractor", "spec_of",
]
__version__ = package_version()
_install_moved_modules()
