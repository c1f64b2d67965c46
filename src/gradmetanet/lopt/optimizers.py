"""Learned optimizers as ``torch.optim.Optimizer``s (paper section 7.2, update rule eq. 10).

    v_t       = mu v_{t-1} + grad_t
    theta_t+1 = theta_t - alpha (v_t + beta F_phi(features_t))

``alpha``, ``mu``, ``beta`` and the network ``F_phi`` are the meta-parameters of an
:class:`UpdateRule` (initialised to 0.1, 0.9, 0.001 as in the paper); with no network the rule
is learnable SGD with momentum. ``F_phi`` reads the 19 per-parameter features of
:mod:`gradmetanet.lopt.features`, and for :class:`GradMetaNetRule` also 14 features per
parameter that GradMetaNet computes from the decomposed gradients of the current batch and
their momenta (eq. 11). A rule is a pure function of tensors (``rule(params, grads, state,
step, ...)`` on dicts keyed by parameter name), so meta-training can vectorise through it; the
optimizer classes apply it in place for ordinary training loops.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from ..batch import GradientBatch
from ..capture import CaptureError, GradientCapture
from ..nn.gradmetanet import GradMetaNet
from ..nn.layers import MLP
from ..spec import NetworkSpec
from .features import MOMENTUM_DECAYS, N_FEATURES, parameter_features, update_momenta

__all__ = ["UpdateRule", "GradMetaNetRule", "LearnedOptimizer", "GradMetaNetOptimizer", "learnable_sgdm",
           "deepsets_rule"]

Tensors = dict[str, torch.Tensor]
#: Key of the rule state that is not attached to one parameter (the momenta of decomposed gradients).
DECOMPOSED = "__decomposed__"


class UpdateRule(nn.Module):
    """Meta-parameters of eq. 10: ``alpha > 0`` and ``mu in (0, 1)`` (stored unconstrained), ``beta``, ``F_phi``."""

    needs_decomposed = False

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

    def init_state(self, params: Tensors, features: torch.Tensor | None = None) -> dict:
        """Per parameter: zero momentum ``[*shape]`` and zero feature momenta ``[*shape, 6]``."""
        return {name: {"momentum": torch.zeros_like(p), "momenta": p.new_zeros(*p.shape, len(MOMENTUM_DECAYS))}
                for name, p in params.items()}

    def extra_features(self, params: Tensors, state: dict, step: torch.Tensor, features: torch.Tensor | None,
                       spec: NetworkSpec | None) -> tuple[Tensors | None, dict]:
        """Additional per-parameter features (none here) and the updated non-parameter state."""
        return None, {}

    def forward(self, params: Tensors, grads: Tensors, state: dict, step: torch.Tensor,
                features: torch.Tensor | None = None, spec: NetworkSpec | None = None) -> tuple[Tensors, dict]:
        """One update of every tensor: ``(new_params, new_state)``; ``step`` counts from 0."""
        extra, new_state = self.extra_features(params, state, step, features, spec)
        new_params = {}
        for name, p in params.items():
            g, st = grads[name], state[name]
            momentum = self.mu * st["momentum"] + g
            momenta = update_momenta(st["momenta"], g)
            direction = momentum
            if self.network is not None:
                feats = parameter_features(p, g, momenta, step)
                if extra is not None:
                    feats = torch.cat([feats, extra[name]], dim=-1)
                direction = direction + self.beta * self.network(feats).squeeze(-1)
            new_params[name] = p - self.alpha * direction
            new_state[name] = {"momentum": momentum, "momenta": momenta}
        return new_params, new_state


def deepsets_rule(hidden: int = 32, layers: int = 3, **scalars: float) -> UpdateRule:
    """The "DS" learned optimizer: a per-parameter MLP (3 hidden layers of 32, as the paper) on 19 features."""
    return UpdateRule(MLP([N_FEATURES] + [hidden] * layers + [1], "relu"), **scalars)


class GradMetaNetRule(UpdateRule):
    """"GradMetaNet + DS" (eq. 11): GradMetaNet reads the decomposed gradients of the batch and their
    six momenta (``[b, N, 14]``) and adds ``gmn_features`` features to every parameter's 19.

    The decomposed features are divided by their root mean square per neuron space and channel,
    and the batch size ``b`` must stay fixed during a run (the momenta are per example slot).
    """

    needs_decomposed = True

    def __init__(self, hidden: int = 32, layers: int = 3, gmn_features: int = 14, gmn_hidden: int = 32,
                 **scalars: float) -> None:
        super().__init__(MLP([N_FEATURES + gmn_features] + [hidden] * layers + [1], "relu"), **scalars)
        channels = 2 * (1 + len(MOMENTUM_DECAYS))
        self.gmn = GradMetaNet(in_features=channels, hidden=gmn_hidden, set_layers=2, neuron_layers=1,
                               out_features=gmn_features, head_hidden=gmn_hidden)

    def init_state(self, params: Tensors, features: torch.Tensor | None = None) -> dict:
        if features is None:
            raise ValueError("GradMetaNetRule needs the decomposed gradients ([b, N, 2]) to initialise its state")
        state = super().init_state(params)
        state[DECOMPOSED] = features.new_zeros(*features.shape, len(MOMENTUM_DECAYS))
        return state

    def extra_features(self, params, state, step, features, spec):
        if features is None or spec is None:
            raise ValueError("GradMetaNetRule needs the decomposed gradients of the batch and the network spec")
        momenta = update_momenta(state[DECOMPOSED], features)                  # [b, N, 2, 6]
        x = torch.cat([features.unsqueeze(-1), momenta], dim=-1).flatten(-2)   # [b, N, 14]
        parts = []
        for sl in spec.space_slices().values():
            block = x[:, sl]
            parts.append(block * torch.rsqrt(block.square().mean((0, 1), keepdim=True) + 1e-12))
        out = self.gmn(GradientBatch(spec, torch.cat(parts, dim=1).unsqueeze(0)))
        return {name: out[name][0] for name in params}, {DECOMPOSED: momenta}


class LearnedOptimizer(torch.optim.Optimizer):
    """Applies a rule in place: ``opt.zero_grad(); loss.backward(); opt.step()``.

    The rule's meta-parameters are not trained by ``step()``; :meth:`state_dict` holds them
    (under ``"rule"``) with the per-parameter state, so a run resumes exactly.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], rule: UpdateRule) -> None:
        super().__init__(params, defaults={})
        self.rule = rule

    def _named(self) -> dict[str, torch.Tensor]:
        return {f"{i}.{j}": p for i, group in enumerate(self.param_groups) for j, p in enumerate(group["params"])
                if p.grad is not None}

    def _features(self) -> tuple[torch.Tensor | None, NetworkSpec | None]:
        return None, None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        named = self._named()
        grads = {}
        for name, p in named.items():
            if not torch.isfinite(p.grad).all():
                raise FloatingPointError(f"non-finite gradient for parameter {name!r} (shape {list(p.shape)}); "
                                         "the learned optimizer refuses to apply it")
            grads[name] = p.grad
        features, spec = self._features()
        params = {name: p.detach() for name, p in named.items()}
        state = self._gather_state(params, features)
        step = self.state["__step__"]
        new_params, new_state = self.rule(params, grads, state, step, features, spec)
        for name, p in named.items():
            p.copy_(new_params[name])
            self.state[p].update(new_state[name])
        if DECOMPOSED in new_state:
            self.state[DECOMPOSED] = {"momenta": new_state[DECOMPOSED]}
        self.state["__step__"] = step + 1
        return loss

    def _gather_state(self, params: Tensors, features: torch.Tensor | None) -> dict:
        named = self._named()
        if "__step__" not in self.state:
            self.state["__step__"] = torch.zeros((), dtype=torch.long)
        missing = [name for name, p in named.items() if not self.state[p]]
        if self.rule.needs_decomposed and DECOMPOSED not in self.state:
            missing.append(DECOMPOSED)
        if missing:                      # first step (or a new parameter): fresh zero state
            fresh = self.rule.init_state(params, features)
            for name in missing:
                if name == DECOMPOSED:
                    self.state[DECOMPOSED] = {"momenta": fresh[DECOMPOSED]}
                else:
                    self.state[named[name]].update(fresh[name])
        state = {name: {"momentum": self.state[p]["momentum"], "momenta": self.state[p]["momenta"]}
                 for name, p in named.items()}
        if self.rule.needs_decomposed:
            state[DECOMPOSED] = self.state[DECOMPOSED]["momenta"]
            if state[DECOMPOSED].shape[:-1] != features.shape:
                raise ValueError(f"the decomposed gradients changed shape ({list(features.shape)} vs "
                                 f"{list(state[DECOMPOSED].shape[:-1])}); a GradMetaNet optimizer needs a fixed "
                                 "batch size")
        return state

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


