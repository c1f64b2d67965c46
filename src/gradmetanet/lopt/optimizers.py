"""Learned optimizers as ``torch.optim.Optimizer``s (paper section 7.2, update rule eq. 10).

    v_t       = mu v_{t-1} + grad_t
    theta_t+1 = theta_t - alpha (v_t + beta F_phi(features_t))

``alpha``, ``mu``, ``beta`` and the network ``F_phi`` are the meta-parameters of an
:class:`UpdateRule` (initialised to 0.1, 0.9, 0.001 as in the paper); with no network the rule
is learnable SGD with momentum. ``F_phi`` reads the 19 per-parameter features of
:mod:`gradmetanet.lopt.features`, and in the GradMetaNet rules also 14 features per parameter
that GradMetaNet computes from the decomposed gradients of the current batch and their
momenta (eq. 11). A rule is a pure function of tensors (``rule(params, grads, state,
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
from ..nn.baselines import WeightSpaceLayer
from ..nn.gradmetanet import GradMetaNet
from ..nn.layers import MLP
from ..spec import NetworkSpec
from .features import MOMENTUM_DECAYS, N_FEATURES, parameter_features, update_momenta

__all__ = ["UpdateRule", "LearnedOptimizer", "NetworkOptimizer", "learnable_sgdm", "deepsets_rule", "unf_rule",
           "gradmetanet_ds_rule", "gradmetanet_unf_rule"]

Tensors = dict[str, torch.Tensor]
#: Key of the rule state that is not attached to one parameter (the momenta of decomposed gradients).
DECOMPOSED = "__decomposed__"


class UpdateRule(nn.Module):
    """Meta-parameters of eq. 10 and 11, composed from optional parts.

    - ``alpha > 0``, ``mu in (0, 1)`` (stored unconstrained) and ``beta``;
    - ``per_parameter``: a network on each parameter's features (19, plus the GradMetaNet
      features when there is a ``gradmetanet``), applied entry by entry;
    - ``equivariant``: a hidden-neuron-permutation-equivariant weight-space layer applied to the
      per-parameter outputs of all tensors together (the UNF-style optimizer);
    - ``gradmetanet``: a :class:`~gradmetanet.nn.GradMetaNet` on the decomposed gradients of the
      batch and their six momenta (``[b, N, 14]``), giving features to every parameter.

    With no ``per_parameter`` network the rule is learnable SGD with momentum. Use the factories
    :func:`deepsets_rule`, :func:`unf_rule`, :func:`gradmetanet_ds_rule`, :func:`gradmetanet_unf_rule`.
    """

    def __init__(self, per_parameter: nn.Module | None = None, equivariant: WeightSpaceLayer | None = None,
                 gradmetanet: GradMetaNet | None = None, alpha: float = 0.1, mu: float = 0.9,
                 beta: float = 0.001) -> None:
        super().__init__()
        if alpha <= 0 or not 0 < mu < 1:
            raise ValueError(f"need alpha > 0 and 0 < mu < 1, got alpha={alpha}, mu={mu}")
        if per_parameter is None and (equivariant is not None or gradmetanet is not None):
            raise ValueError("an equivariant layer or a GradMetaNet needs a per-parameter network to feed")
        self.log_alpha = nn.Parameter(torch.tensor(math.log(alpha)))
        self.logit_mu = nn.Parameter(torch.tensor(math.log(mu / (1 - mu))))
        self.beta = nn.Parameter(torch.tensor(float(beta))) if per_parameter is not None else None
        self.per_parameter, self.equivariant, self.gradmetanet = per_parameter, equivariant, gradmetanet

    @property
    def needs_decomposed(self) -> bool:
        return self.gradmetanet is not None

    @property
    def needs_spec(self) -> bool:
        return self.gradmetanet is not None or self.equivariant is not None

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.exp()

    @property
    def mu(self) -> torch.Tensor:
        return torch.sigmoid(self.logit_mu)

    def init_state(self, params: Tensors, features: torch.Tensor | None = None) -> dict:
        """Per parameter: zero momentum ``[*shape]`` and feature momenta ``[*shape, 6]``; with a
        GradMetaNet also zero momenta ``[b, N, 2, 6]`` of the decomposed gradients."""
        state: dict = {name: {"momentum": torch.zeros_like(p), "momenta": p.new_zeros(*p.shape, len(MOMENTUM_DECAYS))}
                       for name, p in params.items()}
        if self.needs_decomposed:
            if features is None:
                raise ValueError("a GradMetaNet rule needs the decomposed gradients ([b, N, 2]) to initialise its state")
            state[DECOMPOSED] = features.new_zeros(*features.shape, len(MOMENTUM_DECAYS))
        return state

    def _gradmetanet_features(self, state: dict, features: torch.Tensor, spec: NetworkSpec
                              ) -> tuple[Tensors, torch.Tensor]:
        """Per-parameter GradMetaNet features and the new decomposed momenta.

        The 14 channels are divided by their root mean square per neuron space, so the rule
        sees the same scale whatever the layer; the batch size must stay fixed in a run.
        """
        momenta = update_momenta(state[DECOMPOSED], features)                  # [b, N, 2, 6]
        x = torch.cat([features.unsqueeze(-1), momenta], dim=-1).flatten(-2)   # [b, N, 14]
        parts = []
        for sl in spec.space_slices().values():
            block = x[:, sl]
            parts.append(block * torch.rsqrt(block.square().mean((0, 1), keepdim=True) + 1e-12))
        out = self.gradmetanet(GradientBatch(spec, torch.cat(parts, dim=1).unsqueeze(0)))
        return {name: value[0] for name, value in out.items()}, momenta

    def forward(self, params: Tensors, grads: Tensors, state: dict, step: torch.Tensor,
                features: torch.Tensor | None = None, spec: NetworkSpec | None = None) -> tuple[Tensors, dict]:
        """One update of every tensor: ``(new_params, new_state)``; ``step`` counts from 0.

        ``features`` (the batch's decomposed gradients ``[b, N, 2]``) and ``spec`` are needed by
        rules with a GradMetaNet or an equivariant layer, whose parameter names must be the spec's.
        """
        if self.needs_spec and spec is None:
            raise ValueError("this rule needs the network spec (use NetworkOptimizer, which knows the model)")
        new_state: dict = {}
        momenta = {name: update_momenta(state[name]["momenta"], grads[name]) for name in params}
        momentum = {name: self.mu * state[name]["momentum"] + grads[name] for name in params}
        directions = momentum
        if self.per_parameter is not None:
            feats = {name: parameter_features(p, grads[name], momenta[name], step) for name, p in params.items()}
            if self.gradmetanet is not None:
                if features is None:
                    raise ValueError("a GradMetaNet rule needs the decomposed gradients of the batch")
                extra, new_state[DECOMPOSED] = self._gradmetanet_features(state, features, spec)
                feats = {name: torch.cat([f, extra[name]], dim=-1) for name, f in feats.items()}
            out = {name: self.per_parameter(f) for name, f in feats.items()}
            if self.equivariant is not None:      # the layer reads a batch of networks: add and drop the axis
                out = {name: v[0] for name, v in self.equivariant({n: o.unsqueeze(0) for n, o in out.items()},
                                                                   spec).items()}
            directions = {name: momentum[name] + self.beta * out[name].squeeze(-1) for name in params}
        new_params = {name: p - self.alpha * directions[name] for name, p in params.items()}
        for name in params:
            new_state[name] = {"momentum": momentum[name], "momenta": momenta[name]}
        return new_params, new_state


def deepsets_rule(hidden: int = 32, layers: int = 3, **scalars: float) -> UpdateRule:
    """"DS": a per-parameter MLP (3 hidden layers of 32, as the paper) on the 19 features."""
    return UpdateRule(MLP([N_FEATURES] + [hidden] * layers + [1], "relu"), **scalars)


def unf_rule(n_layers: int, hidden: int = 32, **scalars: float) -> UpdateRule:
    """"UNF": a per-parameter MLP (2 hidden layers of 32, output 32) then one equivariant weight-space layer.

    ``n_layers`` is the number of linear layers of the networks it will optimise.
    """
    return UpdateRule(MLP([N_FEATURES, hidden, hidden, hidden], "relu"), WeightSpaceLayer(n_layers, hidden, 1),
                      **scalars)


def _gradmetanet_branch(features: int, hidden: int) -> GradMetaNet:
    """The GradMetaNet of the optimizer rules (ReLU: it runs at every training step, and GELU costs more)."""
    return GradMetaNet(in_features=2 * (1 + len(MOMENTUM_DECAYS)), hidden=hidden, set_layers=2, neuron_layers=1,
                       out_features=features, head_hidden=hidden, activation="relu")


def gradmetanet_ds_rule(hidden: int = 32, layers: int = 3, gmn_features: int = 14, gmn_hidden: int = 32,
                        **scalars: float) -> UpdateRule:
    """"GradMetaNet + DS" (eq. 11): GradMetaNet features join the 19 (33 in all) of a per-parameter MLP."""
    return UpdateRule(MLP([N_FEATURES + gmn_features] + [hidden] * layers + [1], "relu"),
                      gradmetanet=_gradmetanet_branch(gmn_features, gmn_hidden), **scalars)


def gradmetanet_unf_rule(n_layers: int, hidden: int = 32, gmn_features: int = 14, gmn_hidden: int = 32,
                         **scalars: float) -> UpdateRule:
    """"GradMetaNet + UNF": GradMetaNet features into the UNF rule's per-parameter MLP."""
    return UpdateRule(MLP([N_FEATURES + gmn_features, hidden, hidden, hidden], "relu"),
                      WeightSpaceLayer(n_layers, hidden, 1), _gradmetanet_branch(gmn_features, gmn_hidden), **scalars)


class LearnedOptimizer(torch.optim.Optimizer):
    """Applies a rule in place: ``opt.zero_grad(); loss.backward(); opt.step()``.

    The rule's meta-parameters are not trained by ``step()``; :meth:`state_dict` holds them
    (under ``"rule"``) with the per-parameter state, so a run resumes exactly.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], rule: UpdateRule) -> None:
        if rule.needs_spec and not isinstance(self, NetworkOptimizer):
            raise TypeError("this rule reads the network's structure: use NetworkOptimizer(model, rule)")
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


class NetworkOptimizer(LearnedOptimizer):
    """A learned optimizer bound to a model: it knows the parameter names and the network spec.

    Rules with a GradMetaNet read the decomposed gradients of each batch, which the optimizer
    captures itself: hooks are registered at construction (remove them with :meth:`close`),
    every forward + backward with gradients enabled is recorded, and ``step()`` consumes the
    capture. Run evaluation passes under ``torch.no_grad()``: they are ignored. The model's loss
    must be a batch mean, the batch size fixed, and each step one forward and one backward
    (gradient accumulation over several forwards is not supported by the GradMetaNet rules).
    """

    def __init__(self, model: nn.Module, rule: UpdateRule) -> None:
        self.model = model
        self.names = {id(p): n for n, p in model.named_parameters()}
        super().__init__(model.parameters(), rule)
        self.spec = NetworkSpec.from_module(model) if rule.needs_spec else None
        self.capture = None
        if rule.needs_decomposed:
            self.capture = GradientCapture(model, loss_reduction="mean", ignore_no_grad=True)
            self.capture.__enter__()

    def _named(self) -> dict[str, torch.Tensor]:
        return {self.names[id(p)]: p for group in self.param_groups for p in group["params"] if p.grad is not None}

    def _features(self) -> tuple[torch.Tensor | None, NetworkSpec | None]:
        if self.capture is None:
            return None, self.spec
        try:
            gs = self.capture.gradients
        except CaptureError as err:
            raise CaptureError(f"step() found no fresh decomposed gradients ({err}); run a forward and backward "
                               "with gradients enabled before every step") from err
        return torch.cat(list(gs.neuron_features().values()), dim=1), self.spec

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        if self.capture is not None:
            self.capture.remove()
            self.capture.__enter__()            # re-arm for the next batch
        return loss

    def close(self) -> None:
        """Remove the capture hooks (a GradMetaNet rule cannot step afterwards)."""
        if self.capture is not None:
            self.capture.remove()


def learnable_sgdm(params, alpha: float = 0.1, mu: float = 0.9) -> LearnedOptimizer:
    """Learnable SGD with momentum: the update rule with no network (``beta = 0``)."""
    return LearnedOptimizer(params, UpdateRule(alpha=alpha, mu=mu))
