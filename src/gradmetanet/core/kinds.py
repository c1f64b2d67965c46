"""Site kinds: what a captured map's factors are and how its parameters' gradients follow from them.

Every site records ``a`` (what it reads) and ``g`` (the gradient of what it writes) per example and
token. The *kind* says what ``a`` holds, which parameters the site declares (with their axis labels)
and how their per-example gradients are formed:

================  ===============================  ==============================================
kind              ``a`` per token                  parameters and per-example gradients
================  ===============================  ==============================================
``linear``        the input ``x`` ``[d_in]``       ``W (row out, col in)``: ``sum_t g_t x_t^T``;
                                                   ``b (row out)``: ``sum_t g_t``
``layernorm``     the normalised input ``x_hat``   ``gain (diag s)``: ``sum_t g_t * x_hat_t``;
                  ``[d]`` (in = out space)         ``bias (row s)``: ``sum_t g_t``
``linear_t``      the input ``x`` ``[d_in]``       ``W (col in, row out)`` stored ``[in, out]`` (GPT-2's
                                                   ``Conv1D``): ``sum_t x_t g_t^T``; bias as linear
``embedding``     the token id ``[1]`` (int64)     ``E (col vocab, row out)`` ``[V, d]``:
                                                   ``sum_t onehot(id_t) g_t^T`` by ``index_add``
================  ===============================  ==============================================

A site may own a block of rows of its tensors (``Site.rows``): the Q, K and V sites of an
``nn.MultiheadAttention`` share ``in_proj_weight`` and each owns a third of it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .axes import Axis, Parameter
from .groups import Element

if TYPE_CHECKING:                                                  # pragma: no cover
    from .spec import Site

__all__ = ["SiteKind", "site_kind", "SITE_KINDS"]


class SiteKind:
    """How a site of one kind turns its factors into parameter gradients (see the module docstring)."""

    name = "linear"

    def parameters(self, site: "Site") -> tuple["Parameter", ...]:
        """The parameters the site declares: weight ``(row out, col in)`` and bias ``(row out)``."""
        params = [Parameter(site.weight, (Axis("row", site.out_space), Axis("col", site.in_space)), site.rows)]
        if site.bias is not None:
            params.append(Parameter(site.bias, (Axis("row", site.out_space),), site.rows))
        return tuple(params)

    def a_width(self, site: "Site", d_in: int) -> int:
        """The last axis of ``a`` for a site reading ``d_in`` neurons."""
        return d_in

    def check_factors(self, a: torch.Tensor, g: torch.Tensor) -> str | None:
        """A description of what is wrong with ``a`` (beyond its shape), or ``None``."""
        return None if a.dtype == g.dtype else (f"activations are {a.dtype} but output_grads {g.dtype}; cast both "
                                                "to one dtype (GradientCapture promotes them under autocast)")

    def per_example(self, site: "Site", a: torch.Tensor, g: torch.Tensor, d_in: int) -> dict[str, torch.Tensor]:
        """``{param: [b, *part shape]}``: the gradient of each example's own loss."""
        out = {site.weight: torch.einsum("bto,bti->boi", g, a)}
        if site.bias is not None:
            out[site.bias] = g.sum(1)
        return out

    def summed(self, site: "Site", a: torch.Tensor, g: torch.Tensor, d_in: int) -> dict[str, torch.Tensor]:
        """``{param: [*part shape]}``: the sum over examples of :meth:`per_example`, without forming it."""
        out = {site.weight: torch.einsum("bto,bti->oi", g, a)}
        if site.bias is not None:
            out[site.bias] = g.sum((0, 1))
        return out

    def squared_norms(self, site: "Site", a: torch.Tensor, g: torch.Tensor, d_in: int) -> dict[str, torch.Tensor]:
        """``{param: [b]}`` squared per-example gradient norms; the weight's by ``<G G^T, A A^T>`` (ghost norm)."""
        if a.shape[1] == 1:
            weight = g[:, 0].square().sum(-1) * a[:, 0].square().sum(-1)
        else:
            weight = (g @ g.transpose(1, 2) * (a @ a.transpose(1, 2))).sum((1, 2))
        out = {site.weight: weight}
        if site.bias is not None:
            out[site.bias] = g.sum(1).square().sum(-1)
        return out

    def dense_activation(self, site: "Site", a: torch.Tensor, d_in: int) -> torch.Tensor:
        """``[..., d_in]``: the per-neuron activation a metanetwork reads on the in-space."""
        return a

    def transform_activation(self, site: "Site", a: torch.Tensor, element: "Element | None") -> torch.Tensor:
        """``a`` moved by the in-space's group element."""
        return a if element is None else element.act(a, -1)