class GradMetaNetOptimizer(LearnedOptimizer):
    """A learned optimizer whose rule reads the decomposed gradients of each batch.

    It captures them itself: hooks are registered at construction (remove them with
    :meth:`close`), every forward + backward with gradients enabled is recorded, and ``step()``
    consumes the capture. Run evaluation passes under ``torch.no_grad()``: they are ignored.
    The model's loss must be a batch mean, and the batch size fixed.
    """

    def __init__(self, model: nn.Module, rule: UpdateRule) -> None:
        self.model = model
        self.names = {id(p): n for n, p in model.named_parameters()}
        super().__init__(model.parameters(), rule)
        self.capture = GradientCapture(model, loss_reduction="mean", ignore_no_grad=True)
        self.capture.__enter__()

    def _named(self) -> dict[str, torch.Tensor]:
        return {self.names[id(p)]: p for group in self.param_groups for p in group["params"] if p.grad is not None}

    def _features(self) -> tuple[torch.Tensor, NetworkSpec]:
        try:
            gs = self.capture.gradients
        except CaptureError as err:
            raise CaptureError(f"step() found no fresh decomposed gradients ({err}); run a forward and backward "
                               "with gradients enabled before every step") from err
        feats = torch.cat(list(gs.neuron_features().values()), dim=1)
        return feats, gs.spec

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        self.capture.remove()
        self.capture.__enter__()            # re-arm for the next batch
        return loss

    def close(self) -> None:
        """Remove the capture hooks (the optimizer cannot step afterwards)."""
        self.capture.remove()


def learnable_sgdm(params, alpha: float = 0.1, mu: float = 0.9) -> LearnedOptimizer:
    """Learnable SGD with momentum: the update rule with no network (``beta = 0``)."""
    return LearnedOptimizer(params, UpdateRule(None, alpha=alpha, mu=mu))
