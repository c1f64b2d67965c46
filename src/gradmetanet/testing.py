"""Test your own metanetworks for the symmetries they promise: the harness every model of the library is tested with.

Given a spec and a function, :func:`check_symmetry` draws an element of every space's group
(permutations, signs, positive scales, GL) and checks in float64 that moving the input moves the
output alike (equivariance; invariance is the case where the output does not move), and then
that breaking a symmetry the spec does not declare changes the output (sensitivity):

- ``fixed``: permute a ``Trivial`` space (inputs, outputs);
- ``swap``: exchange the positions of two spaces of equal size (the neuron axis, and so the
  positional codes, then give each space's data the other's place; ``move_in`` reorders by name);
- ``untie``: move one incidence of a tied space and not the others;
- ``negative_scale``: a negative factor on a ``ScalePerm`` space.

A breaker is an element the caller's ``move`` functions apply exactly as they apply symmetries,
so a function that ignored it would return the moved output, and the harness sees the difference.

The movers for the library's containers are here too (:func:`move_gradient_batch`, :func:`move_outputs`,
:func:`move_weight_space`), and :func:`check_metanetwork` runs the whole check on a model that reads a
:class:`~gradmetanet.GradientBatch`::

    from gradmetanet import NetworkSpec
    from gradmetanet.testing import check_metanetwork
    check_metanetwork(MyMetanet(), NetworkSpec.chain([3, 8, 8, 2]), sensitivity=("fixed", "swap"))
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import torch

from torch import nn

from .features.neurons import GradientBatch
from .core import Monomial, NetworkSpec, Perm, SpecElement

__all__ = ["check_symmetry", "check_metanetwork", "breakers", "distance", "move_gradient_batch", "move_outputs",
           "move_weight_space", "Move"]

#: ``move(x, element, spec)``: ``x`` moved by a group element of ``spec`` (a breaker may bring its own spec)
Move = Callable[[Any, SpecElement, NetworkSpec], Any]


def _leaves(x: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) output, in a fixed order."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for k in sorted(x) for t in _leaves(x[k])]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _leaves(v)]
    if hasattr(x, "activations"):          # a GradientSet
        return _leaves(x.activations) + _leaves(x.output_grads) + _leaves(x.outputs)
    if hasattr(x, "features"):             # a GradientBatch
        return _leaves(x.features) + _leaves(x.params or {})
    raise TypeError(f"cannot compare outputs of type {type(x).__name__}")


def distance(a: Any, b: Any) -> float:
    """Largest absolute difference, relative to max(1, largest magnitude)."""
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb) and all(x.shape == y.shape for x, y in zip(la, lb)), "output structure changed"
    scale = max(1.0, max(x.abs().max().item() for x in la))
    return max((x - y).abs().max().item() for x, y in zip(la, lb)) / scale


def _untied(spec: NetworkSpec, space: str) -> NetworkSpec:
    """``spec`` with the first site reading ``space`` through a parameter column given a copy of it: moving the
    copy unties them (a LayerNorm reads its space without a column, so it is passed over)."""
    reader = next(s for s in spec.readers(space)
                  if any(a.space == space and a.role == "col" for p in s.parameters() for a in p.axes))
    copy = f"{space}~untied"
    spaces = spec.spaces + (replace(spec.space(space), name=copy),)
    sites = tuple(replace(s, in_space=copy) if s is reader else s for s in spec.sites)
    return NetworkSpec(spaces, sites)


def breakers(spec: NetworkSpec, generator: torch.Generator) -> dict[str, tuple[NetworkSpec, SpecElement]]:
    """Non-symmetries of ``spec``, each as (the spec to move with, an element of it)."""
    out: dict[str, tuple[NetworkSpec, SpecElement]] = {}
    for space in spec.spaces:
        if not space.permutable and space.size > 1 and "fixed" not in out:
            out["fixed"] = (spec, {space.name: Monomial(torch.arange(space.size).roll(1))})
        if space.group.name == "scale_perm" and "negative_scale" not in out:
            scale = torch.ones(space.size, dtype=torch.float64)
            scale[0] = -1.7
            out["negative_scale"] = (spec, {space.name: Monomial(torch.arange(space.size), scale)})
        if space.permutable and len(spec.readers(space.name)) + len(spec.writers(space.name)) > 2 \
                and "untie" not in out:
            loose = _untied(spec, space.name)
            out["untie"] = (loose, {f"{space.name}~untied": Perm().sample(space.size, generator)})
    sizes: dict[int, str] = {}
    for space in spec.spaces:
        if space.size in sizes and "swap" not in out:
            i, j = spec.spaces.index(spec.space(sizes[space.size])), spec.spaces.index(space)
            order = list(spec.spaces)
            order[i], order[j] = order[j], order[i]
            out["swap"] = (NetworkSpec(tuple(order), spec.sites, spec.parameters), {})
        sizes.setdefault(space.size, space.name)
    return out


def check_symmetry(spec: NetworkSpec, fn: Callable[[Any], Any], x: Any, move_in: Move, move_out: Move, *,
                   group: str = "full", trials: int = 2, atol: float = 1e-9, sensitivity: tuple[str, ...] = (),
                   seed: int = 0) -> None:
    """Assert ``fn(move_in(x, g)) == move_out(fn(x), g)`` for random ``g`` and that each named breaker fails.

    A breaker must move the output 100 times more than the worst equivariance error (and more than
    1e-12): far above float64 noise. ``group="perm"`` draws only the permutation part (for models that promise permutations only).
    ``move_in`` / ``move_out`` receive the spec to move with (a breaker may bring its own).
    The ``swap`` breaker moves nothing: its spec lists two spaces in exchanged order.
    """
    gen = torch.Generator().manual_seed(seed)
    y = fn(x)
    worst = 0.0
    for _ in range(trials):
        g = spec.sample(gen)
        if group == "perm":
            g = spec.permutation_part(g)
        err = distance(fn(move_in(x, g, spec)), move_out(y, g, spec))
        assert err < atol, f"not equivariant: error {err:.3g} (group {group})"
        worst = max(worst, err)
    available = breakers(spec, gen)
    for name in sensitivity:
        assert name in available, f"spec has no {name!r} breaker ({list(available)})"
        loose, g = available[name]
        moved_in = move_in(x, g, loose)
        change = distance(fn(moved_in), move_out(y, g, loose))
        assert change > max(100 * worst, 1e-12), \
            f"insensitive to breaker {name!r}: change {change:.3g}, equivariance error {worst:.3g}"


def move_gradient_batch(batch: GradientBatch, element: SpecElement, spec: NetworkSpec) -> GradientBatch:
    """A batch's features and parameters moved by ``element``; ``spec`` may list the spaces in another order (the
    ``swap`` breaker), and the features are then reordered to it by space name."""
    slices = batch.spec.space_slices()
    feats = torch.cat([batch.features[:, :, slices[s.name]] for s in spec.spaces], 2)
    return GradientBatch(spec, feats, batch.params).transform(element)


def move_outputs(out: Any, element: SpecElement, spec: NetworkSpec) -> Any:
    """A metanetwork's output moved: weight-space outputs ``{param: [B, *shape, C]}`` as parameters, neuron outputs
    ``{space: [B, n, C]}`` by space, an invariant tensor ``[B, C]`` not at all."""
    if isinstance(out, torch.Tensor):
        return out
    if set(out) == {s.name for s in spec.spaces}:
        return {k: element[k].act(v, 1) if k in element else v for k, v in out.items()}
    return spec.transform_parameters(out, element, leading=1)


def move_weight_space(x: dict[str, torch.Tensor], element: SpecElement, spec: NetworkSpec) -> dict[str, torch.Tensor]:
    """Weight-space features ``{param: [B, *shape, C]}`` moved as parameters."""
    return spec.transform_parameters(x, element, leading=1)


def check_metanetwork(model: nn.Module, spec: NetworkSpec, *, networks: int = 2, examples: int = 5,
                      features: int = 2, group: str = "full", sensitivity: tuple[str, ...] = (),
                      atol: float = 1e-9, seed: int = 0) -> None:
    """Check a metanetwork that reads a :class:`~gradmetanet.GradientBatch` ``[networks, examples, N, features]``
    (random, float64; the model is cast to float64 for the check) for equivariance to ``spec``'s groups
    (``group="perm"``: permutations only), invariance to the order of the examples, and sensitivity to the
    named breakers. Raises ``AssertionError`` naming what failed."""
    gen = torch.Generator().manual_seed(seed)
    batch = GradientBatch(spec, torch.randn(networks, examples, spec.n_neurons, features, generator=gen,
                                            dtype=torch.float64))
    model = model.double()
    with torch.no_grad():
        check_symmetry(spec, model, batch, move_gradient_batch, move_outputs, group=group, atol=atol,
                       sensitivity=sensitivity, seed=seed)
        order = torch.randperm(examples, generator=gen).roll(1)
        err = distance(model(batch.transform({}, order)), model(batch))
    assert err < atol, f"not invariant to the order of the examples: error {err:.3g}"
