"""The one weight editor (INR editing and zoo fine-tuning): ``theta + s * rms * delta``."""

from __future__ import annotations

import pytest
import torch

from gradmetanet import spec_of
from gradmetanet.models.mlp import make_mlp
from gradmetanet.metanets import GMN, GradMetaNet, ScaleGMN, WeightEditor


def zoo(n: int = 5):
    net = make_mlp([3, 6, 2], "tanh").double()
    spec = spec_of(net, torch.randn(2, 3, dtype=torch.float64))
    params = {k: v.detach() + 0.3 * torch.randn(n, *v.shape, dtype=torch.float64) for k, v in net.named_parameters()}
    rms = {k: v.square().mean().sqrt() for k, v in params.items()}
    return spec, params, rms


def test_zero_scales_leave_the_networks_and_the_edit_moves_with_the_group():
    torch.manual_seed(0)
    spec, params, rms = zoo()
    editor = WeightEditor(spec, ScaleGMN(spec, 1, 1, hidden=8, layers=2, bidirectional=True), rms, 0.0).double()
    edited = editor(params)
    assert all(torch.equal(edited[k], params[k]) for k in params)
    with torch.no_grad():
        editor.scales.fill_(0.5)
    element = spec.sample(torch.Generator().manual_seed(1))          # signs and permutations (tanh)
    moved_then_edited = editor(spec.transform_parameters(params, element, leading=1))
    edited_then_moved = spec.transform_parameters(editor(params), element, leading=1)
    for k in params:
        torch.testing.assert_close(moved_then_edited[k], edited_then_moved[k], atol=1e-10, rtol=1e-10)
    assert not torch.allclose(editor(params)["0.weight"], params["0.weight"])


def test_extra_channels_and_gradient_features_reach_the_backbone():
    torch.manual_seed(0)
    spec, params, rms = zoo()
    editor = WeightEditor(spec, GMN(spec, 1 + 2 + 3, 1, hidden=8, layers=2), rms, 1.0,
                          gradient_net=GradMetaNet(hidden=8, out_features=3)).double()
    extra = {k: torch.randn(*v.shape, 2, dtype=torch.float64) for k, v in params.items()}
    gradients = torch.randn(5, 4, spec.n_neurons, 2, dtype=torch.float64)
    out = editor(params, extra, gradients)
    assert not torch.allclose(out["0.weight"], editor(params, extra, 2 * gradients)["0.weight"])
    with pytest.raises(ValueError, match="reads decomposed gradients"):
        editor(params, extra)
