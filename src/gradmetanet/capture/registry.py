"""The capture registry: which module types are sites, and how their factors are read.

An :class:`Extractor` tells, for one module type, the widths and parameters of the site it
forms, the tensor whose last axis is the activation ``a`` it reads, and the tensor whose
gradient is the output gradient ``g`` it writes. Hooks (:class:`~gradmetanet.GradientCapture`),
the functional extractor (:func:`~gradmetanet.capture.functional_factors`) and the data-flow
spec builder all consult this registry, so a new network kind arrives as one extractor::

    class MyLinearExtractor(Extractor):
        kind = "linear"
        def widths(self, module): return module.d_in, module.d_out
        ...
    register_extractor(MyLinear, MyLinearExtractor())

Lookup is by exact type first, then along the module's class hierarchy.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.spec import Site, UnsupportedModuleError

__all__ = ["Extractor", "LinearExtractor", "register_extractor", "extractor_for", "registered_types"]


class Extractor:
    """How one module type is captured (see the module docstring). Subclass and register it."""

    kind: str = "linear"

    def widths(self, module: nn.Module) -> tuple[int, int]:
        """``(d_in, d_out)``: the sizes of the spaces the site reads and writes."""
        raise NotImplementedError

    def site(self, path: str, module: nn.Module, in_space: str, out_space: str) -> Site:
        """The :class:`Site` of the module at ``path`` (its parameter names as in ``named_parameters``)."""
        prefix = f"{path}." if path else ""
        has_bias = getattr(module, "bias", None) is not None
        return Site(path, in_space, out_space, f"{prefix}weight", f"{prefix}bias" if has_bias else None, self.kind)

    def check_module(self, path: str, module: nn.Module) -> None:
        """Raise :class:`UnsupportedModuleError` when this module cannot be captured by hooks."""

    def activation(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        """``[..., d_in]``: what the site reads (batch and token axes lead, in the module's layout)."""
        raise NotImplementedError

    def output(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        """``[..., d_out]``: the tensor whose gradient is ``g`` (same leading axes as :meth:`activation`)."""
        return output


class LinearExtractor(Extractor):
    """``nn.Linear``: ``a`` is the input, ``g`` the gradient of the output; the site ``(row out, col in)``."""

    kind = "linear"

    def widths(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def check_module(self, path: str, module: nn.Module) -> None:
        if type(module).__name__ == "NonDynamicallyQuantizableLinear":
            raise UnsupportedModuleError(
                f"layer {path!r} is the out_proj of an nn.MultiheadAttention, which applies its weight "
                "functionally (F.multi_head_attention_forward) without calling the layer, so hooks on it never "
                "fire; attention is not capturable yet. Capture the surrounding nn.Linear layers with layers=[...].")

    def activation(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return inputs[0]


_REGISTRY: dict[type, Extractor] = {nn.Linear: LinearExtractor()}


def register_extractor(module_type: type, extractor: Extractor) -> None:
    """Make modules of ``module_type`` (and its subclasses without their own entry) capturable sites."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_extractor needs an nn.Module subclass, got {module_type!r}")
    if not isinstance(extractor, Extractor):
        raise TypeError(f"register_extractor needs an Extractor instance, got {type(extractor).__name__}")
    _REGISTRY[module_type] = extractor


def extractor_for(module: nn.Module) -> Extractor | None:
    """The extractor of ``module``'s type (exact type, then its base classes), or ``None``."""
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


def registered_types() -> list[type]:
    return list(_REGISTRY)
