"""Convolutions captured as patch-linear sites: per-example gradients equal torch.func's, ghost norms equal
dense ones, hooks equal the functional extractor; what is not supported is refused by name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from gradmetanet import CaptureError, GradientCapture, NetworkSpec
from gradmetanet.capture import functional_factors
from gradmetanet import spec_of


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
    assert gs.neuron_tensor().shape[0] == gs.batch_size       # 16, 4 and 1 positions: one row per example
    spec = gs.spec
    loss, g_params, acts, grads, outs = functional_factors(
        model, spec, params, (x,), lambda out: F.cross_entropy(out, y, reduction="sum"), loss_reduction="sum")
    for site in spec.sites:
        torch.testing.assert_close(acts[site.name], gs.activations[site.name], atol=1e-12, rtol=0)
        torch.testing.assert_close(grads[site.name], gs.output_grads[site.name], atol=1e-12, rtol=0)
    assert NetworkSpec.from_json(spec.to_json()) == spec and spec.site("0").kernel == (3, 3)


def test_what_convolution_capture_refuses():
    for bad, why in ((nn.Conv2d(4, 4, 3, groups=2), "groups=2"),
                     (nn.Conv2d(2, 4, 3, padding="same"), "zero padding given as numbers"),
                     (nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"), "reflect")):
        with pytest.raises(CaptureError, match=why):
            GradientCapture(nn.Sequential(bad), layers=["0"])


def test_a_cnn_spec_is_traced_and_true():
    """Conv -> ReLU -> Conv -> tanh -> max pool -> Conv (residual) -> global mean -> Linear: hidden channels are
    ScalePerm behind ReLU, SignPerm behind tanh only where nothing else restricts them; a random element of the
    traced groups leaves the network's function unchanged; the whole model is captured exactly."""

    class CNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 5, 3, padding=1)
            self.c3, self.head = nn.Conv2d(5, 5, 3, padding=1), nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.relu(self.c1(x))
            h = F.max_pool2d(torch.tanh(self.c2(h)), 2)
            h = h + self.c3(h)
            return self.head(h.mean((2, 3)))

    torch.manual_seed(0)
    model = CNN().double()
    x = torch.randn(5, 2, 8, 8, dtype=torch.float64)
    spec = spec_of(model, x)
    groups = {s.name: spec.space(s.out_space).group.name for s in spec.sites}
    assert groups["c1"] == "scale_perm" and groups["head"] == "trivial"
    assert spec.site("c3").in_space == spec.site("c3").out_space == spec.site("head").in_space   # residual, tied
    assert groups["c2"] == "perm"                    # tanh keeps signs, max pooling positive scales: only perm
    assert not spec.space(spec.site("c1").in_space).permutable
    params = {k: v.detach() for k, v in model.named_parameters()}
    for seed in range(3):
        moved = spec.transform_parameters(params, spec.sample(torch.Generator().manual_seed(seed)))
        torch.testing.assert_close(functional_call(model, moved, (x,)), model(x), atol=1e-10, rtol=0)
    y = torch.randint(3, (5,))
    with GradientCapture(model, loss_reduction="sum") as cap:
        F.cross_entropy(model(x), y, reduction="sum").backward()
    ref = vmap(grad(lambda p, xi, yi: F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])),
               in_dims=(None, 0, 0))(params, x, y)
    for name, value in cap.gradients.per_example_grads().items():
        torch.testing.assert_close(value, ref[name], atol=1e-10, rtol=0, msg=name)