class TransposedLinearKind(SiteKind):
    """A linear map whose weight is stored ``[in, out]`` (``y = x W + b``: Hugging Face's ``Conv1D``)."""

    name = "linear_t"

    def parameters(self, site: "Site") -> tuple["Parameter", ...]:
        params = [Parameter(site.weight, (Axis("col", site.in_space), Axis("row", site.out_space)))]
        if site.bias is not None:
            params.append(Parameter(site.bias, (Axis("row", site.out_space),)))
        return tuple(params)

    def per_example(self, site, a, g, d_in):
        out = super().per_example(site, a, g, d_in)
        out[site.weight] = out[site.weight].transpose(1, 2)
        return out

    def summed(self, site, a, g, d_in):
        out = super().summed(site, a, g, d_in)
        out[site.weight] = out[site.weight].T
        return out


class LayerNormKind(SiteKind):
    """``y = gain * x_hat + bias`` with ``x_hat`` the normalised input: one space, a diagonal gain."""

    name = "layernorm"

    def parameters(self, site: "Site") -> tuple["Parameter", ...]:
        params = [Parameter(site.weight, (Axis("diag", site.out_space),))]
        if site.bias is not None:
            params.append(Parameter(site.bias, (Axis("row", site.out_space),)))
        return tuple(params)

    def per_example(self, site, a, g, d_in):
        out = {site.weight: (g * a).sum(1)}
        if site.bias is not None:
            out[site.bias] = g.sum(1)
        return out

    def summed(self, site, a, g, d_in):
        return {k: v.sum(0) for k, v in self.per_example(site, a, g, d_in).items()}

    def squared_norms(self, site, a, g, d_in):
        return {k: v.square().sum(-1) for k, v in self.per_example(site, a, g, d_in).items()}


