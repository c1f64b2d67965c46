"""PES particles sharded across ``torch.distributed`` ranks (launched by ``torchrun``).

Every rank draws the same random numbers as a single process would (the same generator, the
same draws for *all* pairs: initialisations, batches, perturbations) and keeps its own slice of
the antithetic pairs; it unrolls only those, and the meta-gradient and meta-loss are summed
across ranks. The estimate therefore equals the one-process estimate with the same particles
(up to the order of floating-point sums), and checkpoints gather every shard into the layout a
single process writes, so a run resumes under any number of processes. Only rank 0 writes.

    torchrun --nproc-per-node 2 -m gradmetanet.cli run lopt --preset digits --meta-only
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..distributed import init_from_environment, is_main_process, shut_down

__all__ = ["Shard", "current_shard", "gather_examples", "init_from_environment", "is_main_process", "shut_down"]


@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` of ``world`` owns pairs ``[rank * p, (rank + 1) * p)`` of ``pairs``, ``p = pairs / world``.

    Run trees have ``2 * pairs`` rows globally (the ``+`` runs of all pairs, then the ``-`` runs)
    and ``2 * p`` locally, in the same order.
    """

    rank: int
    world: int
    pairs: int

    @property
    def local_pairs(self) -> int:
        return self.pairs // self.world

    @property
    def pair_slice(self) -> slice:
        return slice(self.rank * self.local_pairs, (self.rank + 1) * self.local_pairs)

    def local_runs(self, tree):
        """Rows of this rank's runs from a global run tree (dicts / tuples of ``[2 pairs, ...]`` tensors)."""
        if isinstance(tree, dict):
            return {k: self.local_runs(v) for k, v in tree.items()}
        if isinstance(tree, tuple):
            return tuple(self.local_runs(v) for v in tree)
        sl = self.pair_slice
        return torch.cat([tree[sl], tree[self.pairs + sl.start:self.pairs + sl.stop]])

    def global_runs(self, tree):
        """The global run tree from every rank's local one (a collective: every rank calls it)."""
        if isinstance(tree, dict):
            return {k: self.global_runs(v) for k, v in tree.items()}
        half = tree.shape[0] // 2
        plus, minus = self.gather(tree[:half].contiguous()), self.gather(tree[half:].contiguous())
        return torch.cat([plus, minus])

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``local`` along the first axis, in rank order."""
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local)
        return torch.cat(parts)

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        out = value.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def any(self, flag: bool) -> bool:
        out = torch.tensor(int(flag))
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return bool(out)


def current_shard(pairs: int) -> Shard | None:
    """This process's shard when a process group of several ranks is running, else ``None``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    world = dist.get_world_size()
    if pairs % world:
        raise ValueError(f"PES pairs ({pairs}) must be divisible by the number of processes ({world})")
    return Shard(dist.get_rank(), world, pairs)


def gather_examples(local: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's ``local [b_r, ...]`` concatenated along the first axis in rank order (``b_r`` may differ;
    the other axes may not): the global batch that one process would hold. A collective: every rank calls it."""
    world = dist.get_world_size(group)
    sizes = [torch.zeros((), dtype=torch.long) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor(local.shape[0], dtype=torch.long), group=group)
    rows = [int(s) for s in sizes]
    padded = local.new_zeros(max(rows), *local.shape[1:])
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:n] for part, n in zip(parts, rows)])
