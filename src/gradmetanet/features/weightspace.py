"""Weight-space features: per-parameter tensors ``[B, *param.shape, C]`` keyed by parameter name.

Channels are last (as the metanetworks' outputs are). :class:`WeightSpaceFeatures` converts from a
list of state dicts (matched by name, in any key order), to and from one flat vector per network,
and to the layouts of the NFN (``[B, C, out, in]``) and DWSNets (``[B, in, out, C]``) libraries; a
group element of every space moves it like the parameters themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from ..core.spec import NetworkSpec, SpecElement

__all__ = ["WeightSpaceFeatures", "WeightSpaceInput", "answer_like", "flatten_weights", "read_weight_space",
           "unflatten_weights"]


def flatten_weights(tensors: Mapping[str, torch.Tensor], spec: NetworkSpec, leading: int = 1) -> torch.Tensor:
    """``{param: [*lead, *shape, *trail]} -> [*lead, P * prod(trail)]`` in the spec's parameter order."""
    parts = []
    for name, shape in spec.param_shapes().items():
        if name not in tensors:
            raise KeyError(f"missing parameter {name!r}; expected {list(spec.param_shapes())}")
        t = tensors[name]
        if tuple(t.shape[leading:leading + len(shape)]) != tuple(shape):
            raise ValueError(f"parameter {name!r} has shape {list(t.shape)}; expected {list(shape)} after "
                             f"{leading} leading axes")
        parts.append(t.reshape(*t.shape[:leading], -1))
    return torch.cat(parts, -1)


