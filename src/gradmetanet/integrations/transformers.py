"""Hugging Face ``transformers``: the module types its model families are built from.

- ``Conv1D`` (GPT-2, GPT-J's relatives): a linear map whose weight is stored ``[in, out]``, site kind
  ``linear_t``;
- every ``*RMSNorm`` (Llama, Mistral, Qwen, Gemma, ...): weight and ``variance_epsilon`` (or ``eps``), normalised
  in float32 as the modules do (:class:`~gradmetanet.capture.registry.RMSNormExtractor`);
- ``ViTEmbeddings``: the patch projection (a convolution whose outputs are the tokens), the ``cls_token`` and
  the ``position_embeddings`` table, as three sites writing the residual stream.

Imported by :func:`gradmetanet.capture.registry.extractor_for` when it meets a module of ``transformers``; each
type found is registered, so the lookup runs once per type.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..capture.registry import Extractor, Layout, RMSNormExtractor, Tap, register_extractor
from ..core.groups import Trivial
from ..core.spec import Site, Space, UnsupportedModuleError

__all__ = ["Conv1DExtractor", "ViTEmbeddingsExtractor", "extractor_for"]


class Conv1DExtractor(Extractor):
    """``Conv1D``: ``y = x W + b`` with ``W: [in, out]``; ``a`` is the input, ``g`` the output gradient."""

    kind = "linear_t"

    def widths(self, module: nn.Module) -> tuple[int, int]:
        return module.weight.shape[0], module.weight.shape[1]

    def activation(self, module: nn.Module, inputs: tuple, output):
        return inputs[0]


class ViTEmbeddingsExtractor(Extractor):
    """ViT's embeddings as three sites that write the residual stream: ``{path}:patch`` (the patch projection, kind
    ``conv``: its output positions are the patch tokens), ``{path}:cls`` and ``{path}:pos`` (kind ``table``: the
    ``[1, 1, d]`` cls token read at token 0, the ``[1, T + 1, d]`` position table read at every token).
    Composite: during a capture its forward is this equivalent computation (same outputs, same dropout)."""

    composite = True

    def widths(self, module: nn.Module) -> tuple[int, int]:
        projection = module.patch_embeddings.projection
        return projection.in_channels, projection.out_channels

    def check_module(self, path: str, module: nn.Module) -> None:
        projection = module.patch_embeddings.projection
        if not isinstance(projection, nn.Conv2d) or projection.groups != 1 or isinstance(projection.padding, str):
            raise UnsupportedModuleError(f"ViTEmbeddings {path!r}: its patch projection is not a plain Conv2d")

    def layout(self, path: str, module: nn.Module) -> Layout:
        projection = module.patch_embeddings.projection
        d, positions = projection.out_channels, module.position_embeddings.shape[1]
        conv = f"{path}.patch_embeddings.projection"
        sites = (Site(f"{path}:patch", "input:0", "output", f"{conv}.weight",
                      f"{conv}.bias" if projection.bias is not None else None, "conv",
                      kernel=tuple(projection.kernel_size)),
                 Site(f"{path}:cls", "cls", "output", f"{path}.cls_token", None, "table"),
                 Site(f"{path}:pos", "positions", "output", f"{path}.position_embeddings", None, "table"))
        return Layout(sites, {"input:0": projection.in_channels, "cls": 1, "positions": positions, "output": d},
                      spaces=(Space("cls", 1, Trivial()), Space("positions", positions, Trivial())),
                      limits={"input:0": "none"})

    def example_input(self, module: nn.Module) -> tuple:
        projection = module.patch_embeddings.projection
        height, width = module.patch_embeddings.image_size
        return (torch.randn(2, projection.in_channels, height, width, dtype=projection.weight.dtype,
                            device=projection.weight.device),)

    def forward(self, module: nn.Module, tap: Tap, pixel_values: torch.Tensor, bool_masked_pos=None,
                interpolate_pos_encoding: bool = False) -> torch.Tensor:
        if bool_masked_pos is not None or interpolate_pos_encoding:
            raise UnsupportedModuleError("ViT with bool_masked_pos or interpolate_pos_encoding is not captured "
                                         "(the mask token and an interpolated table are not described)")
        b, _, height, width = pixel_values.shape
        if (height, width) != tuple(module.patch_embeddings.image_size):
            raise ValueError(f"Input image size ({height}*{width}) doesn't match model "
                             f"({module.patch_embeddings.image_size[0]}*{module.patch_embeddings.image_size[1]}).")
        projection = module.patch_embeddings.projection
        patches = F.unfold(pixel_values, projection.kernel_size, projection.dilation, projection.padding,
                           projection.stride).transpose(1, 2)                                  # [b, L, C k]
        tokens = projection(pixel_values).flatten(2).transpose(1, 2)                           # [b, L, d]
        tokens = tap("patch", patches, tokens)
        zeros = torch.zeros(b, 1, 1, dtype=torch.long, device=pixel_values.device)
        cls = tap("cls", zeros, module.cls_token.expand(b, -1, -1))
        table = module.position_embeddings
        ids = torch.arange(table.shape[1], device=pixel_values.device).view(1, -1, 1).expand(b, -1, -1)
        positions = tap("pos", ids, table.expand(b, -1, -1))
        return module.dropout(torch.cat((cls, tokens), dim=1) + positions)


def extractor_for(module: nn.Module) -> Extractor | None:
    """The extractor of a ``transformers`` module type (registered on first sight), or ``None``."""
    if isinstance(module, Conv1D):
        extractor: Extractor = Conv1DExtractor()
    elif type(module).__name__ == "ViTEmbeddings":
        extractor = ViTEmbeddingsExtractor()
    elif type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), nn.Parameter):
        name = next((n for n in ("variance_epsilon", "eps", "epsilon") if hasattr(module, n)), None)
        if name is None:
            return None
        extractor = RMSNormExtractor(name, upcast=True)
    else:
        return None
    register_extractor(type(module), extractor)
    return extractor
