"""GradientSet: the decomposed per-example gradients of a batch, and the views derived from them.

For a linear site ``y = W x + b`` and example ``i`` with tokens ``t``, the gradient of example
``i``'s own loss is ``dW_i = sum_t g[i, t] a[i, t]^T`` and ``db_i = sum_t g[i, t]``. A GradientSet
keeps only the factors ``a: [b, T, d_in]`` and ``g: [b, T, d_out]`` per site, which costs
``b T (d_in + d_out)`` numbers instead of ``b d_out d_in``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..atomic import atomic_replace
from ..core.incidence import neuron_tensor
from ..core.kinds import site_kind
from ..core.spec import NetworkSpec, SpecElement
from ..errors import CaptureError

__all__ = ["GradientSet", "LossReduction", "linear_fisher_diagonal"]

LossReduction = Literal["mean", "sum"]
_FORMAT_VERSION = "2"
_READABLE_VERSIONS = ("1", "2")
#: Upper bound on the elements of per-example gradients materialised at once (for ``T > 1``).
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class GradientSet:
    """Decomposed per-example gradients of one batch for every linear site of ``spec``.

    Attributes:
        spec: the base network's neuron spaces and linear sites.
        activations: site name -> ``a: [b, T, d_in]``, the site's input.
        output_grads: site name -> ``g: [b, T, d_out]``, the gradient of example ``i``'s *own* loss
            with respect to the site's output (already rescaled by ``b`` for a mean-reduced loss).
        outputs: site name -> ``[b, T, d_out]`` pre-activation outputs, kept only for sites whose
            output space no other site reads (the network outputs); they fill the activation slot
            of those neurons in :meth:`neuron_features`.
        loss_reduction: how the batch loss combined examples, ``"mean"`` or ``"sum"``; it decides
            how :meth:`mean_grad` combines them so that it equals ``param.grad``.
    """

    spec: NetworkSpec
    activations: dict[str, torch.Tensor]
    output_grads: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    loss_reduction: LossReduction = "mean"
    _unchecked: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {self.loss_reduction!r}")
        sizes = set()
        for site in self.spec.sites:
            for kind, store in (("activations", self.activations), ("output_grads", self.output_grads)):
                if site.name not in store:
                    raise ValueError(f"GradientSet: {kind} has no entry for site {site.name!r}")
            a, g = self.activations[site.name], self.output_grads[site.name]
            kind = site_kind(site.kind)
            d_in, d_out = kind.a_width(site, self.spec.space(site.in_space).size), self.spec.space(site.out_space).size
            if a.dim() != 3 or a.shape[-1] != d_in:
                raise ValueError(f"site {site.name!r}: activations must be [b, T, {d_in}], got {list(a.shape)}")
            if g.dim() != 3 or g.shape[-1] != d_out or g.shape[:2] != a.shape[:2]:
                raise ValueError(f"site {site.name!r}: output_grads must be [b, T, {d_out}] matching activations "
                                 f"{list(a.shape)}, got {list(g.shape)}")
            problem = kind.check_factors(a, g)
            if problem:
                raise ValueError(f"site {site.name!r}: {problem}")
            sizes.add(a.shape[0])
        if 0 in sizes:
            raise ValueError("GradientSet: an empty batch (0 examples) has no per-example gradients")
        if len(sizes) > 1:
            raise ValueError(f"GradientSet: sites disagree on the number of examples: {sorted(sizes)}")

    def __repr__(self) -> str:
        tokens = {a.shape[1] for a in self.activations.values()}
        return (f"GradientSet({self.batch_size} examples, tokens={sorted(tokens)}, {len(self.spec.sites)} sites, "
                f"{self.spec.n_params:,} parameters, loss_reduction={self.loss_reduction!r}, dtype={self.dtype}, "
                f"device={self.device}, {self.nbytes() / 2**20:.2f} MiB of factors)")

    # ------------------------------------------------------------------ basic properties
    @property
    def batch_size(self) -> int:
        return next(iter(self.activations.values())).shape[0]

    def __len__(self) -> int:
        return self.batch_size

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.output_grads.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.activations.values())).device

    def nbytes(self) -> int:
        """Bytes held by the factors (what is stored instead of dense per-example gradients); a tensor that
        several sites read is counted once."""
        tensors = [*self.activations.values(), *self.output_grads.values(), *self.outputs.values()]
        # sites that read one tensor (the Q, K and V of self-attention) share its storage: count it once
        unique = {(t.data_ptr(), t.numel(), t.element_size()): t for t in tensors}
        return sum(t.numel() * t.element_size() for t in unique.values())

    def dense_nbytes(self) -> int:
        """Bytes that dense per-example gradients ``[b, P]`` of the same dtype would take."""
        return self.batch_size * self.spec.n_params * next(iter(self.output_grads.values())).element_size()

    def verify_finite(self) -> None:
        """Raise :class:`~gradmetanet.CaptureError` if a factor holds NaN or infinity. A capture leaves the check
        to the first view (every view calls this), so the training step itself never waits for it.

        One reduction per tensor and one host synchronisation: a sum is finite whenever every term is
        (an overflowing sum of finite terms is then ruled in or out tensor by tensor).
        """
        if not self._unchecked:
            return
        self._unchecked = False
        tensors = [t for t in (*self.activations.values(), *self.output_grads.values()) if t.is_floating_point()]
        if bool(torch.isfinite(torch.stack([t.sum() for t in tensors])).all()):
            return
        named = [(f"activations at layer {k!r}", t) for k, t in self.activations.items()]
        named += [(f"gradients at layer {k!r}", t) for k, t in self.output_grads.items()]
        for what, t in named:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise CaptureError(f"non-finite {what} (NaN or inf) captured; check the loss and the inputs "
                                   "(or pass check_finite=False)")

    def _map(self, fn) -> "GradientSet":
        self.verify_finite()
        return GradientSet(self.spec, {k: fn(v) for k, v in self.activations.items()},
                           {k: fn(v) for k, v in self.output_grads.items()},
                           {k: fn(v) for k, v in self.outputs.items()}, self.loss_reduction)

    def to(self, *args, **kwargs) -> "GradientSet":
        """Move or cast every tensor, with the arguments of :meth:`torch.Tensor.to` (token ids keep their dtype)."""
        def move(t: torch.Tensor) -> torch.Tensor:
            if t.is_floating_point():
                return t.to(*args, **kwargs)
            moved = t.to(*args, **kwargs)
            return moved.to(t.dtype) if moved.dtype != t.dtype else moved
        return self._map(move)

    def select(self, index: torch.Tensor | slice) -> "GradientSet":
        """The sub-set of examples ``index`` (a slice, index tensor or boolean mask)."""
        return self._map(lambda t: t[index])

    def scale_examples(self, factors: torch.Tensor) -> "GradientSet":
        """Every example's gradients times ``factors[i]`` (``[b]``): turns rows of another loss into each example's
        own. With Hugging Face ``labels`` the loss is the mean over the batch's ``N`` valid tokens, so row ``i`` is
        ``b / N`` times the gradient of example ``i``'s token *sum*; ``factors = N / (b * n_i)`` (``n_i`` its valid
        tokens) makes it the gradient of example ``i``'s own token mean (see docs/integrations.md)."""
        self.verify_finite()
        if factors.shape != (self.batch_size,):
            raise ValueError(f"factors must be [{self.batch_size}] (one per example), got {list(factors.shape)}")
        grads = {k: v * factors.to(v.dtype).view(-1, 1, 1) for k, v in self.output_grads.items()}
        return GradientSet(self.spec, dict(self.activations), grads, dict(self.outputs), self.loss_reduction)

    def transform(self, element: SpecElement) -> "GradientSet":
        """Move the factors by a group element of every space: ``a <- rho(g) a``, ``g <- rho(g)^-T g``,
        recorded outputs ``<- rho(g) out`` (what the parameters moved by ``spec.transform_parameters`` produce)."""
        self.verify_finite()
        acts, grads, outs = {}, {}, {}
        for site in self.spec.sites:
            g_in, g_out = element.get(site.in_space), element.get(site.out_space)
            a, g = self.activations[site.name], self.output_grads[site.name]
            acts[site.name] = site_kind(site.kind).transform_activation(site, a, g_in)
            grads[site.name] = g if g_out is None else g_out.act_inverse_transpose(g, -1)
            if site.name in self.outputs:
                out = self.outputs[site.name]
                outs[site.name] = out if g_out is None else g_out.act(out, -1)
        return GradientSet(self.spec, acts, grads, outs, self.loss_reduction)

    # ------------------------------------------------------------------ derived views
    def _per_site(self, view: str) -> dict[tuple[str, tuple[int, int] | None], torch.Tensor]:
        """``{(param, rows): tensor}`` from each site's kind (:mod:`gradmetanet.core.kinds`) method ``view``."""
        out = {}
        for site in self.spec.sites:
            kind = site_kind(site.kind)
            d_in = self.spec.space(site.in_space).size
            for name, value in getattr(kind, view)(site, self.activations[site.name], self.output_grads[site.name],
                                                   d_in).items():
                key = (name, site.rows)
                out[key] = out[key] + value if key in out else value      # a parameter shared by two sites
        return out

    def per_example_grads(self) -> dict[str, torch.Tensor]:
        """Dense per-example gradients ``[b, *param.shape]`` keyed by parameter name.

        This materialises ``b x P`` numbers: meant for checks and dense baselines.
        """
        self.verify_finite()
        return self.spec.assemble(self._per_site("per_example"), dim=1)

    def mean_grad(self) -> dict[str, torch.Tensor]:
        """The batch gradient, equal to ``param.grad`` after the captured backward."""
        self.verify_finite()
        scale = 1.0 / self.batch_size if self.loss_reduction == "mean" else 1.0
        return {k: v * scale for k, v in self.spec.assemble(self._per_site("summed")).items()}

    def empirical_fisher_diag(self) -> dict[str, torch.Tensor]:
        """``mean_i (grad_i)^2`` per parameter, shape ``param.shape``, keyed by parameter name.

        For a linear site with one token per example this is ``(g^2)^T (a^2) / b`` and never forms
        per-example gradients; otherwise per-example gradients are formed in chunks of examples of
        bounded size.
        """
        self.verify_finite()
        b = self.batch_size
        linear_single = all(s.kind == "linear" and self.activations[s.name].shape[1] == 1 for s in self.spec.sites)
        if linear_single:
            parts = {}
            for site in self.spec.sites:
                weight, bias = linear_fisher_diagonal(self.activations[site.name][:, 0],
                                                      self.output_grads[site.name][:, 0])
                parts[(site.weight, site.rows)] = weight
                if site.bias is not None:
                    parts[(site.bias, site.rows)] = bias
            return self.spec.assemble(parts)
        widest = max(shape.numel() for shape in self.spec.param_shapes().values())
        chunk = max(1, _CHUNK_ELEMENTS // widest)
        total: dict[str, torch.Tensor] = {}
        for start in range(0, b, chunk):
            for name, grads in self.select(slice(start, start + chunk)).per_example_grads().items():
                square = grads.square().sum(0)
                total[name] = total[name] + square if name in total else square
        return {name: value / b for name, value in total.items()}

    def norms(self, per_parameter: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
        """Per-example gradient norms ``[b]`` from the factors, without forming per-example gradients.

        For a weight, ``||sum_t g_t a_t^T||_F^2 = <G G^T, A A^T>`` with ``G [T, d_out]``, ``A [T, d_in]``
        (Opacus' "ghost norm"): ``O(T^2 (d_in + d_out))`` per example instead of ``O(T d_in d_out)``;
        with one token it is ``||g||^2 ||a||^2``. A bias adds ``||sum_t g_t||^2``; an embedding
        ``sum_{t,t'} [id_t = id_t'] <g_t, g_t'>``; a weight tied between two sites is formed densely. Each example's gradient is that of its own loss, as
        in :meth:`per_example_grads`. With ``per_parameter=True``, returns parameter name -> ``[b]``
        norms instead of the total.
        """
        self.verify_finite()
        if _shared_parameters(self.spec):          # tied weights: the norm of a sum, formed densely
            squared = {k: v.square().flatten(1).sum(1) for k, v in self.per_example_grads().items()}
        else:
            squared = _sum_parts(self._per_site("squared_norms"))
        if per_parameter:
            return {name: value.clamp_min(0).sqrt() for name, value in squared.items()}
        return torch.stack(list(squared.values())).sum(0).clamp_min(0).sqrt()

    def neuron_features(self) -> dict[str, torch.Tensor]:
        """Per-neuron-space features ``[b * T, n, 2]``: channel 0 activation, channel 1 gradient.

        Channel 0 of a space is the input of the site that reads it; channel 1 is the gradient
        of the site that writes it. The two slots hooks cannot provide are filled by choice:
        the *input* space's gradient channel is zero (the gradient with respect to the data is
        not part of the parameter gradient), and the *output* space's activation channel is
        the network output (the pre-activation of the last site). Tokens are folded into the
        set axis (example-major), as in the paper's treatment of sequences.
        """
        whole = self.neuron_tensor()
        sizes = [space.size for space in self.spec.spaces]
        return dict(zip((space.name for space in self.spec.spaces), whole.split(sizes, dim=1)))

    def neuron_tensor(self) -> torch.Tensor:
        """``[b * T, N, 2]``: :meth:`neuron_features` of every space, concatenated in the spec's order
        (incidence features, :func:`gradmetanet.core.incidence.neuron_tensor`: what a metanetwork reads)."""
        self.verify_finite()
        return neuron_tensor(self.spec, self.activations, self.output_grads, self.outputs)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the factors and the spec to a safetensors file (atomically). Factors that several sites share
        (the input of self-attention's Q, K and V) are written once per site: safetensors keeps no aliases."""
        self.verify_finite()
        tensors = {f"a/{k}": v for k, v in self.activations.items()}
        tensors |= {f"g/{k}": v for k, v in self.output_grads.items()}
        tensors |= {f"out/{k}": v for k, v in self.outputs.items()}
        seen: set[int] = set()
        own = {}
        for key, value in tensors.items():
            value = value.detach().cpu().contiguous()
            pointer = value.untyped_storage().data_ptr()
            own[key] = value.clone() if pointer in seen else value
            seen.add(pointer)
        metadata = {"format": "gradmetanet.GradientSet", "version": _FORMAT_VERSION,
                    "spec": self.spec.to_json(), "loss_reduction": self.loss_reduction}
        with atomic_replace(path) as tmp:
            save_file(own, tmp, metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "GradientSet":
        """Read a file written by :meth:`save`; raises ``ValueError`` on anything else."""
        if not os.path.exists(path):
            raise FileNotFoundError(f"no GradientSet file at {os.fspath(path)!r}")
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
            header_len = int.from_bytes(head, "little")
            if len(head) < 8 or header_len > size - 8:
                kind = " (a zip archive: torch.save output?)" if head[:2] == b"PK" else ""
                raise ValueError(f"{os.fspath(path)!r} is not a safetensors file{kind}; GradientSet.load reads "
                                 "files written by GradientSet.save")
            try:
                header = json.loads(fh.read(header_len))
            except (ValueError, UnicodeDecodeError) as err:
                raise ValueError(f"{os.fspath(path)!r} is not a readable safetensors file ({err})") from err
        try:
            tensors = load_file(path, device=str(device))
        except (SafetensorError, ValueError, OSError) as err:
            raise ValueError(f"{os.fspath(path)!r} is not a readable safetensors file ({err})") from err
        meta = header.get("__metadata__", {})
        if meta.get("format") != "gradmetanet.GradientSet":
            raise ValueError(f"{os.fspath(path)!r} is a safetensors file but not a saved GradientSet")
        if meta.get("version") not in _READABLE_VERSIONS:
            raise ValueError(f"{os.fspath(path)!r} has GradientSet format {meta.get('version')!r}; "
                             f"this version reads {list(_READABLE_VERSIONS)}")
        spec = NetworkSpec.from_json(meta["spec"])
        groups: dict[str, dict[str, torch.Tensor]] = {"a": {}, "g": {}, "out": {}}
        for key, value in tensors.items():
            kind, _, site = key.partition("/")
            groups[kind][site] = value
        return cls(spec, groups["a"], groups["g"], groups["out"], meta["loss_reduction"])


def linear_fisher_diagonal(a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The empirical Fisher diagonal of a linear layer from its factors, without per-example gradients: the mean over
    examples of ``(g a^T)^2`` and ``g^2``. ``a [..., b, d_in]``, ``g [..., b, d_out]`` -> weight ``[..., d_out,
    d_in]``, bias ``[..., d_out]`` (leading dimensions: networks of a zoo, say)."""
    return torch.einsum("...bo,...bi->...oi", g.square(), a.square()) / a.shape[-2], g.square().mean(-2)


def _shared_parameters(spec: NetworkSpec) -> bool:
    """Whether two sites write the same part of one parameter (tied weights): their norms do not add."""
    keys = [p for site in spec.sites for p in ((site.weight, site.rows), (site.bias, site.rows)) if p[0] is not None]
    return len(set(keys)) < len(keys)


def _sum_parts(parts: dict[tuple[str, tuple[int, int] | None], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Squared norms of row blocks add up to the squared norm of the whole parameter."""
    out: dict[str, torch.Tensor] = {}
    for (name, _), value in parts.items():
        out[name] = out[name] + value if name in out else value
    return out
