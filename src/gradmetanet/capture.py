"""GradientCapture: record decomposed per-example gradients during an ordinary backward.

A forward hook on every captured ``nn.Linear`` keeps a reference to its input ``a`` and
registers a tensor hook on its output; during ``backward()`` that hook receives ``dL/dy``,
the pre-activation gradient ``g``. Nothing of size ``b x P`` is ever formed, and the only work
added to the step is bookkeeping (plus one rescale of ``g`` when the gradients are read).

A tensor hook (rather than ``register_full_backward_hook``) is used because it tolerates
in-place activations after the layer (``nn.ReLU(inplace=True)``): the hook sees the gradient
with respect to the value the layer produced, which is what the weight gradient needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from .gradients import GradientSet, LossReduction
from .spec import NetworkSpec

__all__ = ["GradientCapture", "CaptureError"]


class CaptureError(RuntimeError):
    """Decomposed gradients could not be captured as asked (the message says why)."""


@dataclass
class _Call:
    """One forward call of a captured layer: its input, the input's version, and later its gradient."""

    a: torch.Tensor            # [b, T, d_in], detached (shares storage with the layer input)
    version: int               # autograd version counter of the input when recorded
    out: torch.Tensor | None   # [b, T, d_out] detached output, only where it is a network output
    g: torch.Tensor | None = None


