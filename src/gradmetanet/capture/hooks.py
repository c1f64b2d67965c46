"""GradientCapture: record decomposed per-example gradients during an ordinary backward.

A forward hook on every captured module (an ``nn.Linear``, or a type with a registered
:class:`~gradmetanet.capture.registry.Extractor`) keeps a reference to the activation ``a``
the site reads and registers a tensor hook on its output; during ``backward()`` that hook
receives ``dL/dy``, the output gradient ``g``. Nothing of size ``b x P`` is ever formed; the
rescale of ``g`` and the finiteness check run when the gradients are read, not in the step.

A tensor hook (rather than ``register_full_backward_hook``) is used because it tolerates
in-place activations after the layer (``nn.ReLU(inplace=True)``): the hook sees the gradient
with respect to the value the layer produced, which is what the weight gradient needs.

The batch axis of a site is 0, or 1 when the nearest enclosing module that has (or whose direct
child has) a ``batch_first`` attribute has it ``False`` (PyTorch's transformer layers keep it in
``self_attn``); ``batch_dim=`` overrides it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from ..core.dataflow import Trace, trace
from ..core.spec import NetworkSpec, UnsupportedModuleError
from ..errors import CaptureError
from ..gradients import GradientSet, LossReduction
from .registry import Extractor, extractor_for

__all__ = ["GradientCapture", "CaptureError"]


@dataclass
class _Call:
    """One forward call of a captured site: its activation, the input's version, and later its gradient."""

    a: torch.Tensor            # [b, T, d_in], detached (shares storage with the layer input where it can)
    version: int               # autograd version counter of the input when recorded
    out: torch.Tensor | None   # [b, T, d_out] detached output, only where it is a network output
    generation: int            # which root forward produced it
    g: torch.Tensor | None = None


@dataclass(frozen=True)
class _Target:
    path: str
    module: nn.Module
    extractor: Extractor
    batch_dim: int


@dataclass(frozen=True)
class _Plan:
    """Everything a capture of one model needs that does not change between steps."""

    spec: NetworkSpec
    targets: tuple[_Target, ...]
    keep_output: frozenset[str]
    batch_norms: tuple[tuple[str, nn.Module], ...]


#: model -> (its structure, its plan per batch_dim argument): a capture per training step then costs
#: no dry run and no module search
_PLANS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, dict]] = weakref.WeakKeyDictionary()


def _structure(model: nn.Module) -> tuple:
    """What the traced spec depends on: module paths, types, parameter shapes and training flags."""
    return tuple((path, type(m), m.training, tuple((n, tuple(p.shape)) for n, p in m.named_parameters(recurse=False)))
                 for path, m in model.named_modules())


def _traced(model: nn.Module) -> Trace:
    """:func:`~gradmetanet.core.dataflow.trace` of ``model``; refuses a forward that mixes the examples."""
    found = trace(model)
    if found.couplings:
        raise CaptureError(f"the forward of {type(model).__name__} mixes the examples of a batch "
                           f"({', '.join(found.couplings)}): one example's output depends on the others, so "
                           "per-example gradients are not defined. Remove the coupling (e.g. GroupNorm instead of "
                           "batch statistics) or capture a subset of layers with layers=[...] if you are sure.")
    return found


def _batch_first(module: nn.Module) -> bool | None:
    """The module's ``batch_first``, or that of a direct child (a transformer layer keeps it in ``self_attn``)."""
    if isinstance(getattr(module, "batch_first", None), bool):
        return module.batch_first
    for child in module.children():
        if isinstance(getattr(child, "batch_first", None), bool):
            return child.batch_first
    return None


def _batch_dim_of(model: nn.Module, path: str) -> int:
    """1 when the nearest enclosing module that knows a ``batch_first`` has it ``False``, else 0."""
    parts = path.split(".") if path else []
    for depth in range(len(parts), -1, -1):
        flag = _batch_first(model.get_submodule(".".join(parts[:depth])))
        if flag is not None:
            return 0 if flag else 1
    return 0


def _to_batch_major(x: torch.Tensor, batch_dim: int) -> torch.Tensor:
    """``[..., d]`` with the batch axis at ``batch_dim`` -> ``[b, T, d]``."""
    if batch_dim:
        x = x.movedim(batch_dim, 0)
    return x.reshape(x.shape[0], -1, x.shape[-1])


