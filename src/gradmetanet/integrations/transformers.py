"""Hugging Face ``transformers``: the module types its model families are built from.

- ``Conv1D`` (GPT-2, GPT-J's relatives): a linear map whose weight is stored ``[in, out]``, site kind
  ``linear_t``;
- every ``*RMSNorm`` (Llama, Mistral, Qwen, Gemma, ...): weight and ``variance_epsilon`` (or ``eps``), normalised
  in float32 as the modules do (:class:`~gradmetanet.capture.registry.RMSNormExtractor`).

Imported by :func:`gradmetanet.capture.registry.extractor_for` when it meets a module of ``transformers``; each
type found is registered, so the lookup runs once per type.
"""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..capture.registry import Extractor, RMSNormExtractor, register_extractor

__all__ = ["Conv1DExtractor", "extractor_for"]


class Conv1DExtractor(Extractor):
    """``Conv1D``: ``y = x W + b`` with ``W: [in, out]``; ``a`` is the input, ``g`` the output gradient."""

    kind = "linear_t"

    def widths(self, module: nn.Module) -> tuple[int, int]:
        return module.weight.shape[0], module.weight.shape[1]

    def activation(self, module: nn.Module, inputs: tuple, output):
        return inputs[0]


def extractor_for(module: nn.Module) -> Extractor | None:
    """The extractor of a ``transformers`` module type (registered on first sight), or ``None``."""
    if isinstance(module, Conv1D):
        extractor: Extractor = Conv1DExtractor()
    elif type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), nn.Parameter):
        name = next((n for n in ("variance_epsilon", "eps", "epsilon") if hasattr(module, n)), None)
        if name is None:
            return None
        extractor = RMSNormExtractor(name, upcast=True)
    else:
        return None
    register_extractor(type(module), extractor)
    return extractor
