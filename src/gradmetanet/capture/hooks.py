"""GradientCapture: record decomposed per-example gradients during an ordinary backward.

A forward hook on every captured module (an ``nn.Linear``, or a type with a registered
:class:`~gradmetanet.capture.registry.Extractor`) keeps a reference to the activation ``a``
the site reads and registers a tensor hook on its output; during ``backward()`` that hook
receives ``dL/dy``, the output gradient ``g``. Nothing of size ``b x P`` is ever formed; the
rescale of ``g`` and the finiteness check run when the gradients are read, not in the step.

A *composite* module (``nn.MultiheadAttention``: Q, K, V and the output projection inside one
functional call) has its ``forward`` replaced, while the capture is active, by its extractor's
equivalent forward, which reports every site to a tap that does the same recording.

A tensor hook (rather than ``register_full_backward_hook``) is used because it tolerates
in-place activations after the layer (``nn.ReLU(inplace=True)``): the hook sees the gradient
with respect to the value the layer produced, which is what the weight gradient needs.

When no guessed input runs the model (inputs with masks of a fixed batch size, several inputs),
the spec is traced on the first forward inside the capture, with the real inputs.

The batch axis of a site is 0, or 1 when the nearest enclosing module that has (or whose direct
child has) a ``batch_first`` attribute has it ``False`` (PyTorch's transformer layers keep it in
``self_attn``); ``batch_dim=`` overrides it.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, replace
from typing import Iterable

import torch
from torch import nn

from .trace import InputGuessError, Trace, canonical_parameter_names, trace
from ..core.spec import NetworkSpec, Space, UnsupportedModuleError
from ..errors import CaptureError
from .gradients import GradientSet, LossReduction
from .registry import Extractor, Tap, capturable_modules, extractor_for

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
    """A captured module and the sites it records (one, named by its path; or a composite's several)."""

    path: str
    module: nn.Module
    extractor: Extractor
    batch_dim: int
    sites: tuple[str, ...]


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


def _traced(model: nn.Module, args: tuple | None = None, kwargs: dict | None = None) -> Trace:
    """:func:`~gradmetanet.capture.trace.trace` of ``model`` (on ``args`` if given); refuses a forward that mixes
    the examples."""
    found = trace(model, args, kwargs)
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
            :func:`~gradmetanet.capture.trace.spec_of` (the data flow of one dry run).
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
        self._batch_dim = batch_dim
        plan: _Plan | None = None
        if spec is None and layers is None:
            try:
                plan = self._cached_plan(model, batch_dim)
            except InputGuessError:             # traced on the first forward, with the real inputs
                pass
        else:
            plan = self._plan(model, spec, layers, batch_dim)
        self._set_plan(plan)
        self._tracing = False
        self._model_batch: int | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._calls: dict[str, list[_Call]] = {}
        self._active = False
        self._backward_seen = False
        self._generation = 0
        self._result: GradientSet | None = None

    def _set_plan(self, plan: _Plan | None) -> None:
        self._spec = None if plan is None else plan.spec
        self._targets = () if plan is None else plan.targets
        self._keep_output = frozenset() if plan is None else plan.keep_output
        self._batch_norms = () if plan is None else plan.batch_norms

    @property
    def spec(self) -> NetworkSpec:
        """The captured network's spec (traced from the data flow, or the one passed in)."""
        if self._spec is None:
            raise CaptureError(f"{type(self.model).__name__} did not run on a guessed input, so its spec is traced "
                               "on the first forward inside the capture; read the spec after it (or build it with "
                               "spec_of(model, example_inputs) and pass spec=)")
        return self._spec

    @classmethod
    def _cached_plan(cls, model: nn.Module, batch_dim: int | None, args: tuple | None = None,
                     kwargs: dict | None = None) -> _Plan:
        structure = _structure(model)
        entry = _PLANS.get(model)
        if entry is None or entry[0] != structure:
            entry = (structure, {})
            _PLANS[model] = entry
        if batch_dim not in entry[1]:
            entry[1][batch_dim] = cls._plan(model, None, None, batch_dim, args, kwargs)
        return entry[1][batch_dim]

    @classmethod
    def _plan(cls, model: nn.Module, spec: NetworkSpec | None, layers: Iterable[str | nn.Module] | None,
              batch_dim: int | None, args: tuple | None = None, kwargs: dict | None = None) -> _Plan:
        if layers is not None:
            named = cls._resolve_layers(model, layers)
            spec = independent_spec(model, named)
        else:
            spec = _traced(model, args, kwargs).spec if spec is None else spec
            named = modules_of_sites(model, spec)
        wanted = {s.name for s in spec.sites}
        targets = tuple(_Target(p, m, e, _batch_dim_of(model, p) if batch_dim is None else batch_dim,
                                tuple(s.name for s in e.layout(p, m).sites if s.name in wanted))
                        for p, m, e in named)
        keep_output = frozenset(s.name for s in spec.sites if not spec.readers(s.out_space))
        batch_norms = tuple((p, m) for p, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
        return _Plan(spec, targets, keep_output, batch_norms)

    @staticmethod
    def _resolve_layers(model: nn.Module, layers: Iterable[str | nn.Module]) -> list[tuple[str, nn.Module, Extractor]]:
        path_of = {id(m): p for p, m in model.named_modules()}
        modules = dict(model.named_modules())
        capturable = [p for p, _, _ in capturable_modules(model)]
        named: list[tuple[str, nn.Module, Extractor]] = []
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
            if extractor is None or path not in capturable:
                owner = [p for p in capturable if path.startswith(f"{p}.")]
                why = (f"it belongs to {owner[0]!r}, which applies its weights functionally; capture {owner[0]!r}"
                       if owner else f"it is a {type(module).__name__}, which has no registered extractor (or no "
                       "parameters)")
                raise CaptureError(f"layer {path!r} cannot be captured: {why}; capturable layers: {capturable}")
            try:
                extractor.validate(path, module)
            except UnsupportedModuleError as err:
                raise CaptureError(str(err)) from err
            named.append((path, module, extractor))
        if not named:
            raise ValueError("layers=[] selects nothing to capture")
        return named

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> "GradientCapture":
        if self._active:
            raise CaptureError("this GradientCapture is already active; it cannot be entered twice")
        self.reset()
        self._handles = []
        if self._spec is None:
            self._handles.append(self.model.register_forward_pre_hook(self._plan_on_first_forward, with_kwargs=True))
        self._attach_targets()
        self._handles.append(self.model.register_forward_pre_hook(self._on_model_forward, with_kwargs=True))
        self._handles += [m.register_forward_pre_hook(self._refuse_batch_norm(p)) for p, m in self._batch_norms]
        self._active = True
        return self

    def _attach_targets(self) -> None:
        self._handles += [t.module.register_forward_hook(self._make_forward_hook(t)) for t in self._targets
                          if not t.extractor.composite]
        self._handles += [_replace_forward(t, self._make_tap(t)) for t in self._targets if t.extractor.composite]

    def _plan_on_first_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Trace the model on its first real inputs (when none could be guessed), then attach the hooks."""
        if self._spec is not None or self._tracing:
            return
        self._tracing = True
        try:
            self._set_plan(self._cached_plan(self.model, self._batch_dim, args, kwargs))
        finally:
            self._tracing = False
        self.reset()
        self._attach_targets()

    def reset(self) -> None:
        """Forget what was recorded, keeping the hooks: the next forward and backward start a fresh capture
        (what a training loop that captures every step needs, without re-registering hooks)."""
        self._calls = {site: [] for t in self._targets for site in t.sites}
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
    def _on_model_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """A new forward of the whole model: records of an earlier forward that no backward reached are stale.
        Notes the batch size (the leading axis of the first tensor input) for inputs shared by the batch."""
        if torch.is_grad_enabled() and not self._backward_seen and any(self._calls.values()):
            self.reset()
        first = next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.dim()), None)
        self._model_batch = None if first is None else first.shape[0]

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
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if not self._should_record(target.path, output):
                return None
            shared = self._shared_lookup(target, inputs, output)
            if shared is not None:
                inputs, output = shared
            with torch.no_grad():       # a is kept detached: computing it saves nothing for autograd
                a = target.extractor.activation(module, inputs, output)        # (checkpointing counts saved tensors)
            self._record(target.sites[0], a, target.extractor.output(module, inputs, output), target.batch_dim,
                         target.extractor.features_last)
            return output if shared is not None else None
        return hook

    def _shared_lookup(self, target: _Target, inputs: tuple, output: torch.Tensor) -> tuple[tuple, torch.Tensor] | None:
        """A lookup table read with ids shared by the batch (position ids ``[1, T]``, broadcast when added to the
        ``[b, T, d]`` token embeddings): its ids and output expanded to the model's batch, the output handed on
        in place of the module's. The values downstream are unchanged, and the gradient of each example's row
        is that example's own: a position table read by every example gets ordinary per-example gradients."""
        b = self._model_batch
        if target.extractor.kind != "embedding" or target.batch_dim != 0 or b is None or b == 1 \
                or output.dim() < 2 or output.shape[0] != 1 or inputs[0].shape[0] != 1:
            return None
        return ((inputs[0].expand(b, *inputs[0].shape[1:]), *inputs[1:]), output.expand(b, *output.shape[1:]))

    def _make_tap(self, target: _Target) -> Tap:
        wanted = set(target.sites)

        def tap(role: str, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            site = f"{target.path}:{role}"
            if site in wanted and self._should_record(site, y):
                self._record(site, a, y, 0)                 # composite forwards hand over batch-major factors
            return y
        return tap

    def _should_record(self, path: str, output: torch.Tensor) -> bool:
        """Whether a forward call of a site is recorded; raises on a call that cannot be captured.

        A forward that runs inside a backward pass is activation checkpointing's recomputation: with
        ``use_reentrant=False`` the first forward was recorded (its graph is the one backward runs through) and
        the recomputation is skipped; with ``use_reentrant=True`` the first forward ran without gradients and the
        recomputation builds a graph of its own, which is refused by name.
        """
        if torch._C._current_graph_task_id() != -1:
            if self._calls.get(path):
                return False
            raise CaptureError(f"layer {path!r} ran forward inside a backward pass without an earlier recorded "
                               "forward: activation checkpointing with use_reentrant=True (torch.utils.checkpoint's "
                               "reentrant mode, the default of some Hugging Face versions). Use "
                               "use_reentrant=False (model.gradient_checkpointing_enable(gradient_checkpointing_"
                               "kwargs={'use_reentrant': False})), which GradientCapture supports")
        if not torch.is_grad_enabled():
            if self.ignore_no_grad:
                return False
            raise CaptureError(f"layer {path!r} ran under torch.no_grad() (or inference_mode) inside "
                               "GradientCapture: there will be no backward pass to capture (inside "
                               "torch.utils.checkpoint with use_reentrant=True? use use_reentrant=False)")
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            raise CaptureError(f"the output of layer {path!r} does not require grad (frozen parameters "
                               "and an input without grad?), so its gradient cannot be captured")
        if self._backward_seen:
            raise CaptureError(f"layer {path!r} ran forward after a backward pass inside the same "
                               f"GradientCapture; {self.after_backward_hint}")
        return True

    def _record(self, site: str, x: torch.Tensor, y: torch.Tensor, bd: int,
                features_last=lambda t: t) -> None:
        """Keep the activation ``x`` of one call of ``site`` and hook the gradient of its output ``y``
        (``features_last`` moves a channels-first output or gradient's features to the last axis)."""
        if x.dim() < 2 + bd:
            raise CaptureError(f"layer {site!r} got an input of shape {list(x.shape)} with its batch axis at "
                               f"dim {bd}; capture needs a batched input, [b, d] or [b, ..., d] (or [T, b, d] "
                               "under batch_first=False)")
        a = _to_batch_major(x.detach(), bd)
        out = _to_batch_major(features_last(y.detach()), bd) if site in self._keep_output else None
        calls = self._calls[site]
        calls.append(_Call(a, x._version, out, self._generation))
        index, generation, shape = len(calls) - 1, self._generation, y.shape
        _hook_target(y).register_hook(
            lambda grad: self._on_grad(site, index, generation, features_last(grad.reshape(shape)), bd))

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
        sizes = {site: {c.a.shape[0] for c in calls} for site, calls in self._calls.items()}
        every = set().union(*sizes.values())
        if len(every) > 1 and 1 in every:
            shared = [site for site, s in sizes.items() if s == {1}]
            raise CaptureError(f"layers {shared} ran on inputs without a batch axis (size 1) while the others saw "
                               f"{max(every)} examples: an input shared by the batch (position ids of shape [T], "
                               "broadcast later) gives one summed gradient, not one per example. Give it the batch "
                               "axis (e.g. positions.expand(batch, -1)).")
        if len(every) > 1:
            dims = {t.path: t.batch_dim for t in self._targets}
            raise CaptureError(f"the captured layers see different batch sizes {sizes} along their batch axes "
                               f"{dims}: the batch axis is ambiguous; pass batch_dim= or set batch_first on the "
                               "enclosing module")
        acts, grads, outs = {}, {}, {}
        dtype = next(c.g.dtype for calls in self._calls.values() for c in calls if c.g is not None)
        for site in spec.sites:
            calls = self._calls[site.name]
            a = _cat_tokens([c.a for c in calls])
            d_out = spec.space(site.out_space).size
            # a layer off the loss's path receives no gradient: its gradient is exactly zero
            g = _cat_tokens([c.g if c.g is not None else c.a.new_zeros(*c.a.shape[:2], d_out, dtype=dtype)
                             for c in calls])
            if a.is_floating_point() and a.dtype != g.dtype:   # autocast: bf16 outputs of float32 inputs
                dtype = torch.promote_types(a.dtype, g.dtype)
                a, g = a.to(dtype), g.to(dtype)
            if self.loss_reduction == "mean":
                g = g * a.shape[0]
            acts[site.name], grads[site.name] = a, g
            if site.name in self._keep_output:
                outs[site.name] = _cat_tokens([c.out for c in calls]).to(a.dtype)
        return GradientSet(spec, acts, grads, outs, self.loss_reduction, _unchecked=self.check_finite)


def modules_of_sites(model: nn.Module, spec: NetworkSpec) -> list[tuple[str, nn.Module, Extractor]]:
    """The capturable modules that form ``spec``'s sites (checked against their layouts' widths)."""
    found = {}
    for path, module, extractor in capturable_modules(model):
        layout = extractor.layout(path, module)
        for site in layout.sites:
            found[site.name] = (path, module, extractor, site, layout)
    named: dict[str, tuple[str, nn.Module, Extractor]] = {}
    for site in spec.sites:
        if site.name not in found:
            raise ValueError(f"spec site {site.name!r} is not a site of the model; its sites: {list(found)}")
        path, module, extractor, own, layout = found[site.name]
        extractor.validate(path, module)
        want = (spec.space(site.in_space).size, spec.space(site.out_space).size)
        got = (layout.sizes[own.in_space], layout.sizes[own.out_space])
        if got != want:
            raise ValueError(f"spec site {site.name!r} has widths {want} but the module has {got}")
        named.setdefault(path, (path, module, extractor))
    return list(named.values())


def independent_spec(model: nn.Module, named: list[tuple[str, nn.Module, Extractor]]) -> NetworkSpec:
    """The sites of ``named`` modules, each reference with its own ``Trivial`` space (``{path}:in``, ``{path}:out``,
    ``{path}:{internal}``): used when only a part of a model is captured, whose symmetry is unknown.

    Parameters carry their ``model.named_parameters()`` names, so a weight tied between two selected modules (an
    unembedding that is the input embedding) is one parameter whose spaces are shared. A tied weight that an
    unselected module also uses is refused: its per-example gradient would hold only the selected share.
    """
    canonical = canonical_parameter_names(model)
    selected = {path for path, _, _ in named}
    users: dict[str, list[str]] = {}
    for path, module in model.named_modules():
        for local, _ in module.named_parameters(recurse=False, remove_duplicate=False):
            users.setdefault(canonical(module, path, f"{path}.{local}" if path else local), []).append(path)
    spaces: dict[str, Space] = {}
    sites = []
    short = {"input:0": "in", "output": "out"}
    for path, module, extractor in named:
        layout = extractor.layout(path, module)

        def name(ref: str) -> str:
            full = f"{path}:{short.get(ref, ref)}"
            spaces.setdefault(full, Space(full, layout.sizes[ref]))
            return full
        for site in layout.sites:
            weight = canonical(module, path, site.weight)
            bias = None if site.bias is None else canonical(module, path, site.bias)
            for param in (weight, bias):
                left_out = [user for user in users.get(param, []) if user not in selected]
                if param is not None and len(users.get(param, [])) > 1 and left_out:
                    raise CaptureError(
                        f"layer {path!r} uses the tied parameter {param!r}, which {left_out} also use: the "
                        f"per-example gradient would hold only the captured share. Capture all its users "
                        f"(layers=[..., {', '.join(repr(u) for u in left_out)}]).")
            sites.append(replace(site, in_space=name(site.in_space), out_space=name(site.out_space), weight=weight,
                                 bias=bias))
    return _tie_spaces(list(spaces.values()), sites)


def _tie_spaces(spaces: list[Space], sites: list) -> NetworkSpec:
    """The spec of ``sites``, with the spaces of a parameter that several sites declare merged axis by axis."""
    parent = {s.name: s.name for s in spaces}

    def find(x: str) -> str:
        while parent[x] != x:
            x = parent[x]
        return x
    first: dict[tuple, tuple] = {}
    for site in sites:
        for p in site.parameters():
            axes = first.setdefault((p.name, p.rows), p.axes)
            for x, y in zip(axes, p.axes):
                if x.space is not None and y.space is not None:
                    parent[find(y.space)] = find(x.space)
    sites = [replace(site, in_space=find(site.in_space), out_space=find(site.out_space)) for site in sites]
    return NetworkSpec(tuple(s for s in spaces if find(s.name) == s.name), tuple(sites))


def _replace_forward(target: _Target, tap: Tap) -> "_ForwardPatch":
    """Run a composite module's forward through its extractor (reporting each site to ``tap``) until removed."""
    module = target.module
    if "forward" in vars(module):
        raise CaptureError(f"module {target.path!r} is already captured by another active GradientCapture (or has an "
                           "instance-level forward); remove the other capture first")
    module.forward = functools.partial(target.extractor.forward, module, tap)
    return _ForwardPatch(module)


class _ForwardPatch:
    """A handle like ``RemovableHandle`` that restores a module's own forward."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def remove(self) -> None:
        if "forward" in vars(self.module):
            del self.module.forward


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
