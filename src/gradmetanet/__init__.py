"""gradmetanet: learning on the gradients and weights of neural networks."""

from .capture import CaptureError, GradientCapture
from .batch import GradientBatch
from .gradients import GradientSet
from .spec import LinearSite, NetworkSpec, NeuronSpace, UnsupportedModuleError

__all__ = [
    "CaptureError",
    "GradientBatch",
    "GradientCapture",
    "GradientSet",
    "LinearSite",
    "NetworkSpec",
    "NeuronSpace",
    "UnsupportedModuleError",
]
__version__ = "0.1.0"