class GradientCapture:
    """Context manager that captures ``(a, g)`` for each linear layer of ``model``.

    Args:
        model: the base network. Without ``layers`` it must be an MLP as described by
            :meth:`NetworkSpec.from_module` (every parameterised module an ``nn.Linear``).
        loss_reduction: ``"mean"`` if the loss averages over the batch (the usual
            ``F.cross_entropy``), ``"sum"`` if it sums; with ``"mean"`` the recorded gradients are
            rescaled by the batch size so that each row is the gradient of that example's own loss.
        layers: optional subset to capture (module paths or the modules themselves); the spec
            then gives every site its own fixed spaces, as the symmetry of a part is unknown.
        check_finite: raise when a captured factor holds NaN or infinity.
        ignore_no_grad: skip forward passes run without gradients (evaluation under
            ``torch.no_grad()``) instead of raising; for captures that stay armed across steps.

    Usage::

        with GradientCapture(model) as cap:
            F.cross_entropy(model(x), y).backward()
        gs = cap.gradients

    A layer that runs several times in one forward (weight sharing) contributes each use as
    extra tokens; the spaces it touches are then marked non-permutable in the spec.
    """

    def __init__(self, model: nn.Module, loss_reduction: LossReduction = "mean",
                 layers: Iterable[str | nn.Module] | None = None, check_finite: bool = True,
                 ignore_no_grad: bool = False) -> None:
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum' (as in Opacus), got {loss_reduction!r}")
        self.model = model
        self.loss_reduction: LossReduction = loss_reduction
        self.check_finite = check_finite
        self.ignore_no_grad = ignore_no_grad
        if layers is None:
            self.spec = NetworkSpec.from_module(model)
            self._chain = True
            named = [(site.name, model.get_submodule(site.name)) for site in self.spec.sites]
        else:
            named = self._resolve_layers(model, layers)
            self.spec = NetworkSpec.independent(named)
            self._chain = False
        self._modules: list[tuple[str, nn.Module]] = named
        self._keep_output = {s.name for s in self.spec.sites if not self.spec.readers(s.out_space)}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._calls: dict[str, list[_Call]] = {}
        self._order: list[str] = []
        self._active = False
        self._backward_seen = False
        self._result: GradientSet | None = None

    @staticmethod
    def _resolve_layers(model: nn.Module, layers: Iterable[str | nn.Module]) -> list[tuple[str, nn.Linear]]:
        path_of = {id(m): p for p, m in model.named_modules()}
        named: list[tuple[str, nn.Linear]] = []
        for layer in layers:
            if isinstance(layer, str):
                path, module = layer, model.get_submodule(layer)
            else:
                if id(layer) not in path_of:
                    raise ValueError(f"layer {type(layer).__name__} is not a submodule of the model")
                path, module = path_of[id(layer)], layer
            if not isinstance(module, nn.Linear):
                raise TypeError(f"layer {path!r} is a {type(module).__name__}; only nn.Linear layers can be captured")
            named.append((path, module))
        if not named:
            raise ValueError("layers=[] selects nothing to capture")
        return named

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> "GradientCapture":
        if self._active:
            raise CaptureError("this GradientCapture is already active; it cannot be entered twice")
        self.reset()
        self._handles = [m.register_forward_hook(self._make_forward_hook(p)) for p, m in self._modules]
        self._active = True
        return self

    def reset(self) -> None:
        """Forget what was recorded, keeping the hooks: the next forward and backward start a fresh capture
        (what a training loop that captures every step needs, without re-registering hooks)."""
        self._calls = {path: [] for path, _ in self._modules}
        self._order = []
        self._backward_seen = False
        self._result = None

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook; gradients already recorded stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._active = False

    # ------------------------------------------------------------------ hooks
    def _make_forward_hook(self, path: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not torch.is_grad_enabled():
                if self.ignore_no_grad:
                    return
                raise CaptureError(f"layer {path!r} ran under torch.no_grad() (or inference_mode) inside "
                                   "GradientCapture: there will be no backward pass to capture")
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                raise CaptureError(f"the output of layer {path!r} does not require grad (frozen parameters "
                                   "and an input without grad?), so its gradient cannot be captured")
            calls = self._calls[path]
            if self._backward_seen:
                raise CaptureError(f"layer {path!r} ran forward after a backward pass inside the same "
                                   "GradientCapture; use one capture per forward/backward step")
            x = inputs[0]
            if x.dim() < 2:
                raise CaptureError(f"layer {path!r} got an input of shape {list(x.shape)}; capture needs a "
                                   "leading batch axis, [b, d] or [b, ..., d]")
            a = x.detach().reshape(x.shape[0], -1, x.shape[-1])
            out = output.detach().reshape(x.shape[0], -1, output.shape[-1]) if path in self._keep_output else None
            calls.append(_Call(a, x._version, out))
            self._order.append(path)
            index = len(calls) - 1
            _hook_target(output).register_hook(lambda grad: self._on_grad(path, index, grad))
        return hook

    def _on_grad(self, path: str, index: int, grad: torch.Tensor) -> None:
        if not self._active:
            return
        call = self._calls[path][index]
        if call.g is not None:
            raise CaptureError(f"backward reached layer {path!r} twice inside one GradientCapture; capture "
                               "one backward per context (retain_graph=True with a second backward is not supported)")
        if call.a._version != call.version:
            raise CaptureError(f"the input of layer {path!r} was modified in place after the forward pass; "
                               "its recorded activation would be wrong")
        self._backward_seen = True
        call.g = grad.detach().reshape(call.a.shape[0], -1, grad.shape[-1])

    # ------------------------------------------------------------------ result
    @property
    def gradients(self) -> GradientSet:
        """The captured :class:`GradientSet` (available once backward has run)."""
        if self._result is None:
            self._result = self._assemble()
        return self._result

    def _assemble(self) -> GradientSet:
        if not self._order:
            raise CaptureError("no forward pass of a captured layer ran inside GradientCapture")
        if not self._backward_seen:
            raise CaptureError("no backward pass was captured: call loss.backward() inside the `with` block")
        missing = [p for p, cs in self._calls.items() if not cs]
        if missing:
            raise CaptureError(f"layers {missing} did not run in the forward pass; capture a subset with layers=[...]")
        spec = self.spec
        if self._chain:
            first_calls = list(dict.fromkeys(self._order))
            expected = [s.name for s in spec.sites]
            if first_calls != expected:
                raise CaptureError(f"layers ran in the order {first_calls}, but the MLP chain inferred from the "
                                   f"module is {expected}; describe this network with layers=[...]")
            reused = [s for s in spec.sites if len(self._calls[s.name]) > 1]
            if reused:
                spec = spec.with_fixed(n for s in reused for n in (s.in_space, s.out_space))
        acts, grads, outs = {}, {}, {}
        for site in spec.sites:
            calls = self._calls[site.name]
            if len({c.a.shape[0] for c in calls}) > 1:
                raise CaptureError(f"layer {site.name!r} ran on batches of different sizes "
                                   f"{[c.a.shape[0] for c in calls]} inside one capture")
            a = _cat_tokens([c.a for c in calls])
            d_out = spec.space(site.out_space).size
            # a layer off the loss's path receives no gradient: its gradient is exactly zero
            g = _cat_tokens([c.g if c.g is not None else c.a.new_zeros(*c.a.shape[:2], d_out) for c in calls])
            if self.loss_reduction == "mean":
                g = g * a.shape[0]
            acts[site.name], grads[site.name] = a, g
            if site.name in self._keep_output:
                outs[site.name] = _cat_tokens([c.out for c in calls])
        result = GradientSet(spec, acts, grads, outs, self.loss_reduction)
        if self.check_finite:
            _check_finite(acts, grads)
        return result


def _cat_tokens(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Join the uses of one layer along the token axis (no copy for a single use)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, 1)


def _check_finite(acts: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
    """Raise :class:`CaptureError` naming the first site with a NaN or infinite factor.

    One reduction per tensor and a single host sync: a sum is finite whenever every term is
    (barring overflow, which the exact per-tensor check below then rules in or out).
    """
    named = [(f"activations at layer {k!r}", t) for k, t in acts.items()]
    named += [(f"gradients at layer {k!r}", t) for k, t in grads.items()]
    if bool(torch.isfinite(torch.stack([t.sum() for _, t in named])).all()):
        return
    for what, t in named:
        if not bool(torch.isfinite(t).all()):
            raise CaptureError(f"non-finite {what} (NaN or inf) captured; check the loss and the inputs "
                               "(or pass check_finite=False)")


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
