"""Learned optimizers as ``torch.optim.Optimizer``s (paper section 7.2, update rule eq. 10).

    v_t      = mu v_{t-1} + grad_t
    theta_t+1 = theta_t - alpha (v_t + beta F_phi(features_t))

``alpha``, ``mu``, ``beta`` and the network ``F_phi`` are the meta-parameters of an
:class:`UpdateRule` (initialised to 0.1, 0.9, 0.001 as in the paper); with no network the rule
is learnable SGD with momentum. ``F_phi`` reads the 19 per-parameter features of
:mod:`gradmetanet.lopt.features`. The rule is a pure function of tensors
(:meth:`UpdateRule.forward`), so meta-training can differentiate or vectorise through it; the
optimizer class applies it in place for ordinary training loops.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from ..nn.layers import MLP
from .features import MOMENTUM_DECAYS, N_FEATURES, parameter_features, update_momenta

__all__ = ["UpdateRule", "LearnedOptimizer", "learnable_sgdm", "deepsets_rule"]


class UpdateRule(nn.Module):
    """Meta-parameters of eq. 10: ``alpha > 0`` and ``mu in (0, 1)`` (stored unconstrained), ``beta``, ``F_phi``."""

    def __init__(self, network: nn.Module | None = None, alpha: float = 0.1, mu: float = 0.9,
                 beta: float = 0.001) -> None:
        super().__init__()
        if alpha <= 0 or not 0 < mu < 1:
            raise ValueError(f"need alpha > 0 and 0 < mu < 1, got alpha={alpha}, mu={mu}")
        self.log_alpha = nn.Parameter(torch.tensor(math.log(alpha)))
        self.logit_mu = nn.Parameter(torch.tensor(math.log(mu / (1 - mu))))
        self.beta = nn.Parameter(torch.tensor(float(beta))) if network is not None else None
        self.network = network

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.exp()

    @property
    def mu(self) -> torch.Tensor:
        return torch.sigmoid(self.logit_mu)

    def init_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        """Zero momentum ``[*shape]`` and zero feature momenta ``[*shape, 6]``."""
        return {"momentum": torch.zeros_like(param),
                "momenta": param.new_zeros(*param.shape, len(MOMENTUM_DECAYS))}

    def forward(self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor],
                step: int | torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One update of one tensor: ``(new_param, new_state)``; ``step`` counts from 0."""
        momentum = self.mu * state["momentum"] + grad
        momenta = update_momenta(state["momenta"], grad)
        direction = momentum
        if self.network is not None:
            feats = parameter_features(param, grad, momenta, step)
            direction = direction + self.beta * self.network(feats).squeeze(-1)
        return param - self.alpha * direction, {"momentum": momentum, "momenta": momenta}


def deepsets_rule(hidden: int = 32, layers: int = 3, **scalars: float) -> UpdateRule:
    """The "DS" learned optimizer: a per-parameter MLP (3 hidden layers of 32, as the paper) on 19 features."""
    return UpdateRule(MLP([N_FEATURES] + [hidden] * layers + [1], "relu"), **scalars)


class LearnedOptimizer(torch.optim.Optimizer):
    """Applies an :class:`UpdateRule` in place: ``opt.zero_grad(); loss.backward(); opt.step()``.

    The rule's meta-parameters are not trained by ``step()``; :meth:`state_dict` holds them
    (under ``"rule"``) with the per-parameter state, so a run resumes exactly.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], rule: UpdateRule) -> None:
        super().__init__(params, defaults={})
        self.rule = rule

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not torch.isfinite(p.grad).all():
                    raise FloatingPointError(f"non-finite gradient for a parameter of shape {list(p.shape)}; "
                                             "the learned optimizer refuses to apply it")
                state = self.state[p]
                if not state:
                    state.update(self.rule.init_state(p))
                    state["step"] = torch.zeros((), dtype=torch.long)
                new_p, new_state = self.rule(p, p.grad, state, state["step"])
                p.copy_(new_p)
                state.update(new_state)
                state["step"] += 1
        return loss

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["rule"] = self.rule.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        rule = state_dict.pop("rule", None)
        if rule is None:
            raise KeyError("this state_dict has no 'rule' entry; it was not written by a LearnedOptimizer")
        self.rule.load_state_dict(rule)
        super().load_state_dict(state_dict)


def learnable_sgdm(params, alpha: float = 0.1, mu: float = 0.9) -> LearnedOptimizer:
    """Learnable SGD with momentum: the update rule with no network (``beta = 0``)."""
    return LearnedOptimizer(params, UpdateRule(None, alpha=alpha, mu=mu))
