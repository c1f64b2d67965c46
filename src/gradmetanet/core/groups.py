"""Groups that act on one axis of neurons, as data.

A group acts on an axis of ``n`` neurons through a representation ``rho(g)``, an ``n x n``
matrix that is never materialised for the monomial groups (permutations, signs, positive
scales): an element stores an index and a vector of factors. An element acts on any tensor
axis with :meth:`Element.act` (``rho(g) x``), :meth:`Element.act_inverse` (``rho(g)^-1 x``)
and :meth:`Element.act_inverse_transpose` (``rho(g)^-T x``), all along ``dim``.

==============  ==========================================  ==================================
group (name)    element                                     where it is the symmetry
==============  ==========================================  ==================================
Trivial         identity                                    inputs, outputs, vocabulary
Perm            a permutation                               hidden neurons
SignPerm        a permutation and signs ``+-1``             before an odd activation (tanh, sine)
ScalePerm       a permutation and positive scales           before ReLU / LeakyReLU
GL(r)           an invertible ``r x r`` matrix              a linear hidden axis, a LoRA rank
Blocks(h, in)   one element of ``in`` per block of neurons  attention heads (heads keep their id)
==============  ==========================================  ==================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Group", "Trivial", "Perm", "SignPerm", "ScalePerm", "GL", "Blocks", "Element", "Identity",
           "Monomial", "Matrix", "group_from_json", "GROUP_NAMES"]

GROUP_NAMES = ("trivial", "perm", "sign_perm", "scale_perm", "gl", "blocks")


class Element:
    """A group element acting on one axis; subclasses implement the three actions."""

    size: int

    def act(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """``rho(g) x`` along ``dim``."""
        raise NotImplementedError

    def act_inverse(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """``rho(g)^-1 x`` along ``dim``."""
        raise NotImplementedError

    def act_inverse_transpose(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """``rho(g)^-T x`` along ``dim`` (how gradients and the columns of a reader move)."""
        raise NotImplementedError

    def permute_only(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The permutation part alone (how a ``diag`` parameter moves, e.g. a LayerNorm gain)."""
        raise NotImplementedError(f"{type(self).__name__} has no permutation part: a diag axis cannot live "
                                  "on a space with this group")


