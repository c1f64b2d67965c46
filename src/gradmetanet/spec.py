"""Network specs: the neuron spaces and linear sites of a base network, and their symmetries.

A *neuron space* is an axis of neurons (the inputs of an MLP, one hidden layer, its outputs).
A *linear site* is an affine map ``y = W x + b`` that reads one space and writes another.
Permuting a permutable space permutes the rows of every site that writes into it and the
columns of every site that reads from it; that is the whole symmetry group, written as data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch
from torch import nn

__all__ = ["NeuronSpace", "LinearSite", "NetworkSpec", "UnsupportedModuleError"]


class UnsupportedModuleError(TypeError):
    """A base network contains a module whose parameters gradmetanet cannot describe."""


@dataclass(frozen=True)
class NeuronSpace:
    """An axis of ``size`` neurons; ``permutable`` says whether its order is a symmetry."""

    name: str
    size: int
    permutable: bool


@dataclass(frozen=True)
class LinearSite:
    """One affine map ``y = W x + b`` of the base network.

    ``name`` is the module path (``"0"``, ``"encoder.fc1"``); ``weight`` and ``bias`` are the
    parameter names as they appear in the model's ``named_parameters()``.
    """

    name: str
    in_space: str
    out_space: str
    weight: str
    bias: str | None

    @property
    def has_bias(self) -> bool:
        return self.bias is not None


@dataclass(frozen=True)
class NetworkSpec:
    """Neuron spaces and linear sites of a base network (see module docstring)."""

    spaces: tuple[NeuronSpace, ...]
    sites: tuple[LinearSite, ...]
    _space_index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index = {s.name: i for i, s in enumerate(self.spaces)}
        if len(index) != len(self.spaces):
            raise ValueError("NetworkSpec: neuron space names must be unique")
        for site in self.sites:
            for space in (site.in_space, site.out_space):
                if space not in index:
                    raise ValueError(f"NetworkSpec: site {site.name!r} refers to unknown space {space!r}")
        object.__setattr__(self, "_space_index", index)

    # ------------------------------------------------------------------ construction
    @classmethod
    def chain(cls, sizes: Iterable[int], site_names: Iterable[str] | None = None,
              bias: bool | Iterable[bool] = True) -> "NetworkSpec":
        """The spec of an MLP ``d0 -> d1 -> ... -> dL`` whose layers are named ``site_names``.

        Spaces are ``s0 .. sL``; ``s0`` (inputs) and ``sL`` (outputs) are fixed, the rest permutable.
        """
        sizes = list(sizes)
        if len(sizes) < 2:
            raise ValueError(f"an MLP chain needs at least two widths, got {sizes}")
        n_layers = len(sizes) - 1
        names = [str(i) for i in range(n_layers)] if site_names is None else list(site_names)
        biases = [bias] * n_layers if isinstance(bias, bool) else list(bias)
        if len(names) != n_layers or len(biases) != n_layers:
            raise ValueError("chain: need one site name and one bias flag per layer")
        spaces = tuple(NeuronSpace(f"s{l}", int(d), 0 < l < n_layers) for l, d in enumerate(sizes))
        sites = tuple(
            LinearSite(name, f"s{l}", f"s{l + 1}", f"{name}.weight" if name else "weight",
                       (f"{name}.bias" if name else "bias") if has_bias else None)
            for l, (name, has_bias) in enumerate(zip(names, biases))
        )
        return cls(spaces, sites)

    @classmethod
    def from_module(cls, model: nn.Module) -> "NetworkSpec":
        """Describe an MLP: ``nn.Linear`` layers, in registration order, with element-wise modules between.

        Parameter-free modules between the layers are assumed to act element-wise on neurons (ReLU,
        tanh, a custom sine); a model that mixes hidden neurons without parameters (a softmax over
        a hidden layer) must be described by hand.

        Raises :class:`UnsupportedModuleError` naming the path of any parameterised module other
        than ``nn.Linear`` (or a bare ``nn.Parameter``), and :class:`ValueError` when the linear
        layers do not form a chain (``out_features`` of one equal to ``in_features`` of the next).
        The order in which layers actually run is checked again at capture time.
        """
        linears: list[tuple[str, nn.Linear]] = []
        for path, module in model.named_modules():
            own = [n for n, _ in module.named_parameters(recurse=False)]
            if isinstance(module, nn.Linear):
                linears.append((path, module))
            elif own:
                where = path or "<root>"
                raise UnsupportedModuleError(
                    f"module {where!r} ({type(module).__name__}) has parameters {own} that gradmetanet "
                    "cannot describe; supported parameterised modules: nn.Linear. Capture a subset with "
                    "GradientCapture(model, layers=[...]) to ignore it."
                )
        if not linears:
            raise UnsupportedModuleError(f"{type(model).__name__} contains no nn.Linear layer to describe")
        for (p_prev, prev), (p_next, nxt) in zip(linears, linears[1:]):
            if prev.out_features != nxt.in_features:
                raise ValueError(
                    f"linear layers {p_prev!r} (out_features={prev.out_features}) and {p_next!r} "
                    f"(in_features={nxt.in_features}) do not form an MLP chain; describe the network "
                    "with NetworkSpec(...) directly or capture a subset with layers=[...]"
                )
        sizes = [linears[0][1].in_features] + [m.out_features for _, m in linears]
        return cls.chain(sizes, [p for p, _ in linears], [m.bias is not None for _, m in linears])

    @classmethod
    def independent(cls, named_linears: Iterable[tuple[str, nn.Linear]]) -> "NetworkSpec":
        """Sites with their own fixed input and output spaces: no symmetry is assumed.

        Used when only a subset of a model's layers is captured, whose symmetry is unknown.
        """
        spaces: list[NeuronSpace] = []
        sites: list[LinearSite] = []
        for path, module in named_linears:
            spaces += [NeuronSpace(f"{path}:in", module.in_features, False),
                       NeuronSpace(f"{path}:out", module.out_features, False)]
            sites.append(LinearSite(path, f"{path}:in", f"{path}:out", f"{path}.weight",
                                    f"{path}.bias" if module.bias is not None else None))
        return cls(tuple(spaces), tuple(sites))

    # ------------------------------------------------------------------ queries
    def space(self, name: str) -> NeuronSpace:
        return self.spaces[self._space_index[name]]

    @property
    def n_neurons(self) -> int:
        return sum(s.size for s in self.spaces)

    @property
    def n_params(self) -> int:
        return sum(shape.numel() for shape in self.param_shapes().values())

    def site(self, name: str) -> LinearSite:
        for site in self.sites:
            if site.name == name:
                return site
        raise KeyError(f"no linear site named {name!r}; sites: {[s.name for s in self.sites]}")

    def param_shapes(self) -> dict[str, torch.Size]:
        """Parameter name -> shape, in site order (weight before bias)."""
        shapes: dict[str, torch.Size] = {}
        for site in self.sites:
            d_in, d_out = self.space(site.in_space).size, self.space(site.out_space).size
            shapes[site.weight] = torch.Size([d_out, d_in])
            if site.bias is not None:
                shapes[site.bias] = torch.Size([d_out])
        return shapes

    def readers(self, space: str) -> list[LinearSite]:
        return [s for s in self.sites if s.in_space == space]

    def writers(self, space: str) -> list[LinearSite]:
        return [s for s in self.sites if s.out_space == space]

    def with_fixed(self, names: Iterable[str]) -> "NetworkSpec":
        """A copy in which the named spaces are no longer permutable."""
        fixed = set(names)
        spaces = tuple(NeuronSpace(s.name, s.size, s.permutable and s.name not in fixed) for s in self.spaces)
        return NetworkSpec(spaces, self.sites)

    # ------------------------------------------------------------------ symmetry
    def random_permutations(self, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One uniformly random permutation per permutable space (identity elsewhere is implied)."""
        return {s.name: torch.randperm(s.size, generator=generator) for s in self.spaces if s.permutable}

    def permute_parameters(self, params: Mapping[str, torch.Tensor], perms: Mapping[str, torch.Tensor],
                           leading: int = 0) -> dict[str, torch.Tensor]:
        """Apply neuron permutations to weight-space tensors.

        ``params[name]`` has shape ``[*lead, *param_shape, *trail]`` with ``leading`` axes before the
        parameter's own axes (features may trail). ``W -> P_out W P_in^T`` and ``b -> P_out b``:
        new row ``i`` is old row ``perm_out[i]``. Names that are not parameters of the spec pass through.
        """
        out = dict(params)
        for site in self.sites:
            p_in, p_out = perms.get(site.in_space), perms.get(site.out_space)
            if site.weight in out:
                w = out[site.weight]
                if p_out is not None:
                    w = w.index_select(leading, p_out.to(w.device))
                if p_in is not None:
                    w = w.index_select(leading + 1, p_in.to(w.device))
                out[site.weight] = w
            if site.bias is not None and site.bias in out and p_out is not None:
                out[site.bias] = out[site.bias].index_select(leading, p_out.to(out[site.bias].device))
        return out

    def neuron_index(self, perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Index ``[N]`` applying ``perms`` to the concatenation of all spaces (spec order).

        ``x.index_select(axis, spec.neuron_index(perms))`` permutes every space's block of a
        neuron axis as :meth:`permute_parameters` permutes the parameters.
        """
        parts, offset = [], 0
        for s in self.spaces:
            p = perms.get(s.name)
            parts.append(offset + (torch.arange(s.size) if p is None else p.cpu()))
            offset += s.size
        return torch.cat(parts)

    def space_slices(self) -> dict[str, slice]:
        """Space name -> its slice of the concatenated neuron axis."""
        slices, offset = {}, 0
        for s in self.spaces:
            slices[s.name] = slice(offset, offset + s.size)
            offset += s.size
        return slices

    # ------------------------------------------------------------------ serialisation
    def to_json(self) -> str:
        return json.dumps({
            "spaces": [[s.name, s.size, s.permutable] for s in self.spaces],
            "sites": [[s.name, s.in_space, s.out_space, s.weight, s.bias] for s in self.sites],
        })

    @classmethod
    def from_json(cls, text: str) -> "NetworkSpec":
        data = json.loads(text)
        return cls(tuple(NeuronSpace(n, int(d), bool(p)) for n, d, p in data["spaces"]),
                   tuple(LinearSite(*site) for site in data["sites"]))
