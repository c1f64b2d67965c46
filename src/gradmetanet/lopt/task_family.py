"""Meta-training on a family of tasks: MLPs of several widths, depths, batch sizes and datasets.

Members of a family have different parameter shapes, so their inner runs cannot share one
``vmap``. :class:`FamilyRuns` gives each member its own :class:`~gradmetanet.lopt.pes.TruncatedInnerRuns`
and presents them as one set of runs in the layout PES expects: antithetic pair ``k`` (runs ``k``
and ``k + pairs``) trains member ``k mod M``, so every PES estimate mixes every member, as
learned_optimization's task-family samplers do per particle. Losses of different members are
summed unweighted (cross-entropies of classifiers start near ``log(classes)``). Under ``torchrun``
each process advances its share of every member's pairs (each member's pairs must split evenly).
"""

from __future__ import annotations

import torch

from .distributed import Shard
from .inner_runs import TruncatedInnerRuns
from .optimizers import UpdateRule
from .tasks import Task, classification_task

__all__ = ["TaskFamily", "FamilyRuns", "make_runs", "task_family"]


class TaskFamily(Task):
    """Named member tasks meta-trained together (see :class:`FamilyRuns`)."""

    def __init__(self, members: dict[str, Task]) -> None:
        if not members:
            raise ValueError("a task family needs at least one member")
        self.members = dict(members)

    def __len__(self) -> int:
        return len(self.members)

    def init_params(self, n: int, generator: torch.Generator):
        raise TypeError("members of a task family have different parameter shapes: draw runs of each member "
                        "(FamilyRuns does), or pick one with family.members[name]")

    sample_batch = loss = init_params


def task_family(members: tuple[str, ...], seed: int = 0, validation_fraction: float = 0.0) -> TaskFamily:
    """A family of classification tasks named ``"DATASET:WIDTHS:BATCH"`` (see ``classification_task``)."""
    if len(set(members)) != len(members):
        raise ValueError(f"task family members must differ, got {list(members)}")
    return TaskFamily({m: classification_task(m, seed, validation_fraction) for m in members})


class FamilyRuns:
    """``n`` inner runs spread over the members of ``family`` (the interface of ``TruncatedInnerRuns``).

    Antithetic: pair ``k`` belongs to member ``k mod M`` (``n / 2 >= M`` so that every member
    trains); otherwise run ``i`` belongs to member ``i mod M``. Runs are advanced member by member
    from the one generator, so a run is reproducible and resumes exactly.
    """

    def __init__(self, family: TaskFamily, rule: UpdateRule, n: int, horizon: int, generator: torch.Generator,
                 antithetic: bool = False, objective: str = "train", loss_clip: float | None = None,
                 shard: Shard | None = None) -> None:
        m = len(family)
        units = n // 2 if antithetic else n
        if antithetic and n % 2:
            raise ValueError(f"antithetic runs come in pairs; got n = {n}")
        if units < m:
            raise ValueError(f"{units} {'pairs' if antithetic else 'runs'} cannot cover the {m} members of the task "
                             f"family; use at least {m}")
        if shard is not None and not antithetic:
            raise ValueError("only antithetic pairs are sharded across processes")
        self.horizon = horizon
        self.member_pairs = [torch.arange(j, units, m) for j in range(m)]      # pair k trains member k mod M
        world = 1 if shard is None else shard.world
        if any(len(pairs) % world for pairs in self.member_pairs):
            raise ValueError(f"under {world} processes every member's pairs must split evenly: {units} pairs over "
                             f"{m} members gives {[len(p) for p in self.member_pairs]}; use a multiple of "
                             f"{m * world} pairs")
        rank = 0 if shard is None else shard.rank
        local = self.owned_pairs(rank, world) if antithetic else torch.arange(units)
        self.n = 2 * len(local) if antithetic else units          # the runs this process advances
        self.index: list[torch.Tensor] = []      # each member's rows of this process's runs, in its runs' order
        self.groups: list[TruncatedInnerRuns] = []
        for j, (task, pairs) in enumerate(zip(family.members.values(), self.member_pairs)):
            own = torch.nonzero(local % m == j).flatten()
            self.index.append(torch.cat([own, own + len(local)]) if antithetic else own)
            member_shard = None if shard is None else Shard(shard.rank, shard.world, len(pairs))
            self.groups.append(TruncatedInnerRuns(task, rule, 2 * len(pairs) if antithetic else len(own), horizon,
                                                  generator, antithetic=antithetic, objective=objective,
                                                  loss_clip=loss_clip, shard=member_shard))

    def owned_pairs(self, rank: int, world: int) -> torch.Tensor:
        """The pairs process ``rank`` of ``world`` advances, ascending: of each member's pairs (``j, j + M, ...``)
        the ``rank``-th contiguous share, as :class:`Shard` splits a single task's pairs."""
        shares = [pairs[rank * (len(pairs) // world):(rank + 1) * (len(pairs) // world)] for pairs in self.member_pairs]
        return torch.cat(shares).sort().values

    @property
    def step(self) -> torch.Tensor:
        """Steps taken by every run since its last reset ``[n]``."""
        out = torch.zeros(self.n, dtype=torch.long)
        for idx, group in zip(self.index, self.groups):
            out[idx] = group.step
        return out

    def reset_finished(self, generator: torch.Generator) -> torch.Tensor:
        done = torch.zeros(self.n, dtype=torch.bool)
        for idx, group in zip(self.index, self.groups):
            done[idx] = group.reset_finished(generator)
        return done

    def unroll(self, meta: dict[str, torch.Tensor], length: int, generator: torch.Generator,
               stop: torch.Tensor | None = None) -> torch.Tensor:
        losses = torch.zeros(self.n)
        for idx, group in zip(self.index, self.groups):
            own_meta = {k: v[idx] for k, v in meta.items()}
            losses[idx] = group.unroll(own_meta, length, generator, None if stop is None else stop[idx])
        return losses

    def state_dict(self) -> dict:
        return {"members": [group.state_dict() for group in self.groups]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["members"]) != len(self.groups):
            raise ValueError(f"the state holds {len(state['members'])} members, this family {len(self.groups)}")
        for group, member_state in zip(self.groups, state["members"]):
            group.load_state_dict(member_state)


def make_runs(task: Task, rule: UpdateRule, n: int, horizon: int, generator: torch.Generator, **kwargs
              ) -> TruncatedInnerRuns | FamilyRuns:
    """Inner runs of a task, or of every member of a :class:`TaskFamily`."""
    if isinstance(task, TaskFamily):
        return FamilyRuns(task, rule, n, horizon, generator, **kwargs)
    return TruncatedInnerRuns(task, rule, n, horizon, generator, **kwargs)

