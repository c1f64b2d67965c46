"""The functional extractor: decomposed gradients as a pure function, for ``vmap`` and ``torch.func.grad``.

:func:`functional_factors` runs ``model`` with ``torch.func.functional_call`` on given
parameters, adds a zero *probe* to the output of every site (through the same registry of
extractors the hooks use) and differentiates the loss with respect to the parameters and the
probes at once: the probe gradients are the output gradients ``g``. Because it is a pure function
of tensors, many networks (a zoo, the inner runs of PES) vectorise with ``torch.vmap``.
"""

from __future__ import annotations

import functools
import weakref
from contextlib import contextmanager
from typing import Callable, Mapping

import torch
from torch import nn
from torch.func import functional_call, grad

from ..core.incidence import neuron_tensor
from ..core.spec import NetworkSpec
from .hooks import modules_of_sites

__all__ = ["functional_factors", "functional_features", "Factors"]

#: ``(loss, param_grads, activations, output_grads, outputs)``, dicts keyed by parameter or site name.
Factors = tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor],
                dict[str, torch.Tensor]]


def functional_factors(model: nn.Module, spec: NetworkSpec, params: Mapping[str, torch.Tensor],
                       inputs: tuple[torch.Tensor, ...], loss_fn: Callable[[torch.Tensor], torch.Tensor],
                       loss_reduction: str = "mean") -> Factors:
    """Loss, parameter gradients and per-site factors of ``loss_fn(model(*inputs))`` under ``params``.

    ``model`` supplies the structure (its own parameter values are not used); ``inputs`` are
    batch-major ``[b, ..., d]``. Returns ``activations[site]: [b, T, d_in]``,
    ``output_grads[site]: [b, T, d_out]`` (per-example: rescaled by ``b`` for a mean-reduced
    loss, as the hooks do) and ``outputs[site]`` for sites whose out-space no site reads.
    """
    targets = _targets(model, spec)
    keep_output = {s.name for s in spec.sites if not spec.readers(s.out_space)}
    b = inputs[0].shape[0]

    def run(p: Mapping[str, torch.Tensor], probes: dict[str, torch.Tensor]):
        record: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def shift(site_name: str, a: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
            shifted = output + probes[site_name].view_as(output)
            record[site_name] = (a, shifted)
            return shifted

        with _instrumented(targets, spec, shift):
            out = functional_call(model, dict(p), inputs)
        loss = loss_fn(out)
        acts = {k: a.detach().reshape(b, -1, a.shape[-1]) for k, (a, _) in record.items()}
        outs = {k: _rows(last[k](y.detach()), b) for k, (_, y) in record.items() if k in keep_output}
        return loss, (loss.detach(), acts, outs)

    last = {site: extractor.features_last for path, _, extractor in targets
            for site in ([path] if not extractor.composite else [s.name for s in spec.sites
                                                                  if s.name.startswith(f"{path}:")])}

    probes = {k: next(iter(params.values())).new_zeros(shape) for k, shape in _probe_shapes(model, spec, params, inputs).items()}
    (g_params, g_probes), (loss, acts, outs) = grad(run, argnums=(0, 1), has_aux=True)(dict(params), probes)
    scale = b if loss_reduction == "mean" else 1
    grads = {k: _rows(last[k](g * scale), b) for k, g in g_probes.items()}
    return loss, g_params, acts, grads, outs


def functional_features(model: nn.Module, spec: NetworkSpec, params: Mapping[str, torch.Tensor],
                        inputs: tuple[torch.Tensor, ...], loss_fn: Callable[[torch.Tensor], torch.Tensor],
                        loss_reduction: str = "mean") -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """``(loss, param_grads, features [b T, N, 2])``: :func:`functional_factors` with the factors made into neuron
    features (the incidence features of :meth:`GradientSet.neuron_tensor`): what a gradient metanetwork reads of
    a network under ``params``, as a pure function (``vmap`` over a zoo)."""
    loss, g_params, acts, grads, outs = functional_factors(model, spec, params, inputs, loss_fn, loss_reduction)
    return loss, g_params, neuron_tensor(spec, acts, grads, outs)


#: (model id, spec, input shapes) -> output shape per site; shapes only, no tensors
_SHAPES: dict[tuple, dict[str, torch.Size]] = {}


#: model -> spec -> the modules forming the spec's sites (PES calls the extractor at every inner step); weak, so
#: an entry goes with its model, and checked against the model's current submodules before use
_TARGETS: weakref.WeakKeyDictionary[nn.Module, dict[NetworkSpec, list]] = weakref.WeakKeyDictionary()


def _targets(model: nn.Module, spec: NetworkSpec) -> list:
    per_spec = _TARGETS.setdefault(model, {})
    found = per_spec.get(spec)
    if found is None or any(model.get_submodule(path) is not module for path, module, _ in found):
        found = per_spec[spec] = modules_of_sites(model, spec)
    return found


def _rows(t: torch.Tensor, b: int) -> torch.Tensor:
    """``[b, T, d]`` from ``[b, ..., d]``."""
    return t.reshape(b, -1, t.shape[-1])


@contextmanager
def _instrumented(targets: list, spec: NetworkSpec, report: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]):
    """Within the block every site of ``spec`` calls ``report(site, a, y)`` and continues with its result."""
    wanted = {s.name for s in spec.sites}
    handles = []
    for path, module, extractor in targets:
        if extractor.composite:
            def tap(role, a, y, path=path):
                site = f"{path}:{role}"
                return report(site, a, y) if site in wanted else y
            module.forward = functools.partial(extractor.forward, module, tap)
            handles.append(module)
        else:
            def hook(module, args, output, path=path, extractor=extractor):
                return report(path, extractor.activation(module, args, output), output)
            handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            if isinstance(h, nn.Module):
                del h.forward
            else:
                h.remove()


def _probe_shapes(model: nn.Module, spec: NetworkSpec, params: Mapping[str, torch.Tensor],
                  inputs: tuple[torch.Tensor, ...]) -> dict[str, torch.Size]:
    """The output shape of every site on inputs of these shapes (a site's output may carry token axes).

    Found by one forward without gradients the first time a model meets an input shape, then remembered.
    """
    key = (id(model), spec.to_json(), tuple((tuple(t.shape), t.dtype) for t in inputs))
    if key in _SHAPES:
        return _SHAPES[key]
    shapes: dict[str, torch.Size] = {}

    def remember(site_name: str, a: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        shapes[site_name] = output.shape
        return output

    with _instrumented(_targets(model, spec), spec, remember), torch.no_grad():
        functional_call(model, {k: v.detach() for k, v in params.items()}, inputs)
    if len(_SHAPES) > 256:
        _SHAPES.clear()
    _SHAPES[key] = shapes
    return shapes