class EmbeddingKind(SiteKind):
    """A lookup ``y_t = E[id_t]``: the linear map of a one-hot input, stored transposed (``E [V, d]``).

    ``a`` holds the token ids ``[b, T, 1]`` (int64); no one-hot is formed for the gradients. The
    per-neuron activation a metanetwork reads on the vocabulary space is the one-hot (that tensor
    has the size of the network's output features anyway).
    """

    name = "embedding"

    def parameters(self, site: "Site") -> tuple["Parameter", ...]:
        return (Parameter(site.weight, (Axis("col", site.in_space), Axis("row", site.out_space))),)

    def a_width(self, site, d_in):
        return 1

    def check_factors(self, a, g):
        if a.dtype not in (torch.int64, torch.int32):
            return f"an embedding site's activations are token ids (int64), got {a.dtype}"
        return None

    @staticmethod
    def _valid(a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids ``[b, T]`` with padding (``-1``) sent to row 0, and ``g`` zeroed there (padding gets no gradient)."""
        ids = a[..., 0]
        valid = ids >= 0
        return ids.clamp_min(0), g * valid.unsqueeze(-1).to(g.dtype)

    def per_example(self, site, a, g, d_in):
        ids, g = self._valid(a, g)
        b, T, d = g.shape
        rows = (ids + d_in * torch.arange(b, device=a.device)[:, None]).reshape(-1)
        grad = g.new_zeros(b * d_in, d).index_add_(0, rows, g.reshape(-1, d))
        return {site.weight: grad.view(b, d_in, d)}

    def summed(self, site, a, g, d_in):
        ids, g = self._valid(a, g)
        d = g.shape[-1]
        return {site.weight: g.new_zeros(d_in, d).index_add_(0, ids.reshape(-1), g.reshape(-1, d))}

    def squared_norms(self, site, a, g, d_in):
        """``sum_{t, t'} [id_t = id_t'] <g_t, g_t'>`` (as Opacus' embedding norm), never a ``[V, d]`` per example."""
        ids, g = self._valid(a, g)
        same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(g.dtype)
        return {site.weight: (same * (g @ g.transpose(1, 2))).sum((1, 2))}

    def dense_activation(self, site, a, d_in):
        ids = a[..., 0]
        hot = torch.nn.functional.one_hot(ids.clamp_min(0), d_in) * (ids >= 0).unsqueeze(-1)
        return hot.to(torch.get_default_dtype())

    def transform_activation(self, site, a, element):
        if element is not None:
            raise ValueError("an embedding's vocabulary space is fixed; a group element cannot move token ids")
        return a


class TableKind(EmbeddingKind):
    """A table ``[1, V, d]`` added to the tokens (ViT's ``cls_token`` and ``position_embeddings``): an embedding
    whose weight has a leading axis of size 1, ``(fixed 1, col vocab, row out)``; ``a`` holds the row read at
    each token (the position), as for an embedding."""

    name = "table"

    def parameters(self, site):
        return (Parameter(site.weight, (Axis("fixed", size=1), Axis("col", site.in_space), Axis("row", site.out_space))),)

    def per_example(self, site, a, g, d_in):
        return {k: v.unsqueeze(1) for k, v in super().per_example(site, a, g, d_in).items()}

    def summed(self, site, a, g, d_in):
        return {k: v.unsqueeze(0) for k, v in super().summed(site, a, g, d_in).items()}


class ConvKind(SiteKind):
    """A convolution as a linear map of input patches: ``a`` holds the unfolded patches ``[b, L, d_in k]`` (``k``
    kernel taps, channel-major as ``F.unfold`` gives them) at the ``L`` output positions, ``g`` the output
    gradient per position ``[b, L, d_out]``; weight ``(row out, col in, fixed kh, fixed kw)``, bias ``(row out)``."""

    name = "conv"

    def parameters(self, site):
        params = [Parameter(site.weight, (Axis("row", site.out_space), Axis("col", site.in_space),
                                          *(Axis("fixed", size=k) for k in site.kernel)))]
        if site.bias is not None:
            params.append(Parameter(site.bias, (Axis("row", site.out_space),)))
        return tuple(params)

    def a_width(self, site, d_in):
        return d_in * math.prod(site.kernel)

    def per_example(self, site, a, g, d_in):
        out = super().per_example(site, a, g, d_in)
        out[site.weight] = out[site.weight].view(g.shape[0], g.shape[-1], d_in, *site.kernel)
        return out

    def summed(self, site, a, g, d_in):
        out = super().summed(site, a, g, d_in)
        out[site.weight] = out[site.weight].view(g.shape[-1], d_in, *site.kernel)
        return out

    def dense_activation(self, site, a, d_in):
        return a.view(*a.shape[:-1], d_in, -1).mean(-1)

    def transform_activation(self, site, a, element):
        if element is None:
            return a
        return element.act(a.view(*a.shape[:-1], -1, math.prod(site.kernel)), -2).reshape(a.shape)


SITE_KINDS: dict[str, SiteKind] = {k.name: k for k in (SiteKind(), TransposedLinearKind(), LayerNormKind(), EmbeddingKind(),
                                                      TableKind(), ConvKind())}


def site_kind(name: str) -> SiteKind:
    """The :class:`SiteKind` called ``name``; raises ``ValueError`` naming the known kinds."""
    if name not in SITE_KINDS:
        raise ValueError(f"unknown site kind {name!r}; known kinds: {sorted(SITE_KINDS)}")
    return SITE_KINDS[name]
