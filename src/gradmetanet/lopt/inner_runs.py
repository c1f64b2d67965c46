"""Inner training runs advanced in lockstep under many meta-parameter vectors (vectorised with ``vmap``)."""

from __future__ import annotations

import torch
from torch.func import functional_call, grad_and_value, vmap

from .distributed import Shard
from .optimizers import UpdateRule
from .tasks import Task

__all__ = ["TruncatedInnerRuns", "stack_meta_parameters"]


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

    def owned_pairs(self, rank: int, world: int) -> torch.Tensor:
        """The antithetic pairs process ``rank`` of ``world`` advances: a contiguous share (see :class:`Shard`)."""
        share = self.n_global // 2 // world
        return torch.arange(rank * share, (rank + 1) * share)

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
