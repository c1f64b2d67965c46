"""Meta-training of update rules with Persistent Evolution Strategies (Vicol et al., 2021).

The pieces are separate, as in learned_optimization: a :class:`~gradmetanet.lopt.tasks.Task`,
the learned rule (:class:`~gradmetanet.lopt.optimizers.UpdateRule`), :class:`TruncatedInnerRuns`
(``2 x pairs`` inner runs advanced together, vectorised with ``vmap``), :class:`PES` (the
gradient estimator) and :class:`MetaTrainer` (Adam on the meta-parameters, atomic checkpoints,
exact resume).

PES with antithetic pairs: each pair ``k`` runs its inner problem under ``theta + eps_k`` and
``theta - eps_k``; ``xi_k`` accumulates the perturbations since the pair's inner runs were last
reset, and the estimate ``sum_k xi_k (L+_k - L-_k) / (2 pairs sigma^2)`` is unbiased for the
gradient of the whole unrolled objective despite the truncation. The meta-objective of a
truncation is the mean training loss over its steps (each step's mini-batch loss, computed with
the gradient anyway): the paper's "training loss", averaged along the trajectory as
learned_optimization's truncated estimators do, which rewards fast progress at every step and
has far less variance than the loss of one batch at the truncation's end. On small datasets,
where a horizon sees every example many times, the training loss rewards overfitting; there the
objective ``"validation"`` averages the loss of held-out batches after every step instead.
A :class:`~gradmetanet.lopt.task_family.TaskFamily` spreads the pairs over its members (MLPs of
several shapes and datasets), so one estimate mixes them all.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.nn.utils import parameters_to_vector
from tqdm.auto import tqdm

from ..atomic import atomic_replace
from .distributed import Shard, current_shard, is_main_process
from .inner_runs import TruncatedInnerRuns, stack_meta_parameters
from .optimizers import UpdateRule
from .task_family import make_runs
from .tasks import Task

__all__ = ["TruncatedInnerRuns", "PES", "MetaTrainer", "PESConfig", "stack_meta_parameters"]


class PES:
    """Antithetic PES estimator over ``pairs`` persistent pairs of inner runs."""

    def __init__(self, task: Task, rule: UpdateRule, pairs: int, sigma: float, truncation: int, horizon: int,
                 generator: torch.Generator, objective: str = "train", loss_clip: float | None = None,
                 shard: Shard | None = None) -> None:
        if horizon % truncation:
            raise ValueError(f"horizon ({horizon}) must be a multiple of the truncation length ({truncation})")
        self.rule, self.pairs, self.sigma, self.truncation, self.shard = rule, pairs, sigma, truncation, shard
        self.runs = make_runs(task, rule, 2 * pairs, horizon, generator, antithetic=True, objective=objective,
                              loss_clip=loss_clip, shard=shard)
        self.owned = self.runs.owned_pairs(shard.rank, shard.world) if shard is not None else torch.arange(pairs)
        self.local_pairs = len(self.owned)
        self.dim = parameters_to_vector(rule.parameters()).numel()
        self.xi = torch.zeros(self.local_pairs, self.dim)

    def _local(self, per_pair: torch.Tensor) -> torch.Tensor:
        """This process's rows of a ``[pairs, ...]`` draw."""
        return per_pair if self.shard is None else per_pair[self.owned]

    def state_dict(self) -> dict:
        xi = self.xi
        if self.shard is not None:                      # every process's rows, put back in pair order
            order = torch.cat([self.runs.owned_pairs(r, self.shard.world) for r in range(self.shard.world)])
            xi = torch.empty(self.pairs, self.dim).index_copy_(0, order, self.shard.gather(self.xi))
        return {"runs": self.runs.state_dict(), "xi": xi}

    def load_state_dict(self, state: dict) -> None:
        self.runs.load_state_dict(state["runs"])
        self.xi = self._local(state["xi"])

    def stagger(self, theta: torch.Tensor, generator: torch.Generator) -> None:
        """Advance each pair (both runs alike, under ``theta``) to a random truncation boundary of its episode.

        Without it every pair starts its episodes together, and successive estimates cycle
        through the phases of an episode (large early-training losses, then small ones);
        staggered pairs mix all phases in every estimate, as learned_optimization does.
        """
        offsets = torch.randint(self.runs.horizon // self.truncation, (self.pairs,), generator=generator)
        stop = self._local(offsets * self.truncation).repeat(2)
        meta = stack_meta_parameters(self.rule, theta.expand(2 * self.local_pairs, -1))
        self.runs.unroll(meta, int(offsets.max()) * self.truncation, generator, stop=stop)

    def estimate(self, theta: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, float]:
        """``(gradient estimate [D], mean meta-loss)`` for meta-parameters ``theta [D]`` (summed over processes)."""
        restarted = self.runs.reset_finished(generator)[: self.local_pairs]
        self.xi[restarted] = 0.0
        eps = self._local(self.sigma * torch.randn(self.pairs, self.dim, generator=generator))
        thetas = torch.cat([theta + eps, theta - eps])
        losses = self.runs.unroll(stack_meta_parameters(self.rule, thetas), self.truncation, generator)
        losses = torch.nan_to_num(losses, nan=1e6, posinf=1e6)       # a diverged run is a bad direction
        self.xi += eps
        diff = losses[: self.local_pairs] - losses[self.local_pairs:]
        g = (self.xi * diff[:, None]).sum(0) / (2 * self.pairs * self.sigma ** 2)
        total = losses.sum()
        if self.shard is not None:
            g, total = self.shard.sum(g), self.shard.sum(total)
        return g, total.item() / (2 * self.pairs)


@dataclass
class PESConfig:
    """Meta-training hyper-parameters (paper: 16 runs, truncation 50, meta-lr 1e-4)."""

    pairs: int = 8
    sigma: float = 0.01
    truncation: int = 50
    horizon: int = 200
    meta_lr: float = 1e-4
    meta_steps: int = 500
    checkpoint_every: int = 50
    seed: int = 0
    stagger: bool = True        # start the pairs at random points of their episodes (see PES.stagger)
    objective: str = "train"    # mean training loss over each truncation, or "validation" (held-out batches)
    loss_clip: float | None = None   # clip every step's loss at this value (and NaN to it): diverging runs
    evaluate_every: int = 0     # meta-validate every this many steps and keep the best rule (0: never)
    evaluate_runs: int = 4      # full-horizon inner runs (fixed seed, unperturbed rule) per meta-validation


class MetaTrainer:
    """Adam on the rule's meta-parameters with PES estimates; checkpoints atomically and resumes exactly."""

    def __init__(self, task: Task, rule: UpdateRule, config: PESConfig,
                 checkpoint: str | os.PathLike | None = None) -> None:
        self.rule, self.config = rule, config
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.generator = torch.Generator().manual_seed(config.seed)
        self.pes = PES(task, rule, config.pairs, config.sigma, config.truncation, config.horizon, self.generator,
                       config.objective, config.loss_clip, shard=current_shard(config.pairs))
        self.task = task
        self.meta_opt = torch.optim.Adam(rule.parameters(), lr=config.meta_lr)
        self.step = 0
        self.history: list[float] = []
        self.validation: list[tuple[int, float]] = []           # (meta-step, meta-validation loss)
        self.best: dict | None = None                            # {"step", "loss", "rule"} of the best rule
        if self.checkpoint is not None and self.checkpoint.exists():
            self._load()
        elif config.stagger:
            self.pes.stagger(parameters_to_vector(rule.parameters()).detach(), self.generator)

    def _save(self) -> None:
        pes_state = self.pes.state_dict()           # every process takes part (sharded runs are gathered)
        if not is_main_process():
            return
        state = {"rule": self.rule.state_dict(), "meta_opt": self.meta_opt.state_dict(), "pes": pes_state,
                 "generator": self.generator.get_state(), "step": self.step, "history": self.history,
                 "validation": self.validation, "best": self.best, "config": self._resumable_config()}
        with atomic_replace(self.checkpoint) as tmp:
            torch.save(state, tmp)

    def _resumable_config(self) -> dict:
        """The settings a resumed run must share (``meta_steps`` and checkpointing may change)."""
        return {k: v for k, v in asdict(self.config).items() if k not in ("meta_steps", "checkpoint_every")}

    @torch.no_grad()
    def meta_validate(self) -> float:
        """Mean loss of ``evaluate_runs`` full-horizon inner runs under the current (unperturbed) rule, with a
        fixed seed so that successive evaluations compare rules, not data."""
        gen = torch.Generator().manual_seed(10_000 + self.config.seed)
        n = self.config.evaluate_runs * len(getattr(self.task, "members", (self.task,)))     # per family member
        runs = make_runs(self.task, self.rule, n, self.config.horizon, gen, objective=self.config.objective,
                         loss_clip=self.config.loss_clip)
        theta = parameters_to_vector(self.rule.parameters()).detach()
        meta = stack_meta_parameters(self.rule, theta.expand(n, -1))
        return runs.unroll(meta, self.config.horizon, gen).mean().item()

    def best_rule_state(self) -> dict[str, torch.Tensor]:
        """The meta-parameters to keep: the best meta-validated ones, or the current ones without validation."""
        return self.best["rule"] if self.best is not None else self.rule.state_dict()

    def _load(self) -> None:
        try:
            state = torch.load(self.checkpoint, weights_only=True)
            self.rule.load_state_dict(state["rule"])
        except Exception as err:  # noqa: BLE001 - any unreadable checkpoint gets the same clear message
            raise ValueError(f"checkpoint {os.fspath(self.checkpoint)!r} is unreadable or from another "
                             f"rule ({err}); delete it to start afresh") from err
        if state.get("config") != self._resumable_config():
            raise ValueError(f"checkpoint {os.fspath(self.checkpoint)!r} was written with another PES configuration "
                             f"({state.get('config')} vs {self._resumable_config()}); delete it or use its settings")
        self.meta_opt.load_state_dict(state["meta_opt"])
        self.pes.load_state_dict(state["pes"])
        self.generator.set_state(state["generator"])
        self.step, self.history = state["step"], state["history"]
        self.validation, self.best = state["validation"], state["best"]

    def train(self, steps: int | None = None, progress: bool = True,
              on_step: Callable[[int, float], None] | None = None) -> list[float]:
        """Run meta-steps until ``steps`` (default the config's) are done in total; returns meta-losses."""
        total = self.config.meta_steps if steps is None else steps
        bar = tqdm(total=total, initial=self.step, desc="meta-train (PES)", disable=not progress or not is_main_process())
        while self.step < total:
            theta = parameters_to_vector(self.rule.parameters()).detach()
            g, meta_loss = self.pes.estimate(theta, self.generator)
            self.meta_opt.zero_grad(set_to_none=True)
            offset = 0
            for p in self.rule.parameters():
                p.grad = g[offset:offset + p.numel()].view_as(p).clone()
                offset += p.numel()
            self.meta_opt.step()
            self.step += 1
            self.history.append(meta_loss)
            if self.config.evaluate_every and self.step % self.config.evaluate_every == 0:
                loss = self.meta_validate()
                self.validation.append((self.step, loss))
                if self.best is None or loss < self.best["loss"]:
                    self.best = {"step": self.step, "loss": loss,
                                 "rule": {k: v.detach().clone() for k, v in self.rule.state_dict().items()}}
            bar.update()
            bar.set_postfix(meta_loss=f"{meta_loss:.4f}")
            if on_step is not None:
                on_step(self.step, meta_loss)
            if self.checkpoint is not None and (self.step % self.config.checkpoint_every == 0 or self.step == total):
                self._save()
        bar.close()
        return self.history
