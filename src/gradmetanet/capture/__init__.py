"""Capture of decomposed per-example gradients: a registry of extractors keyed by module type,
hooks that record them during an ordinary backward, and a functional extractor for vmap."""

from .functional import functional_factors, functional_features
from ..errors import CaptureError
from .gradients import GradientSet, LossReduction
from .hooks import GradientCapture
from .registry import Extractor, LinearExtractor, extractor_for, register_extractor, registered_types
from .trace import Trace, explain, spec_of

__all__ = ["CaptureError", "Extractor", "GradientCapture", "GradientSet", "LossReduction", "LinearExtractor", "extractor_for", "functional_factors", "functional_features",
           "register_extractor", "registered_types", "Trace", "explain", "spec_of"]
