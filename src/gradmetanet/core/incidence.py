"""Incidence features: what GradMetaNet reads, one row per (site, role, neuron), pooled per neuron.

A site reads the activations of its in-space (role ``"in"``, channel 0) and writes output
gradients on its out-space (role ``"out"``, channel 1). A neuron's feature in a channel is the
mean of every incidence that reaches it, a segment mean over the contiguous slice of its space:
a residual neuron read by several sites gathers all their activations, as the paper stacks
residual features. The two slots no site fills are chosen so: a space nobody writes (the inputs)
has a zero gradient channel; a space nobody reads (the outputs) takes the recorded network
output as its activation. On an MLP chain every neuron has one reader and one writer, and the
result is the chain's ``[b T, N, 2]`` exactly.

Tokens (sequence positions, a convolution's output positions, a layer's repeated uses) fold into the
set axis, example-major, when every site records the same number of them. When sites disagree (a CNN
whose convolutions run at several resolutions before a linear head, BERT's pooler reading only the first
token), each site's factors are averaged over their tokens first and the set axis holds one row per
example: a mean over positions is linear and per neuron, so it commutes with every group action
(permutations, signs, positive scales).
"""

from __future__ import annotations

from typing import Mapping

import torch

from .kinds import site_kind
from .spec import NetworkSpec

__all__ = ["neuron_tensor", "incidence_counts"]


def incidence_counts(spec: NetworkSpec) -> dict[str, tuple[int, int]]:
    """Space name -> ``(readers, writers)``: how many sites read and write it."""
    return {s.name: (len(spec.readers(s.name)), len(spec.writers(s.name))) for s in spec.spaces}


def neuron_tensor(spec: NetworkSpec, activations: Mapping[str, torch.Tensor], output_grads: Mapping[str, torch.Tensor],
                  outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``[*lead, b T, N, 2]`` neuron features from per-site ``a: [*lead, b, T, d_in]`` and ``g: [*lead, b, T, d_out]``
    (``[*lead, b, N, 2]`` when the sites record different numbers of tokens, see the module docstring).

    Channel 0 is the mean activation read from the neuron, channel 1 the mean gradient written to
    it; ``outputs`` (site -> ``[*lead, b, T, d_out]``) fill the activation of spaces nobody reads.
    Works under ``vmap`` (no in-place writes into captured tensors).
    """
    counts = incidence_counts(spec)
    dtype = next(iter(output_grads.values())).dtype
    tokens = {t.shape[-2] for t in (*activations.values(), *output_grads.values(), *outputs.values())}

    def per_example(t: torch.Tensor) -> torch.Tensor:
        """``[*lead, b, T, d] -> [*lead, b, 1, d]`` (the token mean) when the sites disagree on ``T``."""
        return t.to(dtype).mean(-2, keepdim=True) if len(tokens) > 1 else t
    act_parts, grad_parts = [], []
    for space in spec.spaces:
        readers, writers = spec.readers(space.name), spec.writers(space.name)
        n_read, n_write = counts[space.name]
        if n_read:
            act = _mean([per_example(_dense(s, activations[s.name], space.size)) for s in readers], space.name,
                        "activations")
        else:
            recorded = [outputs[s.name] for s in writers if s.name in outputs]
            if not recorded:
                raise ValueError(f"space {space.name!r} has no reader and no recorded output")
            act = _mean([per_example(t) for t in recorded], space.name, "outputs")
        grad = _mean([per_example(output_grads[s.name]) for s in writers], space.name, "gradients") if n_write else None
        if grad is not None and grad.shape != act.shape:
            raise ValueError(f"space {space.name!r}: activation {list(act.shape)} and gradient "
                             f"{list(grad.shape)} disagree on examples or tokens")
        act_parts.append(act)
        grad_parts.append(torch.zeros_like(act, dtype=dtype) if grad is None else grad)
    act_parts = [a.to(dtype) for a in act_parts]
    grad_parts = [g.to(dtype) for g in grad_parts]
    return torch.stack([torch.cat(act_parts, -1), torch.cat(grad_parts, -1)], -1).flatten(-4, -3)


def _dense(site, a: torch.Tensor, size: int) -> torch.Tensor:
    """The per-neuron activation of ``site`` on its in-space (token ids of an embedding become one-hot, a
    convolution's patches are averaged over the kernel taps)."""
    return site_kind(site.kind).dense_activation(site, a, size)


def _mean(tensors: list[torch.Tensor], space: str, what: str) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise ValueError(f"space {space!r}: the sites that touch it record {what} of different shapes "
                         f"{sorted(shapes)} (a site used a different number of times)")
    return torch.stack(tensors).mean(0)
