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
import warnings
import weakref
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn

from ..features.neurons import GradientBatch
from ..capture import CaptureError, GradientCapture
from ..metanets.gradmetanet import GradMetaNet
from ..metanets.layers import MLP
from ..core.spec import NetworkSpec
from ..metanets import LINEAR_SIGNATURES, TRANSFORMER_SIGNATURES, Signature, WeightSpaceLayer
from .distributed import gather_examples
from .features import MOMENTUM_DECAYS, N_FEATURES, parameter_features, update_momenta
from .layout import FlatLayout, Segments
from ..capture import spec_of

__all__ = ["UpdateRule", "LearnedOptimizer", "NetworkOptimizer", "learnable_sgdm", "deepsets_rule", "unf_rule",
           "gradmetanet_ds_rule", "gradmetanet_unf_rule", "make_rule", "RULE_NAMES", "warm_start"]

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
    - ``gradmetanet``: a :class:`~gradmetanet.metanets.GradMetaNet` on the decomposed gradients of the
      batch and their six momenta (``[b, N, 14]``), giving features to every parameter; with
      ``set_size`` it reads only the first ``set_size`` examples of each batch (a random subset
      when batches are shuffled), which divides its cost by ``b / set_size``.

    With no ``per_parameter`` network the rule is learnable SGD with momentum. Use the factories
    :func:`deepsets_rule`, :func:`unf_rule`, :func:`gradmetanet_ds_rule`, :func:`gradmetanet_unf_rule`.
    """

    def __init__(self, per_parameter: nn.Module | None = None, equivariant: WeightSpaceLayer | None = None,
                 gradmetanet: GradMetaNet | None = None, alpha: float = 0.1, mu: float = 0.9,
                 beta: float = 0.001, set_size: int | None = None) -> None:
        super().__init__()
        if alpha <= 0 or not 0 < mu < 1:
            raise ValueError(f"need alpha > 0 and 0 < mu < 1, got alpha={alpha}, mu={mu}")
        if per_parameter is None and (equivariant is not None or gradmetanet is not None):
            raise ValueError("an equivariant layer or a GradMetaNet needs a per-parameter network to feed")
        self.log_alpha = nn.Parameter(torch.tensor(math.log(alpha)))
        self.logit_mu = nn.Parameter(torch.tensor(math.log(mu / (1 - mu))))
        self.beta = nn.Parameter(torch.tensor(float(beta))) if per_parameter is not None else None
        self.per_parameter, self.equivariant, self.gradmetanet = per_parameter, equivariant, gradmetanet
        self.set_size = set_size

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
        """Flat state (all tensors concatenated, ``P`` entries): zero momentum ``[P]`` and feature
        momenta ``[P, 6]``; with a GradMetaNet also zero momenta ``[s, N, 2, 6]`` of the decomposed
        gradients, ``s = set_size`` (or the first batch's size when the rule reads whole batches)."""
        p = FlatLayout.of(params).flatten(params)
        state: dict = {"momentum": torch.zeros_like(p), "momenta": p.new_zeros(*p.shape, len(MOMENTUM_DECAYS))}
        if self.needs_decomposed:
            if features is None:
                raise ValueError("a GradMetaNet rule needs the decomposed gradients ([b, N, 2]) to initialise "
                                 "its state")
            rows = self.set_size or features.shape[0]
            state[DECOMPOSED] = features.new_zeros(rows, *features.shape[1:], len(MOMENTUM_DECAYS))
        return state

    def gradient_set(self, features: torch.Tensor) -> torch.Tensor:
        """The examples of the batch's decomposed gradients ``[b, N, 2]`` that the GradMetaNet reads."""
        return features if self.set_size is None else features[: self.set_size]

    def _gradmetanet_features(self, state: dict, features: torch.Tensor, spec: NetworkSpec
                              ) -> tuple[Tensors, torch.Tensor]:
        """Per-parameter GradMetaNet features and the new decomposed momenta.

        The 14 channels are divided by their root mean square per neuron space, so the rule
        sees the same scale whatever the layer. Example ``i`` of a batch updates momentum slot
        ``i``: a batch smaller than the state (a last batch) updates the first slots and leaves the
        rest, a larger one contributes its first ``set_size`` examples.
        """
        rows = state[DECOMPOSED].shape[0]
        features = self.gradient_set(features)[:rows]
        momenta = update_momenta(state[DECOMPOSED][: features.shape[0]], features)      # [b, N, 2, 6]
        kept = momenta if momenta.shape[0] == rows else torch.cat([momenta, state[DECOMPOSED][momenta.shape[0]:]])
        x = torch.cat([features.unsqueeze(-1), momenta], dim=-1).flatten(-2)   # [b, N, 14]
        spaces = Segments.of(tuple(s.size for s in spec.spaces), x.device)
        x = x * spaces.scatter(torch.rsqrt(spaces.mean(x.square().mean(0)) + 1e-12))     # per-space RMS
        out = self.gradmetanet(GradientBatch(spec, x.unsqueeze(0)))
        return {name: value[0] for name, value in out.items()}, kept

    def update(self, layout: FlatLayout, params: torch.Tensor, grads: torch.Tensor, state: dict, step: torch.Tensor,
               features: torch.Tensor | None = None, spec: NetworkSpec | None = None,
               lr: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, dict]:
        """One update of the flat parameters ``params [P]`` (``layout`` names the tensors): ``(new [P], new_state)``.

        ``features`` (the batch's decomposed gradients ``[b, N, 2]``) and ``spec`` are needed by
        rules with a GradMetaNet or an equivariant layer; parameters the spec does not know (an
        unused head) get zero structural features. ``lr`` (a number or ``[P]``) multiplies the
        learned step: the ``lr`` of ``torch.optim`` param groups, which schedulers drive.
        """
        if self.needs_spec and spec is None:
            raise ValueError("this rule needs the network spec (use NetworkOptimizer, which knows the model)")
        momenta = update_momenta(state["momenta"], grads)
        momentum = self.mu * state["momentum"] + grads
        new_state: dict = {"momentum": momentum, "momenta": momenta}
        direction = momentum
        if self.per_parameter is not None:
            feats = parameter_features(params, grads, momenta, step, layout.segments(params.device))
            if self.gradmetanet is not None:
                if features is None:
                    raise ValueError("a GradMetaNet rule needs the decomposed gradients of the batch")
                extra, new_state[DECOMPOSED] = self._gradmetanet_features(state, features, spec)
                width = next(iter(extra.values())).shape[-1]
                extra = {n: extra[n] if n in extra else feats.new_zeros(*shape, width)
                         for n, shape in zip(layout.names, layout.shapes)}
                feats = torch.cat([feats, layout.flatten(extra)], dim=-1)
            out = self.per_parameter(feats)                                     # [P, out]
            if self.equivariant is not None:      # the layer reads a batch of networks: add and drop the axis
                tensors = {name: v.unsqueeze(0) for name, v in layout.unflatten(out).items()}
                moved = self.equivariant({n: t for n, t in tensors.items() if n in spec.param_shapes()}, spec)
                out = layout.flatten({n: moved[n][0] if n in moved else t[0] for n, t in tensors.items()})
            direction = momentum + self.beta * out.squeeze(-1)
        return params - lr * self.alpha * direction, new_state

    def forward(self, params: Tensors, grads: Tensors, state: dict, step: torch.Tensor,
                features: torch.Tensor | None = None, spec: NetworkSpec | None = None) -> tuple[Tensors, dict]:
        """:meth:`update` on dicts of tensors: ``(new_params, new_state)``; ``step`` counts from 0."""
        layout = FlatLayout.of(params)
        new, new_state = self.update(layout, layout.flatten(params), layout.flatten(grads), state, step, features,
                                     spec)
        return layout.unflatten(new), new_state


#: The weight-space layer's parameter kinds, by the name a rule file records.
SIGNATURE_SETS: dict[str, tuple[Signature, ...]] = {"linear": LINEAR_SIGNATURES, "transformer": TRANSFORMER_SIGNATURES}


def _with_recipe(rule: UpdateRule, name: str, **arguments: Any) -> UpdateRule:
    """Record how ``rule`` was built (``rule.recipe``: the factory's name and arguments), so a rule file can rebuild
    it with any sizes (:func:`make_rule` takes the same arguments)."""
    signatures = arguments.pop("signatures", None)
    if signatures is not None:
        known = [k for k, v in SIGNATURE_SETS.items() if tuple(v) == tuple(signatures)]
        arguments["signatures"] = known[0] if known else None
    rule.recipe = {"optimizer": name, **arguments}
    return rule


def deepsets_rule(hidden: int = 32, layers: int = 3, **scalars: float) -> UpdateRule:
    """"DS": a per-parameter MLP (3 hidden layers of 32, as the paper) on the 19 features."""
    rule = UpdateRule(MLP([N_FEATURES] + [hidden] * layers + [1], "relu"), **scalars)
    return _with_recipe(rule, "ds", hidden=hidden, layers=layers, **scalars)


def unf_rule(hidden: int = 32, signatures: tuple[Signature, ...] = LINEAR_SIGNATURES, **scalars: float
             ) -> UpdateRule:
    """"UNF": a per-parameter MLP (2 hidden layers of 32, output 32) then one equivariant weight-space layer
    (whose weights are shared by parameter kind, so the rule runs on MLPs of any depth; ``signatures``
    names the kinds, :data:`~gradmetanet.metanets.TRANSFORMER_SIGNATURES` for transformers)."""
    rule = UpdateRule(MLP([N_FEATURES, hidden, hidden, hidden], "relu"),
                      WeightSpaceLayer(hidden, 1, signatures=signatures), **scalars)
    return _with_recipe(rule, "unf", hidden=hidden, signatures=signatures, **scalars)


def _gradmetanet_branch(features: int, hidden: int) -> GradMetaNet:
    """The GradMetaNet of the optimizer rules (the paper gives no size).

    Small and cheap because it runs at every training step on all ``b x N`` (example, neuron)
    pairs: one set layer, one neuron layer, width ``hidden``, 8-dimensional neuron codes, ReLU.
    """
    return GradMetaNet(in_features=2 * (1 + len(MOMENTUM_DECAYS)), hidden=hidden, set_layers=1, neuron_layers=1,
                       out_features=features, head_hidden=hidden, pe_dim=8, activation="relu")


def gradmetanet_ds_rule(hidden: int = 32, layers: int = 3, gradmetanet_features: int = 14, gradmetanet_hidden: int = 16,
                        set_size: int | None = 32, **scalars: float) -> UpdateRule:
    """"GradMetaNet + DS" (eq. 11): GradMetaNet features join the 19 (33 in all) of a per-parameter MLP.

    The GradMetaNet reads ``set_size`` examples of each batch (all with ``None``): 32 of the
    paper's 128 keep a CPU step within a small multiple of Adam's.
    """
    rule = UpdateRule(MLP([N_FEATURES + gradmetanet_features] + [hidden] * layers + [1], "relu"),
                      gradmetanet=_gradmetanet_branch(gradmetanet_features, gradmetanet_hidden), set_size=set_size, **scalars)
    return _with_recipe(rule, "gradmetanet_ds", hidden=hidden, layers=layers, gradmetanet_features=gradmetanet_features,
                        gradmetanet_hidden=gradmetanet_hidden, set_size=set_size, **scalars)


def gradmetanet_unf_rule(hidden: int = 32, gradmetanet_features: int = 14, gradmetanet_hidden: int = 16,
                         set_size: int | None = 32, signatures: tuple[Signature, ...] = LINEAR_SIGNATURES,
                         **scalars: float) -> UpdateRule:
    """"GradMetaNet + UNF": GradMetaNet features into the UNF rule's per-parameter MLP."""
    rule = UpdateRule(MLP([N_FEATURES + gradmetanet_features, hidden, hidden, hidden], "relu"),
                      WeightSpaceLayer(hidden, 1, signatures=signatures), _gradmetanet_branch(gradmetanet_features, gradmetanet_hidden),
                      set_size=set_size, **scalars)
    return _with_recipe(rule, "gradmetanet_unf", hidden=hidden, gradmetanet_features=gradmetanet_features, gradmetanet_hidden=gradmetanet_hidden,
                        set_size=set_size, signatures=signatures, **scalars)


@torch.no_grad()
def warm_start(target: UpdateRule, source: UpdateRule) -> None:
    """Make ``target`` compute what ``source`` computes, e.g. GradMetaNet + DS from a meta-trained DS.

    Every meta-parameter of ``source`` is copied into ``target``; a weight that reads more input
    features in ``target`` (the GradMetaNet features after the 19) gets zeros on the extra ones,
    so they start unused and meta-training learns to use them. Parts only ``target`` has (the
    GradMetaNet) keep their initialisation.
    """
    mine = target.state_dict()
    for key, value in source.state_dict().items():
        if key not in mine:
            raise ValueError(f"cannot warm-start: the target rule has no {key!r}")
        slot = mine[key]
        if slot.shape == value.shape:
            slot.copy_(value)
        elif slot.dim() == 2 and slot.shape[0] == value.shape[0] and slot.shape[1] > value.shape[1]:
            slot.zero_()
            slot[:, : value.shape[1]].copy_(value)
        else:
            raise ValueError(f"cannot warm-start {key!r}: shapes {list(value.shape)} -> {list(slot.shape)}")


#: The rules by name, as the experiment and the shipped optimizers call them.
RULE_NAMES = ("sgdm", "ds", "unf", "gradmetanet_ds", "gradmetanet_unf")


def make_rule(name: str, signatures: tuple[Signature, ...] | str = LINEAR_SIGNATURES, **arguments: Any) -> UpdateRule:
    """A fresh rule by name (``RULE_NAMES``) with its factory's ``arguments`` (sizes, ``set_size``, initial
    ``alpha``/``mu``/``beta``); every rule runs on MLPs of any depth and width (on transformers with
    ``signatures=TRANSFORMER_SIGNATURES`` or ``"transformer"``). The rule's ``recipe`` records all of it."""
    if isinstance(signatures, str):
        if signatures not in SIGNATURE_SETS:
            raise ValueError(f"unknown signatures {signatures!r}; choose from {list(SIGNATURE_SETS)}")
        signatures = SIGNATURE_SETS[signatures]
    factories = {"sgdm": _sgdm_rule, "ds": deepsets_rule, "unf": unf_rule, "gradmetanet_ds": gradmetanet_ds_rule,
                 "gradmetanet_unf": gradmetanet_unf_rule}
    if name not in factories:
        raise ValueError(f"unknown optimizer {name!r}; choose from {list(RULE_NAMES)}")
    if name in ("unf", "gradmetanet_unf"):
        arguments["signatures"] = signatures
    try:
        return factories[name](**arguments)
    except TypeError as err:
        raise ValueError(f"optimizer {name!r} does not take {sorted(arguments)} ({err})") from err


def _sgdm_rule(**scalars: float) -> UpdateRule:
    """Learnable SGD with momentum (no network)."""
    return _with_recipe(UpdateRule(**scalars), "sgdm", **scalars)


class LearnedOptimizer(torch.optim.Optimizer):
    """Applies a rule in place: ``opt.zero_grad(); loss.backward(); opt.step()``, with the ``torch.optim`` contract.

    Like PyTorch's fused optimizers, the state lives in flat buffers over all parameters
    (``state["__rule__"]``: momentum ``[P]``, feature momenta ``[P, 6]``), so one step runs the
    rule's network once on all ``P`` parameters. Each param group carries ``lr`` (default 1), a
    multiplier of the learned step that schedulers drive. Parameters without a gradient are
    skipped (their values and state stay as they are); the rule follows the parameters' device
    and dtype; :meth:`state_dict` holds the rule's meta-parameters (under ``"rule"``) with the
    state, and :meth:`load_state_dict` casts the state to the parameters. The meta-parameters
    are not trained by ``step()``.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], rule: UpdateRule,
                 lr: float = 1.0) -> None:
        if rule.needs_spec and not isinstance(self, NetworkOptimizer):
            raise TypeError("this rule reads the network's structure: use NetworkOptimizer(model, rule)")
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        self.rule = rule
        super().__init__(params, defaults={"lr": lr})
        self._refresh_layout()

    def _refresh_layout(self) -> None:
        self._tensors = [p for group in self.param_groups for p in group["params"]]
        self.layout = FlatLayout(tuple(self._names()), tuple(tuple(p.shape) for p in self._tensors))

    def _names(self) -> list[str]:
        return [f"{i}.{j}" for i, group in enumerate(self.param_groups) for j, _ in enumerate(group["params"])]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add parameters; their flat state starts at zero (a fresh momentum), as a new group of SGD's does."""
        if not hasattr(self, "layout"):                 # during construction
            return super().add_param_group(param_group)
        if isinstance(self, NetworkOptimizer):
            raise ValueError("a NetworkOptimizer optimises the parameters of its model, whose structure its rule "
                             "reads; build a new NetworkOptimizer for another model (or a LearnedOptimizer with a "
                             "DS / SGDM rule for loose parameters)")
        super().add_param_group(param_group)
        added = sum(p.numel() for p in self.param_groups[-1]["params"])
        state = self.state.get("__rule__")
        if state is not None:
            state["momentum"] = torch.cat([state["momentum"], state["momentum"].new_zeros(added)])
            state["momenta"] = torch.cat([state["momenta"], state["momenta"].new_zeros(added, state["momenta"].shape[1])])
        self._refresh_layout()

    def _features(self) -> tuple[torch.Tensor | None, NetworkSpec | None]:
        return None, None

    def _flat_grads(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[P]`` gradients (zeros where a parameter has none) and a ``[P]`` mask of the entries to update
        (``None``: all of them)."""
        present = [p.grad is not None for p in self._tensors]
        grads = torch.cat([p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel())
                           for p in self._tensors])
        if not torch.isfinite(grads).all():
            bad = [name for name, p in zip(self.layout.names, self._tensors)
                   if p.grad is not None and not torch.isfinite(p.grad).all()]
            raise FloatingPointError(f"non-finite gradient for parameters {bad}; the learned optimizer refuses "
                                     "to apply it")
        if all(present):
            return grads, None
        mask = torch.cat([torch.full((p.numel(),), has, device=grads.device) for p, has in zip(self._tensors, present)])
        return grads, mask

    def _learning_rates(self, like: torch.Tensor) -> float | torch.Tensor:
        rates = [group["lr"] for group in self.param_groups]
        if len(set(rates)) == 1:
            return float(rates[0])
        return torch.cat([like.new_full((sum(p.numel() for p in g["params"]),), g["lr"]) for g in self.param_groups])

    def _follow_parameters(self) -> None:
        """Move the rule to the parameters' device and dtype (a float64 model gets a float64 rule)."""
        ref = self._tensors[0]
        some = next(self.rule.parameters())
        if some.dtype != ref.dtype or some.device != ref.device:
            self.rule.to(device=ref.device, dtype=ref.dtype)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if all(p.grad is None for p in self._tensors):
            return loss
        self._follow_parameters()
        grads, mask = self._flat_grads()
        features, spec = self._features()
        params = torch.cat([p.reshape(-1) for p in self._tensors])
        if "__rule__" not in self.state:              # first step: fresh zero state
            self.state["__step__"] = torch.zeros((), dtype=torch.long)
            self.state["__rule__"] = self.rule.init_state(self.layout.unflatten(params), features)
        state, step = self.state["__rule__"], self.state["__step__"]
        new, new_state = self.rule.update(self.layout, params, grads, state, step, features, spec,
                                          lr=self._learning_rates(params))
        if mask is not None:                          # parameters without a gradient keep value and state
            new = torch.where(mask, new, params)
            for key in ("momentum", "momenta"):
                keep = mask.view(-1, *([1] * (state[key].dim() - 1)))
                new_state[key] = torch.where(keep, new_state[key], state[key])
        self.state["__rule__"] = new_state
        torch._foreach_copy_(self._tensors, list(self.layout.unflatten(new).values()))
        self.state["__step__"] = step + 1
        self._after_step()
        return loss

    def _after_step(self) -> None:
        """What a subclass does once a step is applied (inside the one ``step()`` that fires the hooks)."""

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
        ref = self._tensors[0]
        flat = self.state.get("__rule__")
        if flat is not None:                          # the flat state is not keyed by parameter: cast it here
            self.state["__rule__"] = {k: v.to(device=ref.device, dtype=ref.dtype) if v.is_floating_point() else
                                      v.to(ref.device) for k, v in flat.items()}
        self._follow_parameters()


#: model -> the NetworkOptimizer whose capture is attached to it (one at a time)
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, NetworkOptimizer]" = weakref.WeakKeyDictionary()


class NetworkOptimizer(LearnedOptimizer):
    """A learned optimizer bound to a model: it knows the parameter names and the network spec.

    Rules with a GradMetaNet read the decomposed gradients of each batch, which the optimizer
    captures itself: hooks are registered at construction (remove them with :meth:`close`);
    ``zero_grad()`` and ``step()`` re-arm the capture, so each step reads the last forward and
    backward before it. Evaluation passes, with or without gradients, are ignored unless
    backpropagated. Any batch size works (the rule reads up to ``set_size`` examples). Frozen layers
    (``requires_grad=False``: fine-tuning a head on a frozen body) are not captured: the rule reads
    the layers that train, and the spaces a frozen layer touches count as fixed. The loss
    must be a batch mean, and gradient accumulation over several backwards is refused (the
    rule's features come from one batch). Only one NetworkOptimizer captures a model at a
    time: a new one (a notebook cell run again) detaches the previous one, with a warning.

    Under ``DistributedDataParallel`` (pass the DDP-wrapped model) ``.grad`` is all-reduced by DDP
    and the decomposed gradients are gathered from every rank, so the rule reads the global batch:
    every rank applies the same update, the one a single process computes on the concatenated
    batch.
    """

    def __init__(self, model: nn.Module, rule: UpdateRule, lr: float = 1.0) -> None:
        self.model = model
        self.names = {id(p): n for n, p in model.named_parameters()}
        super().__init__(model.parameters(), rule, lr=lr)
        self.capture = None
        self._process_group = None
        if not rule.needs_decomposed:
            self.spec = spec_of(model) if rule.needs_spec else None
            return
        spec = GradientCapture(model, loss_reduction="mean", ignore_no_grad=True).spec
        frozen = [s for s in spec.sites if not all(
            model.get_parameter(n).requires_grad for n in (s.weight, s.bias) if n is not None)]
        if frozen:                              # read the gradients that exist; frozen layers' spaces stay put
            trainable = [s.name for s in spec.sites if s not in frozen]
            if not trainable:
                raise ValueError("every captured layer is frozen: there is nothing for a GradMetaNet rule to read")
            spec = spec.restrict(trainable, fixed={x for s in frozen for x in (s.in_space, s.out_space)})
        capture = GradientCapture(model, loss_reduction="mean", spec=spec if frozen else None, ignore_no_grad=True,
                                  after_backward_hint=_ACCUMULATION_HINT)
        self.spec = capture.spec                # traced once, by the capture (which also refuses coupled batches)
        previous = _ATTACHED.get(model)
        if previous is not None and previous.capture is not None and previous.capture.active:
            warnings.warn("this model already had a learned optimizer capturing its gradients; that one is "
                          "detached now and can no longer step", stacklevel=2)
            previous.close()
        self.capture = capture.__enter__()
        _ATTACHED[model] = self
        ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        self._process_group = model.process_group if ddp and dist.get_world_size(model.process_group) > 1 else None

    def _names(self) -> list[str]:
        return [self.names[id(p)] for group in self.param_groups for p in group["params"]]

    def _features(self) -> tuple[torch.Tensor | None, NetworkSpec | None]:
        if self.capture is None:
            return None, self.spec
        try:
            gs = self.capture.gradients
        except CaptureError as err:
            raise CaptureError(f"step() found no fresh decomposed gradients ({err}); run a forward and backward "
                               "with gradients enabled before every step") from err
        features = gs.neuron_tensor()
        if self._process_group is not None:          # DDP: the rule reads the global batch, as .grad does
            features = gather_examples(features, self._process_group)
        return features, self.spec

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        if self.capture is not None:
            self.capture.reset()                # a new step begins: forget an unused forward and backward

    def _after_step(self) -> None:
        if self.capture is not None:
            self.capture.reset()                # ready for the next batch

    def close(self) -> None:
        """Remove the capture hooks (a GradMetaNet rule cannot step afterwards)."""
        if self.capture is not None:
            self.capture.remove()


_ACCUMULATION_HINT = ("a learned optimizer with a GradMetaNet reads the decomposed gradients of one batch per "
                      "step, so gradient accumulation over several backwards is not supported: call "
                      "opt.zero_grad() (or opt.step()) before each forward, or use a rule without a GradMetaNet")


def learnable_sgdm(params, alpha: float = 0.1, mu: float = 0.9) -> LearnedOptimizer:
    """Learnable SGD with momentum: the update rule with no network (``beta = 0``)."""
    return LearnedOptimizer(params, UpdateRule(alpha=alpha, mu=mu))