class GradientCapture:
    """Context manager that captures ``(a, g)`` for each site of ``model``.

    Args:
        model: the base network.
        loss_reduction: ``"mean"`` if the loss averages over the batch (the usual
            ``F.cross_entropy``), ``"sum"`` if it sums; with ``"mean"`` the recorded gradients are
            rescaled by the batch size so that each row is the gradient of that example's own loss.
        spec: a hand-written :class:`NetworkSpec` whose site names are module paths; default:
            :meth:`NetworkSpec.from_module` (the data flow of one dry run).
        layers: optional subset to capture (module paths or the modules themselves); the spec
            then gives every site its own fixed spaces, as the symmetry of a part is unknown.
        batch_dim: the batch axis of every site's input (default: inferred per site, see module docstring).
        check_finite: raise :class:`CaptureError` when a captured factor holds NaN or infinity. The test
            runs (with one host synchronisation) on the first view of the gradients, not in the step.
        ignore_no_grad: skip forward passes run without gradients (evaluation under
            ``torch.no_grad()``) instead of raising; for captures that stay armed across steps.
        after_backward_hint: what the error for a forward after a backward says to do (an owner such as
            a learned optimizer knows better than "use one capture per step").

    Usage::

        with GradientCapture(model) as cap:
            F.cross_entropy(model(x), y).backward()
        gs = cap.gradients

    A site that runs several times in one forward (weight sharing) contributes each use as extra
    tokens. A forward of the whole model that is never backpropagated is forgotten when the next
    one starts; BatchNorm in training mode (which couples the examples) is refused.
    """

    def __init__(self, model: nn.Module, loss_reduction: LossReduction = "mean", spec: NetworkSpec | None = None,
                 layers: Iterable[str | nn.Module] | None = None, batch_dim: int | None = None,
                 check_finite: bool = True, ignore_no_grad: bool = False, after_backward_hint: str | None = None
                 ) -> None:
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum' (as in Opacus), got {loss_reduction!r}")
        if spec is not None and layers is not None:
            raise ValueError("pass either spec= or layers=, not both")
        self.model = model
        self.loss_reduction: LossReduction = loss_reduction
        self.check_finite = check_finite
        self.ignore_no_grad = ignore_no_grad
        self.after_backward_hint = after_backward_hint or "use one capture per forward/backward step (or reset())"
        if spec is None and layers is None:
            plan = self._cached_plan(model, batch_dim)
        else:
            plan = self._plan(model, spec, layers, batch_dim)
        self.spec = plan.spec
        self._targets, self._keep_output, self._batch_norms = plan.targets, plan.keep_output, plan.batch_norms
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._calls: dict[str, list[_Call]] = {}
        self._active = False
        self._backward_seen = False
        self._generation = 0
        self._result: GradientSet | None = None

    @classmethod
    def _cached_plan(cls, model: nn.Module, batch_dim: int | None) -> _Plan:
        structure = _structure(model)
        entry = _PLANS.get(model)
        if entry is None or entry[0] != structure:
            entry = (structure, {})
            _PLANS[model] = entry
        if batch_dim not in entry[1]:
            entry[1][batch_dim] = cls._plan(model, None, None, batch_dim)
        return entry[1][batch_dim]

    @classmethod
    def _plan(cls, model: nn.Module, spec: NetworkSpec | None, layers: Iterable[str | nn.Module] | None,
              batch_dim: int | None) -> _Plan:
        if layers is not None:
            named = cls._resolve_layers(model, layers)
            spec = NetworkSpec.independent(
                (p, *extractor_for(m).widths(m), getattr(m, "bias", None) is not None) for p, m in named)
        else:
            spec = _traced(model).spec if spec is None else spec
            named = cls._resolve_layers(model, [s.name for s in spec.sites])
            _check_widths(spec, named)
        targets = tuple(_Target(p, m, extractor_for(m), _batch_dim_of(model, p) if batch_dim is None else batch_dim)
                        for p, m in named)
        keep_output = frozenset(s.name for s in spec.sites if not spec.readers(s.out_space))
        batch_norms = tuple((p, m) for p, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
        return _Plan(spec, targets, keep_output, batch_norms)

    @staticmethod
    def _resolve_layers(model: nn.Module, layers: Iterable[str | nn.Module]) -> list[tuple[str, nn.Module]]:
        path_of = {id(m): p for p, m in model.named_modules()}
        modules = dict(model.named_modules())
        capturable = [p for p, m in modules.items() if extractor_for(m) is not None]
        named: list[tuple[str, nn.Module]] = []
        for layer in layers:
            if isinstance(layer, str):
                if layer not in modules:
                    raise ValueError(f"the model has no layer {layer!r}; capturable layers: {capturable}")
                path, module = layer, modules[layer]
            else:
                if id(layer) not in path_of:
                    raise ValueError(f"layer {type(layer).__name__} is not a submodule of the model")
                path, module = path_of[id(layer)], layer
            extractor = extractor_for(module)
            if extractor is None:
                raise TypeError(f"layer {path!r} is a {type(module).__name__}, which has no registered extractor; "
                                f"capturable layers: {capturable}")
            try:
                extractor.check_module(path, module)
            except UnsupportedModuleError as err:
                raise CaptureError(str(err)) from err
            named.append((path, module))
        if not named:
            raise ValueError("layers=[] selects nothing to capture")
        return named

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> "GradientCapture":
        if self._active:
            raise CaptureError("this GradientCapture is already active; it cannot be entered twice")
        self.reset()
        self._handles = [t.module.register_forward_hook(self._make_forward_hook(t)) for t in self._targets]
        self._handles.append(self.model.register_forward_pre_hook(self._on_model_forward))
        self._handles += [m.register_forward_pre_hook(self._refuse_batch_norm(p)) for p, m in self._batch_norms]
        self._active = True
        return self

    def reset(self) -> None:
        """Forget what was recorded, keeping the hooks: the next forward and backward start a fresh capture
        (what a training loop that captures every step needs, without re-registering hooks)."""
        self._calls = {t.path: [] for t in self._targets}
        self._backward_seen = False
        self._result = None
        self._generation += 1

    def __exit__(self, *exc_info) -> None:
        self.remove()

    @property
    def active(self) -> bool:
        """Whether the hooks are registered."""
        return self._active

    def remove(self) -> None:
        """Remove every hook; gradients already recorded stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._active = False

    # ------------------------------------------------------------------ hooks
    def _on_model_forward(self, module: nn.Module, args: tuple) -> None:
        """A new forward of the whole model: records of an earlier forward that no backward reached are stale."""
        if torch.is_grad_enabled() and not self._backward_seen and any(self._calls.values()):
            self.reset()

    @staticmethod
    def _refuse_batch_norm(path: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if module.training and torch.is_grad_enabled():
                raise CaptureError(
                    f"module {path!r} is a {type(module).__name__} in training mode: it normalises with statistics "
                    "of the whole batch, so one example's gradient depends on the others and per-example gradients "
                    "are not defined. Put it in eval mode (module.eval()), or replace it with GroupNorm / "
                    "LayerNorm (as Opacus requires).")
        return hook

    def _make_forward_hook(self, target: _Target):
        path, bd = target.path, target.batch_dim

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not torch.is_grad_enabled():
                if self.ignore_no_grad:
                    return
                raise CaptureError(f"layer {path!r} ran under torch.no_grad() (or inference_mode) inside "
                                   "GradientCapture: there will be no backward pass to capture")
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                raise CaptureError(f"the output of layer {path!r} does not require grad (frozen parameters "
                                   "and an input without grad?), so its gradient cannot be captured")
            if self._backward_seen:
                raise CaptureError(f"layer {path!r} ran forward after a backward pass inside the same "
                                   f"GradientCapture; {self.after_backward_hint}")
            x = target.extractor.activation(module, inputs, output)
            y = target.extractor.output(module, inputs, output)
            if x.dim() < 2 + bd:
                raise CaptureError(f"layer {path!r} got an input of shape {list(x.shape)} with its batch axis at "
                                   f"dim {bd}; capture needs a batched input, [b, d] or [b, ..., d] (or [T, b, d] "
                                   "under batch_first=False)")
            a = _to_batch_major(x.detach(), bd)
            out = _to_batch_major(y.detach(), bd) if path in self._keep_output else None
            calls = self._calls[path]
            calls.append(_Call(a, x._version, out, self._generation))
            index, generation, shape = len(calls) - 1, self._generation, y.shape
            _hook_target(y).register_hook(
                lambda grad: self._on_grad(path, index, generation, grad.reshape(shape), bd))
        return hook

    def _on_grad(self, path: str, index: int, generation: int, grad: torch.Tensor, batch_dim: int) -> None:
        if not self._active:
            return
        if generation != self._generation:
            raise CaptureError(f"backward reached a forward pass of layer {path!r} that a later forward superseded; "
                               "GradientCapture records one forward per backward (accumulate over batches with "
                               "one capture each)")
        call = self._calls[path][index]
        if call.g is not None:
            raise CaptureError(f"backward reached layer {path!r} twice inside one GradientCapture; capture "
                               "one backward per context (retain_graph=True with a second backward is not supported)")
        if call.a._version != call.version:
            raise CaptureError(f"the input of layer {path!r} was modified in place after the forward pass; "
                               "its recorded activation would be wrong")
        self._backward_seen = True
        call.g = _to_batch_major(grad.detach(), batch_dim)

    # ------------------------------------------------------------------ result
    @property
    def gradients(self) -> GradientSet:
        """The captured :class:`GradientSet` (available once backward has run)."""
        if self._result is None:
            self._result = self._assemble()
        return self._result

    def _assemble(self) -> GradientSet:
        if not any(self._calls.values()):
            raise CaptureError("no forward pass of a captured layer ran inside GradientCapture")
        if not self._backward_seen:
            raise CaptureError("no backward pass was captured: call loss.backward() inside the `with` block")
        missing = [p for p, cs in self._calls.items() if not cs]
        if missing:
            raise CaptureError(f"layers {missing} did not run in the forward pass; capture a subset with layers=[...]")
        spec = self.spec
        sizes = {t.path: {c.a.shape[0] for c in self._calls[t.path]} for t in self._targets}
        if len(set().union(*sizes.values())) > 1:
            dims = {t.path: t.batch_dim for t in self._targets}
            raise CaptureError(f"the captured layers see different batch sizes {sizes} along their batch axes "
                               f"{dims}: the batch axis is ambiguous; pass batch_dim= or set batch_first on the "
                               "enclosing module")
        acts, grads, outs = {}, {}, {}
        for site in spec.sites:
            calls = self._calls[site.name]
            a = _cat_tokens([c.a for c in calls])
            d_out = spec.space(site.out_space).size
            # a layer off the loss's path receives no gradient: its gradient is exactly zero
            g = _cat_tokens([c.g if c.g is not None else c.a.new_zeros(*c.a.shape[:2], d_out) for c in calls])
            if a.dtype != g.dtype:                             # autocast: bf16 outputs of float32 inputs
                dtype = torch.promote_types(a.dtype, g.dtype)
                a, g = a.to(dtype), g.to(dtype)
            if self.loss_reduction == "mean":
                g = g * a.shape[0]
            acts[site.name], grads[site.name] = a, g
            if site.name in self._keep_output:
                outs[site.name] = _cat_tokens([c.out for c in calls]).to(a.dtype)
        return GradientSet(spec, acts, grads, outs, self.loss_reduction, _unchecked=self.check_finite)


def _check_widths(spec: NetworkSpec, named: list[tuple[str, nn.Module]]) -> None:
    for (path, module), site in zip(named, spec.sites):
        want = (spec.space(site.in_space).size, spec.space(site.out_space).size)
        got = extractor_for(module).widths(module)
        if got != want:
            raise ValueError(f"spec site {path!r} has widths {want} but the module has {got}")


def _cat_tokens(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Join the uses of one layer along the token axis (no copy for a single use)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, 1)


def _hook_target(output: torch.Tensor) -> torch.Tensor:
    """The tensor whose gradient hook sees ``dL/d output`` even after in-place ops on ``output``.

    For inputs ``[b, T, d]`` ``nn.Linear`` returns a reshaped *view* of a 2-D matmul result. An
    in-place op on that view (``ReLU(inplace=True)``) rebases the view's autograd history, and a
    hook registered on the view would never fire; a hook on the view's base (same numbers, other
    shape) still does.
    """
    base = output._base
    if base is not None and base.numel() == output.numel() and base.is_contiguous() and output.is_contiguous():
        return base
    return output