@dataclass(frozen=True)
class Identity(Element):
    size: int

    def act(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x

    act_inverse = act_inverse_transpose = permute_only = act


def _along(v: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
    """``v [n]`` shaped to broadcast along axis ``dim`` of ``x``, in ``x``'s dtype and device."""
    dim = dim % x.dim()
    return v.to(dtype=x.dtype, device=x.device).reshape([-1 if d == dim else 1 for d in range(x.dim())])


@dataclass(frozen=True)
class Monomial(Element):
    """``rho(g) = D P``: new entry ``i`` is ``scale[i] * x[perm[i]]`` (``scale`` may be ``None``: all ones).

    Its inverse transpose is ``D^-1 P``, its inverse ``P^T D^-1``; nothing ``n x n`` is formed.
    """

    perm: torch.Tensor
    scale: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.perm.numel()

    def permute_only(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x.index_select(dim, self.perm.to(x.device))

    def act(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        y = self.permute_only(x, dim)
        return y if self.scale is None else y * _along(self.scale, y, dim)

    def act_inverse_transpose(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        y = self.permute_only(x, dim)
        return y if self.scale is None else y / _along(self.scale, y, dim)

    def act_inverse(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        y = x if self.scale is None else x / _along(self.scale, x, dim)
        return y.index_select(dim, torch.argsort(self.perm).to(x.device))


@dataclass(frozen=True)
class Matrix(Element):
    """A dense invertible ``rho(g) = M [n, n]`` (GL, and blocks of it)."""

    matrix: torch.Tensor

    @property
    def size(self) -> int:
        return self.matrix.shape[0]

    def _apply(self, m: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
        moved = x.movedim(dim, -1)
        return (moved @ m.to(dtype=x.dtype, device=x.device).T).movedim(-1, dim)

    def act(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return self._apply(self.matrix, x, dim)

    def act_inverse(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return self._apply(torch.linalg.inv(self.matrix), x, dim)

    def act_inverse_transpose(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return self._apply(torch.linalg.inv(self.matrix).T, x, dim)


class Group:
    """A group acting on an axis of neurons; ``name`` is one of :data:`GROUP_NAMES`."""

    name: str = ""

    def sample(self, size: int, generator: torch.Generator | None = None) -> Element:
        """A random element for an axis of ``size`` neurons (float64 factors)."""
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Group) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(repr(self.to_json()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Trivial(Group):
    """Only the identity: the order and scale of these neurons carry meaning."""

    name = "trivial"

    def sample(self, size: int, generator: torch.Generator | None = None) -> Element:
        return Identity(size)


class Perm(Group):
    """All permutations of the neurons."""

    name = "perm"

    def sample(self, size: int, generator: torch.Generator | None = None) -> Element:
        return Monomial(torch.randperm(size, generator=generator))


class SignPerm(Group):
    """Permutations with sign flips (the symmetry of an odd activation: ``tanh(-x) = -tanh(x)``)."""

    name = "sign_perm"

    def sample(self, size: int, generator: torch.Generator | None = None) -> Element:
        perm = torch.randperm(size, generator=generator)
        signs = torch.randint(2, (size,), generator=generator).to(torch.float64) * 2 - 1
        return Monomial(perm, signs)


@dataclass(frozen=True, eq=False)
class ScalePerm(Group):
    """Permutations with positive scales (``relu(s x) = s relu(x)`` for ``s > 0``).

    Samples scales log-uniformly in ``[low, high]`` (default ``[0.1, 10]``).
    """

    low: float = 0.1
    high: float = 10.0
    name = "scale_perm"

    def sample(self, size: int, generator: torch.Generator | None = None) -> Element:
        perm = torch.randperm(size, generator=generator)
        u = torch.rand(size, generator=generator, dtype=torch.float64)
        return Monomial(perm, torch.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low))))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name}


class GL(Group):
    """All invertible matrices (a purely linear axis; the rank axis of a LoRA pair).

    Samples ``Q1 diag(s) Q2`` with random orthogonal ``Q1, Q2`` and ``s`` log-uniform in ``[0.5, 2]``:
    well conditioned, so float64 checks stay exact to ~1e-12.
    """

    name = "gl"

    def sample(self, size: int, generator: torch.Generator | None = None) -> Element:
        def orthogonal() -> torch.Tensor:
            q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
            return q * torch.sign(torch.diagonal(r))
        s = torch.exp((torch.rand(size, generator=generator, dtype=torch.float64) * 2 - 1) * math.log(2.0))
        return Matrix(orthogonal() * s @ orthogonal())


class Blocks(Group):
    """``heads`` consecutive blocks of equal size, each acted on by its own element of ``inner``.

    Blocks are not exchanged: every head keeps its identity (models tell heads apart by a
    head-index code), and only the neurons inside a head move.
    """

    name = "blocks"

    def __init__(self, heads: int, inner: Group) -> None:
        if heads < 1:
            raise ValueError(f"Blocks needs at least one block, got {heads}")
        self.heads, self.inner = heads, inner

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "heads": self.heads, "inner": self.inner.to_json()}

    def __repr__(self) -> str:
        return f"Blocks({self.heads}, {self.inner!r})"

    def sample(self, size: int, generator: torch.Generator | None = None) -> Element:
        if size % self.heads:
            raise ValueError(f"an axis of {size} neurons cannot be cut into {self.heads} equal blocks")
        d = size // self.heads
        parts = [self.inner.sample(d, generator) for _ in range(self.heads)]
        if all(isinstance(p, Identity) for p in parts):
            return Identity(size)
        if all(isinstance(p, Monomial) for p in parts):
            perm = torch.cat([p.perm + i * d for i, p in enumerate(parts)])
            scales = [p.scale for p in parts]
            scale = None if all(s is None for s in scales) else torch.cat(
                [torch.ones(d, dtype=torch.float64) if s is None else s for s in scales])
            return Monomial(perm, scale)
        return Matrix(torch.block_diag(*[p.matrix for p in parts]))


_BY_NAME: dict[str, type[Group]] = {"trivial": Trivial, "perm": Perm, "sign_perm": SignPerm,
                                    "scale_perm": ScalePerm, "gl": GL}


def group_from_json(data: dict[str, Any]) -> Group:
    """Inverse of :meth:`Group.to_json`."""
    name = data.get("name")
    if name == "blocks":
        return Blocks(int(data["heads"]), group_from_json(data["inner"]))
    if name not in _BY_NAME:
        raise ValueError(f"unknown group {name!r}; known: {list(GROUP_NAMES)}")
    return _BY_NAME[name]()
