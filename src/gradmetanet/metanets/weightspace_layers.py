"""Equivariant weight-space layers generated from the spec's axis labels.

A parameter's *signature* is the tuple of its axis roles: ``("row", "col")`` for a linear weight,
``("row",)`` for a bias. A :class:`WeightSpaceLayer` owns one set of weights per signature,
never per layer position, so the same layer runs on networks of any depth and width::

    x'_p = A_sig x_p  +  sum_i U_sig,i z[space of axis i]  +  G_sig q

- ``z[s]: [B, n_s, K]`` summarises every neuron of space ``s``: for each (signature, axis) slot,
  the mean of the parameters with that signature over all their other axes, averaged over the
  parameters whose axis lies on ``s`` (zeros where none does), plus the neuron's positional code;
- ``q: [B, S C]``, per signature the mean of all its parameters' entries.

Every term commutes with permutations of every permutable space (the NP / DWS layers of Zhou et
al. and Navon et al. in this form); positional codes single out the neurons of fixed spaces.
The layer respects permutations only, a subgroup of the sign and scale groups of tanh / ReLU
spaces.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.spec import NetworkSpec, Parameter
from ..core.codes import neuron_codes

__all__ = ["WeightSpaceLayer", "LINEAR_SIGNATURES", "TRANSFORMER_SIGNATURES", "Signature"]

Signature = tuple[str, ...]
#: What an MLP's parameters look like: weights (row, col) and biases (row).
LINEAR_SIGNATURES: tuple[Signature, ...] = (("row", "col"), ("row",))
#: A transformer adds embedding tables (col vocab, row residual) and LayerNorm gains (diag).
TRANSFORMER_SIGNATURES: tuple[Signature, ...] = LINEAR_SIGNATURES + (("col", "row"), ("diag",))


def _key(signature: Signature) -> str:
    return "_".join(signature)


class WeightSpaceLayer(nn.Module):
    """``{param: [B, *shape, C_in]} -> {param: [B, *shape, C_out]}``, depth- and width-free (module docstring)."""

    def __init__(self, in_channels: int, out_channels: int, pe_dim: int = 8,
                 signatures: tuple[Signature, ...] = LINEAR_SIGNATURES) -> None:
        super().__init__()
        self.signatures = tuple(tuple(s) for s in signatures)
        self.slots = [(sig, i) for sig in self.signatures for i, role in enumerate(sig) if role != "fixed"]
        summary = len(self.slots) * in_channels + pe_dim
        n_global = len(self.signatures) * in_channels
        self.own = nn.ModuleDict({_key(s): nn.Linear(in_channels, out_channels) for s in self.signatures})
        self.from_neurons = nn.ModuleDict({
            _key(s): nn.ModuleList(nn.Linear(summary, out_channels, bias=False) for role in s if role != "fixed")
            for s in self.signatures})
        self.from_global = nn.ModuleDict({_key(s): nn.Linear(n_global, out_channels, bias=False)
                                          for s in self.signatures})
        self.pe_dim = pe_dim

    def _signature(self, p: Parameter) -> Signature:
        sig = tuple(a.role for a in p.axes)
        if sig not in self.signatures:
            raise ValueError(f"parameter {p.name!r} has axes {sig}; this layer handles {list(self.signatures)}")
        return sig

    def forward(self, x: dict[str, torch.Tensor], spec: NetworkSpec) -> dict[str, torch.Tensor]:
        some = next(iter(x.values()))
        B, C = some.shape[0], some.shape[-1]
        # every part of a parameter cut into row blocks (attention's Q, K, V) is a parameter of its own here
        params = [p for p in spec.parameters if p.name in x]
        part = {(p.name, p.rows): x[p.name] if p.rows is None else x[p.name][:, p.rows[0]:p.rows[1]] for p in params}
        sums: dict[tuple, dict[str, list[torch.Tensor]]] = {slot: {} for slot in self.slots}
        per_signature: dict[Signature, list[torch.Tensor]] = {s: [] for s in self.signatures}
        for p in params:
            sig, t = self._signature(p), part[(p.name, p.rows)]
            n_axes = len(p.axes)
            per_signature[sig].append(t.mean(tuple(range(1, 1 + n_axes))))
            for i, axis in enumerate(p.axes):
                if axis.role == "fixed":
                    continue
                others = tuple(1 + j for j in range(n_axes) if j != i)
                sums[(sig, i)].setdefault(axis.space, []).append(t.mean(others) if others else t)
        codes = neuron_codes(spec, self.pe_dim, some.dtype, some.device)
        slices = spec.space_slices()
        z = {}
        for space in spec.spaces:
            parts = [torch.stack(sums[slot][space.name]).mean(0) if space.name in sums[slot] else
                     some.new_zeros(B, space.size, C) for slot in self.slots]
            parts.append(codes[slices[space.name]].expand(B, -1, -1))
            z[space.name] = torch.cat(parts, -1)
        q = torch.cat([torch.stack(per_signature[s]).mean(0) if per_signature[s] else some.new_zeros(B, C)
                       for s in self.signatures], -1)
        out = {}
        for p in params:
            key, t = _key(self._signature(p)), part[(p.name, p.rows)]
            n_axes = len(p.axes)
            y = self.own[key](t) + self.from_global[key](q).view(B, *([1] * n_axes), -1)
            maps = iter(self.from_neurons[key])
            for i, axis in enumerate(p.axes):
                if axis.role == "fixed":
                    continue
                term = next(maps)(z[axis.space])                        # [B, n, C_out]
                shape = [B] + [axis_size if j == i else 1 for j, axis_size in
                               enumerate(t.shape[1:1 + n_axes])] + [term.shape[-1]]
                y = y + term.view(shape)
            out[(p.name, p.rows)] = y
        return {name: torch.cat([out[(p.name, p.rows)] for p in ps], 1) if len(ps) > 1 else out[(name, ps[0].rows)]
                for name, ps in spec.parts().items() if name in x}