def unflatten_weights(flat: torch.Tensor, spec: NetworkSpec, channels: int | None = None) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten_weights` with one leading axis: ``[B, P * C] -> {param: [B, *shape, C]}``
    (no channel axis when ``channels`` is ``None``)."""
    c = 1 if channels is None else channels
    if flat.shape[-1] != spec.n_params * c:
        raise ValueError(f"expected {spec.n_params} x {c} = {spec.n_params * c} entries, got {flat.shape[-1]}")
    out, offset = {}, 0
    for name, shape in spec.param_shapes().items():
        n = shape.numel() * c
        chunk = flat[..., offset:offset + n]
        out[name] = chunk.reshape(*flat.shape[:-1], *shape) if channels is None else \
            chunk.reshape(*flat.shape[:-1], *shape, c)
        offset += n
    return out


@dataclass(frozen=True)
class WeightSpaceFeatures:
    """``tensors[param]: [B, *param.shape, C]`` for every parameter of ``spec``."""

    spec: NetworkSpec
    tensors: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        shapes = self.spec.param_shapes()
        missing = [n for n in shapes if n not in self.tensors]
        extra = [n for n in self.tensors if n not in shapes]
        if missing or extra:
            raise ValueError(f"WeightSpaceFeatures: missing parameters {missing}, unknown {extra}")
        lead = {(t.shape[0], t.shape[-1]) for t in self.tensors.values()}
        if len(lead) > 1:
            raise ValueError(f"WeightSpaceFeatures: tensors disagree on [B, ..., C]: {sorted(lead)}")
        for name, shape in shapes.items():
            got = tuple(self.tensors[name].shape[1:-1])
            if got != tuple(shape):
                raise ValueError(f"WeightSpaceFeatures[{name!r}] must be [B, {', '.join(map(str, shape))}, C], got "
                                 f"{list(self.tensors[name].shape)}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_state_dicts(cls, spec: NetworkSpec, state_dicts: Sequence[Mapping[str, torch.Tensor]]
                         ) -> "WeightSpaceFeatures":
        """One channel per network's parameters, matched by name (any key order; extra keys such as
        buffers are ignored, a missing or misshapen parameter raises)."""
        if not state_dicts:
            raise ValueError("from_state_dicts needs at least one state dict")
        tensors = {}
        for name, shape in spec.param_shapes().items():
            rows = []
            for i, sd in enumerate(state_dicts):
                if name not in sd:
                    raise KeyError(f"state dict {i} has no parameter {name!r}")
                if tuple(sd[name].shape) != tuple(shape):
                    raise ValueError(f"state dict {i}: {name!r} has shape {list(sd[name].shape)}, spec says "
                                     f"{list(shape)}")
                rows.append(sd[name].detach())
            tensors[name] = torch.stack(rows).unsqueeze(-1)
        return cls(spec, tensors)

    @classmethod
    def unflatten(cls, spec: NetworkSpec, flat: torch.Tensor, channels: int = 1) -> "WeightSpaceFeatures":
        """From ``[B, P * C]`` (see :func:`unflatten_weights`)."""
        return cls(spec, unflatten_weights(flat, spec, channels))

    # ------------------------------------------------------------------ views and arithmetic
    @property
    def batch_size(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    @property
    def channels(self) -> int:
        return next(iter(self.tensors.values())).shape[-1]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def select(self, index: torch.Tensor | slice) -> "WeightSpaceFeatures":
        """The networks ``index`` of the batch."""
        return self.map(lambda t: t[index])

    def flatten(self) -> torch.Tensor:
        """``[B, P * C]`` in the spec's parameter order."""
        return flatten_weights(self.tensors, self.spec)

    def state_dicts(self, channel: int = 0) -> list[dict[str, torch.Tensor]]:
        """One state dict per network from channel ``channel`` (to load into base networks)."""
        return [{k: v[i, ..., channel] for k, v in self.tensors.items()} for i in range(self.batch_size)]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "WeightSpaceFeatures":
        return WeightSpaceFeatures(self.spec, {k: fn(v) for k, v in self.tensors.items()})

    def to(self, *args, **kwargs) -> "WeightSpaceFeatures":
        return self.map(lambda t: t.to(*args, **kwargs))

    def _zip(self, other, op) -> "WeightSpaceFeatures":
        if isinstance(other, WeightSpaceFeatures):
            if other.spec != self.spec:
                raise ValueError("weight-space features of two different specs cannot be combined")
            return WeightSpaceFeatures(self.spec, {k: op(v, other.tensors[k]) for k, v in self.tensors.items()})
        return self.map(lambda v: op(v, other))

    def __add__(self, other) -> "WeightSpaceFeatures":
        return self._zip(other, torch.add)

    def __sub__(self, other) -> "WeightSpaceFeatures":
        return self._zip(other, torch.sub)

    def __mul__(self, other) -> "WeightSpaceFeatures":
        return self._zip(other, torch.mul)

    __radd__, __rmul__ = __add__, __mul__

    def apply(self, element: SpecElement) -> "WeightSpaceFeatures":
        """Move every channel by a group element of every space (as ``spec.transform_parameters``)."""
        return WeightSpaceFeatures(self.spec, self.spec.transform_parameters(self.tensors, element, leading=1))

    # ------------------------------------------------------------------ other libraries' layouts
    def _linear_sites(self):
        sites = self.spec.sites
        if self.spec.sites_not_whole() or len(self.spec.parameters) != sum(1 + s.has_bias for s in sites):
            raise ValueError("the NFN / DWSNets layouts hold linear layers only (weights and biases)")
        return sites

    def to_nfn(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor | None, ...]]:
        """NFN's layout: weights ``[B, C, out, in]`` and biases ``[B, C, out]`` per layer (``None``: no bias)."""
        sites = self._linear_sites()
        weights = tuple(self.tensors[s.weight].permute(0, 3, 1, 2) for s in sites)
        biases = tuple(self.tensors[s.bias].permute(0, 2, 1) if s.bias else None for s in sites)
        return weights, biases

    def to_dws(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor | None, ...]]:
        """DWSNets' layout: weights ``[B, in, out, C]`` (transposed) and biases ``[B, out, C]`` per layer."""
        sites = self._linear_sites()
        return (tuple(self.tensors[s.weight].transpose(1, 2) for s in sites),
                tuple(self.tensors[s.bias] if s.bias else None for s in sites))

    @classmethod
    def from_nfn(cls, spec: NetworkSpec, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]
                 ) -> "WeightSpaceFeatures":
        """Inverse of :meth:`to_nfn`."""
        tensors = {}
        for site, w, b in zip(spec.sites, weights, biases, strict=True):
            tensors[site.weight] = w.permute(0, 2, 3, 1)
            if site.bias:
                tensors[site.bias] = b.permute(0, 2, 1)
        return cls(spec, tensors)

    @classmethod
    def from_dws(cls, spec: NetworkSpec, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]
                 ) -> "WeightSpaceFeatures":
        """Inverse of :meth:`to_dws`."""
        tensors = {}
        for site, w, b in zip(spec.sites, weights, biases, strict=True):
            tensors[site.weight] = w.transpose(1, 2)
            if site.bias:
                tensors[site.bias] = b
        return cls(spec, tensors)


#: what a weight-space metanetwork reads: the container (carrying its spec) or its tensors ``{name: [B, *shape, C]}``
WeightSpaceInput = WeightSpaceFeatures | Mapping[str, torch.Tensor]


def read_weight_space(x: WeightSpaceInput, spec: NetworkSpec | None) -> dict[str, torch.Tensor]:
    """The tensors of a metanetwork's input. Features of a spec other than ``spec`` (the one the metanetwork was
    built for; ``None``: any) are refused: read by name and shape, another network's tensors would give numbers
    that mean nothing."""
    if isinstance(x, WeightSpaceFeatures):
        if spec is not None and x.spec != spec:
            raise ValueError(f"this metanetwork was built for the spec with spaces "
                             f"{[(s.name, s.size) for s in spec.spaces]}; the features are of another spec (spaces "
                             f"{[(s.name, s.size) for s in x.spec.spaces]}): build it on the features' spec")
        return x.tensors
    if not isinstance(x, Mapping):
        raise TypeError(f"expected WeightSpaceFeatures or a dict {{name: [B, *shape, C]}}, got {type(x).__name__}")
    return dict(x)


def answer_like(x: WeightSpaceInput, out: dict[str, torch.Tensor] | torch.Tensor, spec: NetworkSpec | None = None
                ) -> WeightSpaceFeatures | dict[str, torch.Tensor] | torch.Tensor:
    """A metanetwork's output in the kind of its input: a weight-space output of a :class:`WeightSpaceFeatures`
    input comes back as one (of ``spec``, default the input's); a dict input gets a dict, and an invariant output
    ``[B, K]`` is a tensor either way."""
    if isinstance(x, WeightSpaceFeatures) and isinstance(out, dict):
        return WeightSpaceFeatures(spec or x.spec, out)
    return out
