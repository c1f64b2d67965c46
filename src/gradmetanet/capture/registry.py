"""The capture registry: which module types are sites, and how their factors are read.

An :class:`Extractor` tells, for one module type, the sites it forms (their kinds, widths and
parameters, as a :class:`Layout`), the tensor each site reads (``a``) and the tensor whose
gradient is the output gradient ``g`` it writes. Hooks (:class:`~gradmetanet.GradientCapture`),
the functional extractor (:func:`~gradmetanet.capture.functional_factors`) and the data-flow
spec builder all consult this registry, so a new network kind arrives as one extractor::

    class MyLinearExtractor(Extractor):
        kind = "linear"
        def widths(self, module): return module.d_in, module.d_out
        def activation(self, module, inputs, output): return inputs[0]
    register_extractor(MyLinear, MyLinearExtractor())

A module that forms several sites inside one forward (``nn.MultiheadAttention``: Q, K, V and the
output projection) is *composite*: during a capture its ``forward`` is replaced by the
extractor's :meth:`Extractor.forward`, an equivalent computation (same outputs, same parameters,
same random numbers) that hands every site's input and output to a ``tap``.

Lookup is by exact type first, then along the module's class hierarchy.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.groups import Blocks, Group, Perm, Trivial
from ..core.kinds import site_kind
from ..core.spec import Site, Space, UnsupportedModuleError

__all__ = ["Extractor", "LinearExtractor", "LayerNormExtractor", "EmbeddingExtractor", "Conv2dExtractor",
           "MultiheadAttentionExtractor", "RMSNormExtractor", "Layout", "Tap", "register_extractor", "extractor_for",
           "registered_types", "capturable_modules"]

#: ``tap(role, a [b, T, d_in], y [b, T, d_out]) -> y'``: what a composite forward reports each site to; the
#: site is ``{module path}:{role}``.
Tap = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Layout:
    """The sites one module forms, with spaces named by *local references*:

    ``"input:i"`` is the feature axis of the module's ``i``-th input tensor (:meth:`Extractor.inputs`),
    ``"output"`` that of its (first) output; any other name is a space internal to the module,
    declared in ``spaces`` with its group (the per-head spaces of attention). ``output`` names the
    reference the output's feature axis lives on (a LayerNorm writes back onto its input's space);
    ``limits`` caps the group of a reference (``"perm"``: a LayerNorm normalises across its space).
    """

    sites: tuple[Site, ...]
    sizes: dict[str, int]
    spaces: tuple[Space, ...] = ()
    output: str = "output"
    limits: dict[str, str] = field(default_factory=dict)


class Extractor:
    """How one module type is captured (see the module docstring). Subclass and register it."""

    kind: str = "linear"
    #: whether captures replace the module's forward by :meth:`forward` (several sites per call)
    composite: bool = False
    #: the axis of the module's input and output that its neurons lie on (-1: the last; -3: NCHW channels)
    feature_axis: int = -1

    def widths(self, module: nn.Module) -> tuple[int, int]:
        """``(d_in, d_out)``: the sizes of the spaces the site reads and writes."""
        raise NotImplementedError

    def has_site(self, module: nn.Module) -> bool:
        """Whether this module has parameters to capture (a LayerNorm without affine parameters has none)."""
        return True

    def site(self, path: str, module: nn.Module, in_space: str, out_space: str) -> Site:
        """The :class:`Site` of the module at ``path`` (its parameter names as in ``named_parameters``)."""
        prefix = f"{path}." if path else ""
        has_bias = getattr(module, "bias", None) is not None
        return Site(path, in_space, out_space, f"{prefix}weight", f"{prefix}bias" if has_bias else None, self.kind)

    def layout(self, path: str, module: nn.Module) -> Layout:
        """The module's sites in local references (default: one site from ``input:0`` to ``output``)."""
        d_in, d_out = self.widths(module)
        return Layout((self.site(path, module, "input:0", "output"),), {"input:0": d_in, "output": d_out})

    def inputs(self, args: tuple, kwargs: dict) -> list:
        """The input tensors whose feature axes ``input:i`` refer to (default: the first argument)."""
        return [args[0] if args else next(iter(kwargs.values()), None)]

    def example_input(self, module: nn.Module) -> tuple:
        """A small batched input the module accepts (used to trace a model that starts with it). Values do not
        matter; they are drawn by the tracer with the global random state saved and restored."""
        d_in, _ = self.widths(module)
        param = next(module.parameters())
        return (torch.randn(2, d_in, dtype=param.dtype, device=param.device),)

    def check_module(self, path: str, module: nn.Module) -> None:
        """Raise :class:`UnsupportedModuleError` when this module cannot be captured exactly (override to add
        checks; :meth:`validate` runs them with the shape checks every extractor gets)."""

    def validate(self, path: str, module: nn.Module) -> None:
        """:meth:`check_module`, then every parameter the layout declares against the module's own tensor: a
        declared shape that differs (a weight stored ``[in, out]`` declared with kind ``"linear"``) is refused,
        since its gradients would come out transposed or cut."""
        self.check_module(path, module)
        layout = self.layout(path, module)
        prefix = f"{path}." if path else ""
        for site in layout.sites:
            for param in site.parameters():
                declared = [axis.size if axis.role == "fixed" else layout.sizes.get(axis.space) for axis in param.axes]
                local = param.name[len(prefix):] if param.name.startswith(prefix) else param.name
                try:
                    tensor = module.get_parameter(local)
                except AttributeError:
                    raise UnsupportedModuleError(
                        f"the {type(self).__name__} of {path!r} ({type(module).__name__}) declares a parameter "
                        f"{param.name!r} that the module does not have") from None
                actual = list(tensor.shape)
                if param.rows is not None:
                    start, stop = param.rows
                    fits = stop <= actual[0] and stop - start == declared[0] and actual[1:] == declared[1:]
                else:
                    fits = actual == declared
                if not fits:
                    hint = ("; the module stores it [in, out]: use kind = 'linear_t'" if site.kind == "linear"
                            and actual == declared[::-1] else "")
                    raise UnsupportedModuleError(
                        f"the {type(self).__name__} of {path!r} ({type(module).__name__}) declares {param.name!r} "
                        f"with shape {declared} (kind {site.kind!r}: axes "
                        f"{[axis.role for axis in param.axes]}) but the tensor is {actual}{hint}")
        if not self.composite and len(layout.sites) == 1:
            self._probe(path, module, layout.sites[0], layout.sizes[layout.sites[0].in_space])

    def _probe(self, path: str, module: nn.Module, site: Site, d_in: int) -> None:
        """One forward and backward on :meth:`example_input`: the gradients the site's kind forms from ``(a, g)``
        must equal autograd's (a square weight stored ``[in, out]`` passes the shape check, not this one)."""
        prefix = f"{path}." if path else ""
        names = {p.name: p.name[len(prefix):] for p in site.parameters()}
        try:
            params = {local: module.get_parameter(local).detach().requires_grad_() for local in names.values()}
            with torch.random.fork_rng(devices=[]), torch.enable_grad():
                inputs = self.example_input(module)
                y = torch.func.functional_call(module, params, inputs)
                a, out = self.activation(module, inputs, y), self.output(module, inputs, y)
                r = torch.randn_like(out)
                expected = torch.autograd.grad((out * r).sum(), list(params.values()), allow_unused=True)
        except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError):
            return        # no runnable example input (or inside a torch.func transform): the shape checks stand alone
        a = a.detach().reshape(a.shape[0], -1, a.shape[-1])
        g = self.features_last(r)
        got = site_kind(site.kind).summed(site, a, g.reshape(g.shape[0], -1, g.shape[-1]), d_in)
        tol = 1e-3 if next(iter(params.values())).dtype in (torch.float32, torch.float64) else 3e-2
        for (name, local), want in zip(names.items(), expected):
            want = torch.zeros_like(params[local]) if want is None else want
            error = (got[name] - want).abs().max() / want.abs().max().clamp_min(1e-12)
            if error > tol:
                raise UnsupportedModuleError(
                    f"the {type(self).__name__} of {path!r} ({type(module).__name__}) gives factors whose kind "
                    f"{site.kind!r} does not reproduce autograd's gradient of {name!r} (relative error "
                    f"{float(error):.2g}): check activation()/output() and the kind (a weight stored [in, out], as "
                    "GPT-2's Conv1D, is kind 'linear_t')")

    def activation(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        """``[..., d_in]``: what the site reads (batch and token axes lead, in the module's layout)."""
        raise NotImplementedError

    def output(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        """``[..., d_out]``: the tensor whose gradient is ``g`` (same leading axes as :meth:`activation`)."""
        return output

    def features_last(self, t: torch.Tensor) -> torch.Tensor:
        """The output (or its gradient) with the site's features on the last axis (channels-first layouts move)."""
        return t

    def forward(self, module: nn.Module, tap: Tap, *args, **kwargs):
        """Composite extractors: the module's forward, reporting every site to ``tap`` (batch-major factors)."""
        raise NotImplementedError


class LinearExtractor(Extractor):
    """``nn.Linear``: ``a`` is the input, ``g`` the gradient of the output; the site ``(row out, col in)``."""

    kind = "linear"

    def widths(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def activation(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return inputs[0]


class LayerNormExtractor(Extractor):
    """``nn.LayerNorm`` over the last axis: ``a`` is the normalised input ``x_hat``, ``g`` the output gradient.

    The gain is a diagonal (``diag`` axis) and the module writes back onto the space it reads, whose
    group it limits to permutations (normalising across the neurons breaks per-neuron scales).
    """

    kind = "layernorm"

    def widths(self, module: nn.Module) -> tuple[int, int]:
        d = module.normalized_shape[-1]
        return d, d

    def has_site(self, module: nn.Module) -> bool:
        return module.weight is not None

    def check_module(self, path: str, module: nn.Module) -> None:
        if len(module.normalized_shape) != 1:
            raise UnsupportedModuleError(
                f"LayerNorm {path!r} normalises over {len(module.normalized_shape)} axes "
                f"{tuple(module.normalized_shape)}; capture supports a LayerNorm over the last (feature) axis only")

    def layout(self, path: str, module: nn.Module) -> Layout:
        d = module.normalized_shape[0]
        site = self.site(path, module, "input:0", "input:0")
        return Layout((site,), {"input:0": d}, output="input:0", limits={"input:0": "perm"})

    def activation(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        var, mean = torch.var_mean(x, -1, correction=0, keepdim=True)
        return (x - mean) * torch.rsqrt(var + module.eps)


class RMSNormExtractor(LayerNormExtractor):
    """RMSNorm over the last axis (``nn.RMSNorm``; Llama-style modules with ``weight`` and an epsilon attribute):
    ``a`` is ``x_hat = x / sqrt(mean(x^2) + eps)`` (``upcast``: in at least float32, then cast back, as Hugging
    Face's RMSNorms compute it for half-precision inputs; they compute float64 inputs in float32 too, an error of
    the model's own that ``a`` does not copy). Kind ``layernorm`` without a bias: a diagonal gain; the gradient of
    ``(1 + w) * x_hat`` (Gemma) is the same."""

    def __init__(self, eps_attribute: str = "eps", upcast: bool = False) -> None:
        self.eps_attribute, self.upcast = eps_attribute, upcast

    def widths(self, module: nn.Module) -> tuple[int, int]:
        d = module.weight.shape[-1]
        return d, d

    def check_module(self, path: str, module: nn.Module) -> None:
        if module.weight.dim() != 1:
            raise UnsupportedModuleError(f"RMSNorm {path!r} has a weight of shape {list(module.weight.shape)}; "
                                         "capture supports an RMSNorm over the last (feature) axis only")

    def layout(self, path: str, module: nn.Module) -> Layout:
        d = module.weight.shape[0]
        site = self.site(path, module, "input:0", "input:0")
        return Layout((site,), {"input:0": d}, output="input:0", limits={"input:0": "perm"})

    def activation(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        eps = getattr(module, self.eps_attribute, None)
        work = x.to(torch.promote_types(x.dtype, torch.float32)) if self.upcast else x
        eps = torch.finfo(work.dtype).eps if eps is None else eps
        return (work * torch.rsqrt(work.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


class EmbeddingExtractor(Extractor):
    """``nn.Embedding``: ``a`` is the token id (int64, ``-1`` for ``padding_idx``, which gets no gradient),
    ``g`` the gradient of the looked-up vector. The vocabulary is a fixed space of its own."""

    kind = "embedding"

    def widths(self, module: nn.Module) -> tuple[int, int]:
        return module.num_embeddings, module.embedding_dim

    def check_module(self, path: str, module: nn.Module) -> None:
        if module.max_norm is not None:
            raise UnsupportedModuleError(f"Embedding {path!r} has max_norm, which rescales its rows in place during "
                                         "the forward; per-example gradients of it are not supported")
        if module.scale_grad_by_freq:
            raise UnsupportedModuleError(f"Embedding {path!r} has scale_grad_by_freq, which scales the gradient by "
                                         "token counts of the whole batch (it couples the examples)")

    def layout(self, path: str, module: nn.Module) -> Layout:
        site = self.site(path, module, "vocab", "output")
        return Layout((site,), {"vocab": module.num_embeddings, "output": module.embedding_dim},
                      spaces=(Space("vocab", module.num_embeddings, Trivial()),))

    def example_input(self, module: nn.Module) -> tuple:
        return (torch.randint(0, module.num_embeddings, (2, 3), device=module.weight.device),)

    def activation(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        ids = inputs[0]
        if module.padding_idx is not None:
            ids = ids.masked_fill(ids == module.padding_idx, -1)
        return ids.unsqueeze(-1)


class Conv2dExtractor(Extractor):
    """``nn.Conv2d`` (``groups=1``, zero padding given as numbers): ``a`` is the unfolded input patches at every
    output position (``F.unfold``, ``[b, L, C_in kh kw]``), ``g`` the output gradient per position; per-example
    weight gradients are ``sum_L g a^T``, as Opacus computes them. Its neurons are the channels (axis 1 of NCHW):
    the tracer follows them through element-wise functions, pooling, residual sums, means over the positions
    and the flatten after a global pooling (anything else fixes them)."""

    kind = "conv"
    feature_axis = -3

    def widths(self, module: nn.Module) -> tuple[int, int]:
        return module.in_channels, module.out_channels

    def check_module(self, path: str, module: nn.Module) -> None:
        if module.groups != 1:
            raise UnsupportedModuleError(f"Conv2d {path!r} has groups={module.groups}; capture supports groups=1")
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise UnsupportedModuleError(f"Conv2d {path!r} pads with {module.padding_mode!r} / {module.padding!r}; "
                                         "capture supports zero padding given as numbers")

    def site(self, path: str, module: nn.Module, in_space: str, out_space: str) -> Site:
        return replace(super().site(path, module, in_space, out_space), kernel=tuple(module.kernel_size))

    def activation(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        if x.dim() != 4:
            raise UnsupportedModuleError(f"capture needs batched Conv2d inputs [b, C, H, W], got {list(x.shape)}")
        return F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride).transpose(1, 2)

    def features_last(self, t: torch.Tensor) -> torch.Tensor:
        return t.flatten(2).transpose(1, 2)

    def example_input(self, module: nn.Module) -> tuple:
        w = module.weight
        return (torch.randn(2, module.in_channels, 16, 16, dtype=w.dtype, device=w.device),)


class MultiheadAttentionExtractor(Extractor):
    """``nn.MultiheadAttention`` as four sites ``{path}:q``, ``:k``, ``:v`` (row blocks of ``in_proj_weight``)
    and ``:o`` (``out_proj``).

    Spaces: per module one Q/K space and one V/O space, each ``Blocks(heads, Perm)`` (the paper's
    per-head permutations; Q and K share theirs). Captures replace the forward by :meth:`forward`,
    which computes what ``F.multi_head_attention_forward`` does (masks, ``is_causal``, dropout,
    ``need_weights``, both ``batch_first``) with the projections exposed.
    """

    kind = "linear"
    composite = True

    def widths(self, module: nn.Module) -> tuple[int, int]:
        return module.embed_dim, module.embed_dim

    def check_module(self, path: str, module: nn.Module) -> None:
        if module.bias_k is not None or module.add_zero_attn:
            raise UnsupportedModuleError(f"MultiheadAttention {path!r} uses add_bias_kv or add_zero_attn, which "
                                         "capture does not support; build it without them")
        if not module._qkv_same_embed_dim:
            raise UnsupportedModuleError(f"MultiheadAttention {path!r} has kdim or vdim different from embed_dim "
                                         "(separate q/k/v_proj_weight), which capture does not support yet")

    def layout(self, path: str, module: nn.Module) -> Layout:
        prefix = f"{path}." if path else ""
        E, h = module.embed_dim, module.num_heads
        bias = f"{prefix}in_proj_bias" if module.in_proj_bias is not None else None
        sites = [Site(f"{path}:{role}", f"input:{i}", space, f"{prefix}in_proj_weight", bias, "linear",
                      (i * E, (i + 1) * E)) for i, (role, space) in enumerate(zip("qkv", ("qk", "qk", "vo")))]
        out_bias = f"{prefix}out_proj.bias" if module.out_proj.bias is not None else None
        sites.append(Site(f"{path}:o", "vo", "output", f"{prefix}out_proj.weight", out_bias, "linear"))
        group: Group = Blocks(h, Perm())
        return Layout(tuple(sites), {"input:0": E, "input:1": E, "input:2": E, "qk": E, "vo": E, "output": E},
                      spaces=(Space("qk", E, group), Space("vo", E, group)))

    def inputs(self, args: tuple, kwargs: dict) -> list:
        names = ("query", "key", "value")
        return [args[i] if len(args) > i else kwargs.get(n) for i, n in enumerate(names)]

    def example_input(self, module: nn.Module) -> tuple:
        x = torch.randn(2, 3, module.embed_dim, dtype=module.out_proj.weight.dtype, device=module.out_proj.weight.device)
        return (x, x, x)

    def forward(self, module: nn.MultiheadAttention, tap: Tap, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True, is_causal: bool = False):
        if query.dim() != 3:
            raise UnsupportedModuleError("capture needs batched attention inputs [b, T, E] (or [T, b, E]); "
                                         f"got query of shape {list(query.shape)}")
        # work sequence-first, as F.multi_head_attention_forward does: the same memory layouts give dropout
        # the same masks, so a captured step equals an uncaptured one under the same seed
        if module.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        T, b, E = query.shape
        S, h = key.shape[0], module.num_heads
        dk = E // h

        def site(role: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            """``[T, b, out]``: the projection of ``x [T, b, in]``, reported to ``tap`` batch-major."""
            return tap(role, x.transpose(0, 1), F.linear(x, weight, bias).transpose(0, 1)).transpose(0, 1)

        biases = module.in_proj_bias.chunk(3) if module.in_proj_bias is not None else (None, None, None)
        q, k, v = (site(r, x, w, bb) for r, x, w, bb in
                   zip("qkv", (query, key, value), module.in_proj_weight.chunk(3), biases))

        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=q.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention requires)")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None
        else:
            attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                          target_type=q.dtype, check_other=False)
            if key_padding_mask is not None:
                is_causal = False
        if attn_mask is not None and attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)                                   # [1 or b h, T, S]
        if key_padding_mask is not None:
            padding = key_padding_mask.view(b, 1, 1, S).expand(-1, h, -1, -1).reshape(b * h, 1, S)
            attn_mask = padding if attn_mask is None else attn_mask + padding
        dropout_p = module.dropout if module.training else 0.0
        q, k, v = (t.reshape(t.shape[0], b * h, dk).transpose(0, 1) for t in (q, k, v))   # [b h, T|S, dk]
        weights = None
        if need_weights:
            scores = q * (1.0 / dk) ** 0.5
            scores = torch.bmm(scores, k.transpose(-2, -1)) if attn_mask is None else \
                torch.baddbmm(attn_mask, scores, k.transpose(-2, -1))
            probs = scores.softmax(-1)
            if dropout_p > 0.0:
                probs = F.dropout(probs, p=dropout_p)
            joined = torch.bmm(probs, v).transpose(0, 1).reshape(T * b, E)
            weights = probs.view(b, h, T, S)
            weights = weights.mean(1) if average_attn_weights else weights
        else:
            if attn_mask is not None:
                attn_mask = attn_mask.unsqueeze(0) if attn_mask.size(0) == 1 else attn_mask.view(b, h, -1, S)
            heads = F.scaled_dot_product_attention(q.view(b, h, T, dk), k.view(b, h, S, dk), v.view(b, h, S, dk),
                                                   attn_mask, dropout_p, is_causal)
            joined = heads.permute(2, 0, 1, 3).reshape(T * b, E)
        out = site("o", joined.view(T, b, E), module.out_proj.weight, module.out_proj.bias)
        return (out.transpose(0, 1) if module.batch_first else out), weights


_REGISTRY: dict[type, Extractor] = {nn.Linear: LinearExtractor(), nn.LayerNorm: LayerNormExtractor(),
                                    nn.RMSNorm: RMSNormExtractor(), nn.Embedding: EmbeddingExtractor(),
                                    nn.Conv2d: Conv2dExtractor(), nn.MultiheadAttention: MultiheadAttentionExtractor()}
#: third-party packages whose module types an integration module describes (``extractor_for(module)`` there),
#: imported the first time a module of that package is looked up: the core never imports them itself
_INTEGRATIONS = {"transformers": "gradmetanet.integrations.transformers"}


def register_extractor(module_type: type, extractor: Extractor) -> None:
    """Make modules of ``module_type`` (and its subclasses without their own entry) capturable sites."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_extractor needs an nn.Module subclass, got {module_type!r}")
    if not isinstance(extractor, Extractor):
        raise TypeError(f"register_extractor needs an Extractor instance, got {type(extractor).__name__}")
    _REGISTRY[module_type] = extractor


def extractor_for(module: nn.Module) -> Extractor | None:
    """The extractor of ``module``'s type (exact type, then its base classes; then the integration of the library
    that defines it, :mod:`gradmetanet.integrations`), or ``None``."""
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    package = type(module).__module__.split(".")[0]
    if package in _INTEGRATIONS:
        return importlib.import_module(_INTEGRATIONS[package]).extractor_for(module)
    return None


def registered_types() -> list[type]:
    return list(_REGISTRY)


def capturable_modules(model: nn.Module) -> list[tuple[str, nn.Module, Extractor]]:
    """``(path, module, extractor)`` of every module that forms sites, in registration order; the
    submodules of a composite module (the ``out_proj`` of attention) belong to it and are skipped."""
    found, inside = [], []
    for path, module in model.named_modules():
        if any(path.startswith(f"{p}.") for p in inside):
            continue
        extractor = extractor_for(module)
        if extractor is None or not extractor.has_site(module):
            continue
        found.append((path, module, extractor))
        if extractor.composite:
            inside.append(path)
    return found
