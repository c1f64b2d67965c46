"""Convolutions captured as patch-linear sites: per-example gradients equal torch.func's, ghost norms equal
dense ones, hooks equal the functional extractor; what is not supported is refused by name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from gradmetanet import CaptureError, GradientCapture, NetworkSpec, UnsupportedModuleError
from gradmetanet.capture import functional_factors


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 2, dilation=2),
                         nn.Tanh(), nn.Flatten(), nn.Linear(3 * 2 * 2, 5)).double()


def test_cnn_per_example_gradients_equal_torch_func_and_norms_are_ghost_norms():
    model = cnn()
    x, y = torch.randn(6, 2, 8, 8, dtype=torch.float64), torch.randint(5, (6,))
    with GradientCapture(model, layers=["0", "2", "5"], loss_reduction="sum") as cap:
        F.cross_entropy(model(x), y, reduction="sum").backward()
    gs = cap.gradients
    assert gs.activations["0"].shape == (6, 16, 2 * 9) and gs.output_grads["0"].shape == (6, 16, 4)
    params = {k: v.detach() for k, v in model.named_parameters()}
    ref = vmap(grad(lambda p, xi, yi: F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])),
               in_dims=(None, 0, 0))(params, x, y)
    mine = gs.per_example_grads()
    for name, value in ref.items():
        torch.testing.assert_close(mine[name], value, atol=1e-10, rtol=0, msg=name)
    dense = torch.stack([v.flatten(1).square().sum(1) for v in ref.values()]).sum(0).sqrt()
    torch.testing.assert_close(gs.norms(), dense, atol=1e-10, rtol=0)
    for name, value in gs.mean_grad().items():
        torch.testing.assert_close(value, model.get_parameter(name).grad, atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="different numbers of tokens"):
        gs.neuron_tensor()                                       # 16, 4 and 1 positions: no common token axis
    spec = gs.spec
    loss, g_params, acts, grads, outs = functional_factors(
        model, spec, params, (x,), lambda out: F.cross_entropy(out, y, reduction="sum"), loss_reduction="sum")
    for site in spec.sites:
        torch.testing.assert_close(acts[site.name], gs.activations[site.name], atol=1e-12, rtol=0)
        torch.testing.assert_close(grads[site.name], gs.output_grads[site.name], atol=1e-12, rtol=0)
    assert NetworkSpec.from_json(spec.to_json()) == spec and spec.site("0").kernel == (3, 3)


def test_what_convolution_capture_refuses():
    with pytest.raises(UnsupportedModuleError, match="features off the last axis"):
        GradientCapture(cnn())                                   # the tracer cannot follow NCHW features yet
    for bad, why in ((nn.Conv2d(4, 4, 3, groups=2), "groups=2"),
                     (nn.Conv2d(2, 4, 3, padding="same"), "zero padding given as numbers"),
                     (nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"), "reflect")):
        with pytest.raises(CaptureError, match=why):
            GradientCapture(nn.Sequential(bad), layers=["0"])
