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
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.func import functional_call, grad_and_value, vmap
from torch.nn.utils import parameters_to_vector
from tqdm.auto import tqdm

from ..atomic import atomic_replace
from .distributed import Shard, current_shard, is_main_process
from .optimizers import UpdateRule
from .tasks import Task

__all__ = ["TruncatedInnerRuns", "PES", "MetaTrainer", "PESConfig", "stack_meta_parameters"]


def stack_meta_parameters(rule: UpdateRule, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
    """Meta-parameter dict with a leading particle axis from ``vectors [n, D]``."""
    out, offset = {}, 0
    for name, p in rule.named_parameters():
        out[name] = vectors[:, offset:offset + p.numel()].reshape(len(vectors), *p.shape)
        offset += p.numel()
    return out


def _tree_where(mask: torch.Tensor, new, old):
    """``where(mask[run], new, old)`` through nested dicts of tensors with a leading run axis."""
    if isinstance(old, dict):
        return {k: _tree_where(mask, new[k], v) for k, v in old.items()}
    return torch.where(mask.view(-1, *([1] * (old.dim() - 1))), new, old)


class TruncatedInnerRuns:
    """``n`` inner training runs of ``task`` under ``n`` meta-parameter vectors, advanced in lockstep.

    State: inner parameters, rule state and step counters, each with a leading run axis; a run
    that reaches ``horizon`` steps restarts from a fresh init. With ``antithetic``, runs ``k`` and
    ``k + n/2`` share their initialisations and batches. Rules that read decomposed
    gradients (``rule.needs_decomposed``) get them from ``task.grads_and_features``.
    """

    def __init__(self, task: Task, rule: UpdateRule, n: int, horizon: int, generator: torch.Generator,
                 antithetic: bool = False, objective: str = "train", loss_clip: float | None = None,
                 shard: Shard | None = None) -> None:
        if antithetic and n % 2:
            raise ValueError(f"antithetic runs come in pairs; got n = {n}")
        if shard is not None and not antithetic:
            raise ValueError("only antithetic pairs are sharded across processes")
        if objective not in ("train", "validation"):
            raise ValueError(f"objective must be 'train' or 'validation', got {objective!r}")
        if objective == "validation":
            task.sample_validation_batch(1, torch.Generator())      # fails early, and clearly, without held-out data
        self.objective, self.loss_clip = objective, loss_clip
        self.task, self.rule, self.horizon, self.antithetic, self.shard = task, rule, horizon, antithetic, shard
        self.n_global = n
        self.n = n if shard is None else 2 * shard.local_pairs          # the runs this process advances
        self.decomposed = rule.needs_decomposed
        if self.decomposed and not hasattr(task, "grads_and_features"):
            raise TypeError(f"{type(rule).__name__} reads decomposed gradients, which {type(task).__name__} "
                            "does not provide (no grads_and_features)")
        spec = getattr(task, "spec", None)

        def update_one(meta, params, grads, state, step, features=None):
            return functional_call(self.rule, meta, (params, grads, state, step, features), {"spec": spec})

        if self.decomposed:
            self._grads = vmap(task.grads_and_features)
            self._update = vmap(update_one)
        else:
            self._grads = vmap(grad_and_value(task.loss))
            self._update = vmap(lambda meta, params, grads, state, step: update_one(meta, params, grads, state, step))
        self._losses = vmap(task.loss)
        self.params, self.rule_state = self._fresh(generator)
        self.step = torch.zeros(self.n, dtype=torch.long)

    def _draw(self, sample, generator: torch.Generator):
        """``sample(n, generator)`` for every run; antithetic runs ``k`` and ``k + n/2`` get the same draw
        (common random numbers: the pair's loss difference then measures the perturbation, not the data).
        A sharded process draws for all pairs, as one process would, and keeps its own."""
        if not self.antithetic:
            return sample(self.n, generator)
        half = sample(self.n_global // 2, generator)
        if self.shard is not None:
            sl = self.shard.pair_slice
            half = {k: v[sl] for k, v in half.items()} if isinstance(half, dict) else tuple(t[sl] for t in half)
        if isinstance(half, dict):
            return {k: torch.cat([v, v]) for k, v in half.items()}
        return tuple(torch.cat([t, t]) for t in half)

    def _fresh(self, generator: torch.Generator) -> tuple[dict, dict]:
        params = self._draw(self.task.init_params, generator)
        if self.decomposed:
            _, feats, _ = self._grads(params, self._draw(self.task.sample_batch, generator))
            state = vmap(self.rule.init_state)(params, feats)
        else:
            state = vmap(self.rule.init_state)(params)
        return params, state

    def state_dict(self) -> dict:
        """Every run's state in the one-process layout (sharded processes gather it: a collective)."""
        state = {"params": self.params, "rule_state": self.rule_state, "step": self.step}
        return state if self.shard is None else self.shard.global_runs(state)

    def load_state_dict(self, state: dict) -> None:
        if self.shard is not None:
            state = self.shard.local_runs(state)
        self.params, self.rule_state, self.step = state["params"], state["rule_state"], state["step"]

    def reset_finished(self, generator: torch.Generator) -> torch.Tensor:
        """Restart runs that reached the horizon; returns the boolean mask of restarted runs ``[n]``."""
        done = self.step >= self.horizon
        if done.any() if self.shard is None else self.shard.any(bool(done.any())):    # every process draws alike
            params, state = self._fresh(generator)
            self.params = _tree_where(done, params, self.params)
            self.rule_state = _tree_where(done, state, self.rule_state)
            self.step = torch.where(done, torch.zeros_like(self.step), self.step)
        return done

    @torch.no_grad()
    def unroll(self, meta: dict[str, torch.Tensor], length: int, generator: torch.Generator,
               stop: torch.Tensor | None = None) -> torch.Tensor:
        """Advance every run ``length`` steps (or to its horizon, or to its ``stop [n]``); return each run's
        mean loss over the steps it took, ``[n]``: the loss of each step's training batch before its update
        (objective ``"train"``), or of a fresh validation batch after it (``"validation"``)."""
        limit = torch.full((self.n,), self.horizon) if stop is None else stop.clamp_max(self.horizon)
        total, counted = torch.zeros(self.n), torch.zeros(self.n)
        for _ in range(length):
            active = self.step < limit
            batch = self._draw(self.task.sample_batch, generator)
            with torch.enable_grad():
                if self.decomposed:
                    grads, feats, losses = self._grads(self.params, batch)
                    new_params, new_state = self._update(meta, self.params, grads, self.rule_state, self.step, feats)
                else:
                    grads, losses = self._grads(self.params, batch)
                    new_params, new_state = self._update(meta, self.params, grads, self.rule_state, self.step)
            self.params = _tree_where(active, new_params, self.params)
            self.rule_state = _tree_where(active, new_state, self.rule_state)
            self.step = self.step + active.long()
            if self.objective == "validation":
                losses = self._losses(self.params, self._draw(self.task.sample_validation_batch, generator))
            if self.loss_clip is not None:       # a diverging inner run must not dominate the estimate
                losses = torch.nan_to_num(losses, nan=self.loss_clip).clamp_max(self.loss_clip)
            total += torch.where(active, losses, 0.0)
            counted += active
        return total / counted.clamp_min(1)


class PES:
    """Antithetic PES estimator over ``pairs`` persistent pairs of inner runs."""

    def __init__(self, task: Task, rule: UpdateRule, pairs: int, sigma: float, truncation: int, horizon: int,
                 generator: torch.Generator, objective: str = "train", loss_clip: float | None = None,
                 shard: Shard | None = None) -> None:
        if horizon % truncation:
            raise ValueError(f"horizon ({horizon}) must be a multiple of the truncation length ({truncation})")
        self.rule, self.pairs, self.sigma, self.truncation, self.shard = rule, pairs, sigma, truncation, shard
        self.runs = TruncatedInnerRuns(task, rule, 2 * pairs, horizon, generator, antithetic=True, objective=objective,
                                       loss_clip=loss_clip, shard=shard)
        self.local_pairs = pairs if shard is None else shard.local_pairs
        self.dim = parameters_to_vector(rule.parameters()).numel()
        self.xi = torch.zeros(self.local_pairs, self.dim)

    def _local(self, per_pair: torch.Tensor) -> torch.Tensor:
        """This process's rows of a ``[pairs, ...]`` draw."""
        return per_pair if self.shard is None else per_pair[self.shard.pair_slice]

    def state_dict(self) -> dict:
        xi = self.xi if self.shard is None else self.shard.gather(self.xi)
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
        n = self.config.evaluate_runs
        runs = TruncatedInnerRuns(self.task, self.rule, n, self.config.horizon, gen, objective=self.config.objective,
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
