"""Network specs: spaces with groups, parameters with axes, sites with a kind.

- A :class:`Space` is a named axis of neurons with a :class:`~gradmetanet.core.groups.Group`
  (the inputs of an MLP: ``Trivial``; a ReLU hidden layer: ``ScalePerm``). Two parameters that
  name the same space are tied by it (a residual stream, a layer used twice).
- A :class:`Parameter` is a tensor of the network with one :class:`Axis` label per axis: the
  ``row``, ``col`` or ``diag`` of a space, or ``fixed`` (kernel taps).
- A :class:`Site` is a map whose per-example gradient factors are captured; its ``kind``
  (``"linear"``) selects the extractor. A linear site ``y = W x + b`` declares the parameters
  ``W: (row out, col in)`` and ``b: (row out)``.

One rule moves everything by a group element ``g_s`` of every space: rows ``rho(g) W``, columns
``W rho(g)^-1``, diagonals by the permutation part; activations ``rho(g) a``, output gradients
``rho(g)^-T g``. A spec is *true* for a model when loading ``transform_parameters(params, g)``
leaves the model's function unchanged, for every element ``g``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable, Literal, Mapping, Sequence

import torch

from .groups import (GL, Blocks, Element, Group, Identity, Monomial, Perm, ScalePerm, SignPerm, Trivial,
                     group_from_json)
from .axes import Axis, Parameter
from .kinds import site_kind

__all__ = ["Space", "Axis", "Parameter", "Site", "NetworkSpec", "SpecElement", "UnsupportedModuleError",
           "group_of_activation", "ChannelRole"]

#: One element per space name (spaces left out act by the identity).
SpecElement = dict[str, Element]
#: How a feature channel on neurons moves: like activations (``rho``) or like gradients (``rho^-T``).
ChannelRole = Literal["act", "grad"]


class UnsupportedModuleError(TypeError):
    """A base network contains a module or an operation that gradmetanet cannot describe."""


@dataclass(frozen=True)
class Space:
    """An axis of ``size`` neurons on which ``group`` acts."""

    name: str
    size: int
    group: Group = field(default_factory=Trivial)

    @property
    def permutable(self) -> bool:
        """Whether the group moves neurons at all (everything but ``Trivial``)."""
        return self.group.name != "trivial"


@dataclass(frozen=True)
class Site:
    """A captured map of ``kind`` (``"linear"``) from ``in_space`` to ``out_space``.

    ``name`` is the module path (``"0"``, ``"encoder.fc1"``); ``weight`` and ``bias`` are
    parameter names as in ``model.named_parameters()``.
    """

    name: str
    in_space: str
    out_space: str
    weight: str
    bias: str | None
    kind: str = "linear"
    rows: tuple[int, int] | None = None
    kernel: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        site_kind(self.kind)                      # an unknown kind fails here, naming the known ones
        if self.rows is not None:
            object.__setattr__(self, "rows", (int(self.rows[0]), int(self.rows[1])))
        object.__setattr__(self, "kernel", tuple(int(k) for k in self.kernel))

    @property
    def has_bias(self) -> bool:
        return self.bias is not None

    def parameters(self) -> tuple[Parameter, ...]:
        """The parameters this site declares (:mod:`gradmetanet.core.kinds`; a linear site: weight
        ``(row out, col in)``, bias ``(row out)``)."""
        return site_kind(self.kind).parameters(self)


def _orthogonal(group: Group) -> bool:
    """Whether every element of ``group`` acts by a signed permutation (so ``rho = rho^-T``)."""
    if isinstance(group, Blocks):
        return _orthogonal(group.inner)
    return isinstance(group, (Trivial, Perm, SignPerm))


_ACTIVATION_GROUPS: dict[str, type[Group]] = {
    "relu": ScalePerm, "relu_inplace": ScalePerm, "leaky_relu": ScalePerm,
    "tanh": SignPerm, "sine": SignPerm, "sin": SignPerm,
}


def group_of_activation(name: str | None) -> Group:
    """The group of a hidden space read by the element-wise activation ``name``.

    ReLU / LeakyReLU (positively homogeneous) -> ``ScalePerm``; tanh / sine (odd) -> ``SignPerm``;
    any other element-wise function -> ``Perm``; no activation (a linear hidden layer) -> ``GL``.
    """
    if name is None:
        return GL()
    return _ACTIVATION_GROUPS.get(name, Perm)()


@dataclass(frozen=True)
class NetworkSpec:
    """Spaces, parameters and sites of a base network (see the module docstring).

    ``parameters`` defaults to those the sites declare; pass extra ones (a LayerNorm gain on a
    ``diag`` axis) to add them. A parameter named by two sites (tied weights) must carry the
    same axes in both.
    """

    spaces: tuple[Space, ...]
    sites: tuple[Site, ...]
    parameters: tuple[Parameter, ...] = ()
    _space_index: dict[str, int] = field(init=False, repr=False, compare=False)
    _parts: dict[str, list[Parameter]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index = {s.name: i for i, s in enumerate(self.spaces)}
        if len(index) != len(self.spaces):
            raise ValueError("NetworkSpec: space names must be unique")
        if len({s.name for s in self.sites}) != len(self.sites):
            raise ValueError("NetworkSpec: site names must be unique")
        params: dict[tuple[str, tuple[int, int] | None], Parameter] = {}
        for p in [q for site in self.sites for q in site.parameters()] + list(self.parameters):
            for axis in p.axes:
                if axis.space is not None and axis.space not in index:
                    raise ValueError(f"NetworkSpec: parameter {p.name!r} refers to unknown space {axis.space!r}")
            key = (p.name, p.rows)
            if key in params and params[key] != p and not self._same_action(params[key], p, index):
                raise ValueError(f"NetworkSpec: parameter {p.name!r} is declared with two different axis labelings "
                                 f"({params[key].axes} and {p.axes}) that the spaces' groups do not make equal")
            params.setdefault(key, p)
        for site in self.sites:
            for space in (site.in_space, site.out_space):
                if space not in index:
                    raise ValueError(f"NetworkSpec: site {site.name!r} refers to unknown space {space!r}")
        object.__setattr__(self, "parameters", tuple(params.values()))
        object.__setattr__(self, "_space_index", index)
        object.__setattr__(self, "_parts", self._group_parts())

    def _same_action(self, p: Parameter, q: Parameter, index: dict[str, int]) -> bool:
        """Whether two labelings of one tensor move it alike: they differ only by ``row`` vs ``col`` on
        spaces whose group acts by signed permutations (``rho = rho^-T``), as a tied embedding and
        unembedding do on the residual stream."""
        if len(p.axes) != len(q.axes):
            return False
        for x, y in zip(p.axes, q.axes):
            if x == y:
                continue
            if x.space != y.space or {x.role, y.role} != {"row", "col"}:
                return False
            if not _orthogonal(self.spaces[index[x.space]].group):
                return False
        return True

    # ------------------------------------------------------------------ construction
    @classmethod
    def chain(cls, sizes: Iterable[int], site_names: Iterable[str] | None = None,
              bias: bool | Iterable[bool] = True, activation: str | None = "any",
              groups: Sequence[Group] | None = None) -> "NetworkSpec":
        """The spec of an MLP ``d0 -> d1 -> ... -> dL`` whose layers are named ``site_names``.

        Spaces are ``s0 .. sL``; ``s0`` (inputs) and ``sL`` (outputs) are ``Trivial``. Hidden
        spaces get ``groups`` (one per hidden space) or the group of ``activation``
        (:func:`group_of_activation`); the default ``"any"`` gives ``Perm``, true for every
        element-wise activation.
        """
        sizes = list(sizes)
        if len(sizes) < 2:
            raise ValueError(f"an MLP chain needs at least two widths, got {sizes}")
        n_layers = len(sizes) - 1
        names = [str(i) for i in range(n_layers)] if site_names is None else list(site_names)
        biases = [bias] * n_layers if isinstance(bias, bool) else list(bias)
        hidden = list(groups) if groups is not None else [group_of_activation(activation)] * (n_layers - 1)
        if len(names) != n_layers or len(biases) != n_layers or len(hidden) != n_layers - 1:
            raise ValueError("chain: need one site name and one bias flag per layer, one group per hidden space")
        all_groups = [Trivial()] + hidden + [Trivial()]
        spaces = tuple(Space(f"s{l}", int(d), g) for l, (d, g) in enumerate(zip(sizes, all_groups)))
        sites = tuple(
            Site(name, f"s{l}", f"s{l + 1}", f"{name}.weight" if name else "weight",
                 (f"{name}.bias" if name else "bias") if has_bias else None)
            for l, (name, has_bias) in enumerate(zip(names, biases))
        )
        return cls(spaces, sites)

    # ------------------------------------------------------------------ queries
    def sites_not_whole(self, kinds: tuple[str, ...] = ("linear",)) -> list[str]:
        """The names of the sites that are not whole layers of ``kinds`` (another kind, or a block of rows of one,
        as a packed projection's part): the one guard of the views that hold for whole layers only."""
        return [s.name for s in self.sites if s.kind not in kinds or s.rows is not None]

    def space(self, name: str) -> Space:
        if name not in self._space_index:
            raise KeyError(f"no space named {name!r}; spaces: {[s.name for s in self.spaces]}")
        return self.spaces[self._space_index[name]]

    @property
    def n_neurons(self) -> int:
        return sum(s.size for s in self.spaces)

    @property
    def n_params(self) -> int:
        return sum(shape.numel() for shape in self.param_shapes().values())

    def site(self, name: str) -> Site:
        for site in self.sites:
            if site.name == name:
                return site
        raise KeyError(f"no site named {name!r}; sites: {[s.name for s in self.sites]}")

    def parameter(self, name: str) -> Parameter:
        """The parameter ``name`` (the first part of a parameter cut into row blocks)."""
        for p in self.parameters:
            if p.name == name:
                return p
        raise KeyError(f"no parameter named {name!r}; parameters: {[p.name for p in self.parameters]}")

    def part_shape(self, p: Parameter) -> torch.Size:
        """The shape of the part ``p`` (its own rows only)."""
        return torch.Size([self.space(a.space).size if a.space else a.size for a in p.axes])

    def parts(self) -> dict[str, list[Parameter]]:
        """Parameter name -> its parts in row order (one part for a parameter not cut into row blocks)."""
        return self._parts

    def _group_parts(self) -> dict[str, list[Parameter]]:
        out: dict[str, list[Parameter]] = {}
        for p in self.parameters:
            out.setdefault(p.name, []).append(p)
        for name, ps in out.items():
            if len(ps) > 1 or ps[0].rows is not None:
                ps.sort(key=lambda q: q.rows[0] if q.rows else -1)
                stops = [0] + [q.rows[1] if q.rows else None for q in ps]
                for q, start in zip(ps, stops[:-1]):
                    if q.rows is None or q.rows[0] != start or q.rows[1] - q.rows[0] != self.part_shape(q)[0]:
                        raise ValueError(f"NetworkSpec: the row blocks of parameter {name!r} "
                                         f"({[q.rows for q in ps]}) do not tile it from row 0")
        return out

    def param_shapes(self) -> dict[str, torch.Size]:
        """Parameter name -> shape of the whole tensor, in declaration order (site by site, weight before bias)."""
        shapes = {}
        for name, ps in self.parts().items():
            shape = self.part_shape(ps[0])
            if ps[0].rows is not None:
                shape = torch.Size([ps[-1].rows[1], *shape[1:]])
            shapes[name] = shape
        return shapes

    def assemble(self, per_part: Mapping[tuple[str, tuple[int, int] | None], torch.Tensor],
                 dim: int = 0) -> dict[str, torch.Tensor]:
        """Join per-part tensors ``{(name, rows): [..., part rows, ...]}`` into whole parameters along ``dim``."""
        return {name: torch.cat([per_part[(p.name, p.rows)] for p in ps], dim) if len(ps) > 1
                else per_part[(name, ps[0].rows)] for name, ps in self.parts().items()}

    def readers(self, space: str) -> list[Site]:
        return [s for s in self.sites if s.in_space == space]

    def writers(self, space: str) -> list[Site]:
        return [s for s in self.sites if s.out_space == space]

    def space_slices(self) -> dict[str, slice]:
        """Space name -> its slice of the concatenated neuron axis."""
        slices, offset = {}, 0
        for s in self.spaces:
            slices[s.name] = slice(offset, offset + s.size)
            offset += s.size
        return slices

    def split_by_space(self, t: torch.Tensor, dim: int) -> dict[str, torch.Tensor]:
        """Space name -> its part of ``t`` along the concatenated neuron axis ``dim`` (views, one ``split``: its
        backward writes one gradient of ``t``'s size, where a slice per space writes one each)."""
        return dict(zip((s.name for s in self.spaces), t.split([s.size for s in self.spaces], dim)))

    def fixed_neurons(self) -> list[int]:
        """Positions on the concatenated neuron axis of the neurons no symmetry moves (``Trivial`` spaces)."""
        return [i for space, sl in zip(self.spaces, self.space_slices().values()) if not space.permutable
                for i in range(sl.start, sl.stop)]

    # ------------------------------------------------------------------ symmetry
    def restrict(self, sites: Iterable[str], fixed: Iterable[str] = ()) -> "NetworkSpec":
        """The part of the spec formed by ``sites`` (and their spaces), with the spaces ``fixed`` made ``Trivial``:
        what a model of only some layers may assume when the others stay as they are (a frozen layer's spaces
        cannot move, since its parameters do not)."""
        keep = set(sites)
        unknown = keep - {s.name for s in self.sites}
        if unknown:
            raise KeyError(f"no sites {sorted(unknown)} in this spec")
        kept = tuple(s for s in self.sites if s.name in keep)
        used = {name for s in kept for name in (s.in_space, s.out_space)}
        fixed = set(fixed)
        spaces = tuple(Space(s.name, s.size, Trivial()) if s.name in fixed else s for s in self.spaces if s.name in used)
        return NetworkSpec(spaces, kept)

    def sample(self, generator: torch.Generator | None = None) -> SpecElement:
        """A random element of every space's group (float64 factors; spaces absent act by the identity)."""
        return {s.name: s.group.sample(s.size, generator) for s in self.spaces if s.permutable}

    def transform_parameters(self, params: Mapping[str, torch.Tensor], element: Mapping[str, Element],
                             leading: int = 0) -> dict[str, torch.Tensor]:
        """Move parameters (or weight-space features) by ``element``.

        ``params[name]`` is ``[*lead, *param.shape, *trail]`` with ``leading`` axes before the
        parameter's own (features may trail). Rows: ``rho(g) W``; columns: ``W rho(g)^-1``;
        diagonals: the permutation part of ``g``. Names that are not parameters of the spec pass through.
        """
        out = dict(params)
        for name, ps in self.parts().items():
            if name not in out:
                continue
            whole = out[name]
            pieces = [whole] if ps[0].rows is None else \
                [whole.narrow(leading, p.rows[0], p.rows[1] - p.rows[0]) for p in ps]
            moved = []
            for p, t in zip(ps, pieces):
                for i, axis in enumerate(p.axes):
                    g = element.get(axis.space) if axis.space is not None else None
                    if g is None:
                        continue
                    dim = leading + i
                    if axis.role == "row":
                        t = g.act(t, dim)
                    elif axis.role == "col":
                        t = g.act_inverse_transpose(t, dim)
                    else:
                        t = g.permute_only(t, dim)
                moved.append(t)
            out[name] = moved[0] if len(moved) == 1 else torch.cat(moved, leading)
        return out

    def transform_neurons(self, x: torch.Tensor, element: Mapping[str, Element], dim: int = -2,
                          roles: Sequence[ChannelRole] | None = None) -> torch.Tensor:
        """Move a neuron tensor ``[..., N, ..., f]`` (all spaces concatenated along ``dim``) by ``element``.

        ``roles[c]`` says how channel ``c`` (the last axis) moves: ``"act"`` (``rho``) or ``"grad"``
        (``rho^-T``); ``None`` moves every channel like activations.
        """
        dim = dim % x.dim()
        if dim == x.dim() - 1 and roles is not None:
            raise ValueError("channel roles need the neuron axis before the channel axis")
        parts = []
        for space, sl in zip(self.spaces, self.space_slices().values()):
            block = x.narrow(dim, sl.start, sl.stop - sl.start)
            g = element.get(space.name)
            if g is not None:
                if roles is None or all(r == "act" for r in roles):
                    block = g.act(block, dim)
                else:
                    channels = [g.act(block[..., c:c + 1], dim) if r == "act" else
                                g.act_inverse_transpose(block[..., c:c + 1], dim) for c, r in enumerate(roles)]
                    block = torch.cat(channels, -1)
            parts.append(block)
        return torch.cat(parts, dim)

    def permutation_part(self, element: Mapping[str, Element]) -> SpecElement:
        """The permutations of ``element`` alone (what models that respect only permutations see)."""
        out: SpecElement = {}
        for name, g in element.items():
            if isinstance(g, Monomial):
                out[name] = Monomial(g.perm)
            elif not isinstance(g, Identity):
                raise ValueError(f"the element on space {name!r} is not monomial; it has no permutation part")
        return out

    # ------------------------------------------------------------------ serialisation
    def to_json(self) -> str:
        def axis(a: Axis) -> list:
            return [a.role, a.space if a.space is not None else a.size]

        own = {p.name for site in self.sites for p in site.parameters()}
        return json.dumps({
            "version": 2,
            "spaces": [[s.name, s.size, s.group.to_json()] for s in self.spaces],
            "sites": [[s.name, s.kind, s.in_space, s.out_space, s.weight, s.bias,
                       *([{k: list(v) for k, v in (("rows", s.rows), ("kernel", s.kernel)) if v}]
                         if s.rows or s.kernel else [])] for s in self.sites],
            "parameters": [[p.name, [axis(a) for a in p.axes]] for p in self.parameters if p.name not in own],
        })

    @classmethod
    def from_json(cls, text: str) -> "NetworkSpec":
        """Inverse of :meth:`to_json`; also reads the version-1 layout (spaces ``[name, size, permutable]``)."""
        data = json.loads(text)
        if data.get("version") != 2:                      # version 1: a bool per space, sites without kind
            spaces = tuple(Space(n, int(d), Perm() if p else Trivial()) for n, d, p in data["spaces"])
            return cls(spaces, tuple(Site(*site) for site in data["sites"]))

        def axis(role: str, value) -> Axis:
            return Axis(role, size=int(value)) if role == "fixed" else Axis(role, value)

        spaces = tuple(Space(n, int(d), group_from_json(g)) for n, d, g in data["spaces"])
        sites = tuple(Site(name, i, o, w, b, kind, tuple(extra[0]["rows"]) if extra and "rows" in extra[0] else None,
                           tuple(extra[0].get("kernel", ())) if extra else ())
                      for name, kind, i, o, w, b, *extra in data["sites"])
        params = tuple(Parameter(n, tuple(axis(*a) for a in axes)) for n, axes in data.get("parameters", []))
        return cls(spaces, sites, params)
