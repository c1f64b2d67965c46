"""Function-preserving changes of networks (features/transforms.py): the function stays, the refusals name why."""

import pytest
import torch
from torch import nn

from gradmetanet.models.mlp import make_mlp
from gradmetanet.features import random_symmetry, widen
from gradmetanet import spec_of


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _load(model: nn.Module, params: dict[str, torch.Tensor]) -> nn.Module:
    model.load_state_dict(params)
    return model


@pytest.mark.parametrize("activation", ["relu", "tanh", "sine"])
@pytest.mark.parametrize("how", ["zero", "split"])
def test_widening_an_mlp_keeps_its_function(activation, how):
    torch.manual_seed(0)
    model = make_mlp([3, 5, 4, 2], activation).double()
    x = torch.randn(16, 3, dtype=torch.float64)
    spec = spec_of(model, x[:2])
    hidden = spec.sites[0].out_space
    params, wider = widen(_params(model), spec, hidden, 3, how, torch.Generator().manual_seed(1))
    assert wider.space(hidden).size == 8 and params["0.weight"].shape == (8, 3) and params["2.weight"].shape == (4, 8)
    widened = _load(make_mlp([3, 8, 4, 2], activation).double(), params)
    torch.testing.assert_close(widened(x), model(x), atol=1e-12, rtol=0)
    assert not torch.equal(params["0.weight"][:5], params["0.weight"][5:8])     # new neurons are not all-zero copies


@pytest.mark.parametrize("how", ["zero", "split"])
def test_widening_a_cnn_channel_space_keeps_its_function(how):
    torch.manual_seed(0)

    def cnn(mid: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, mid, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(mid, 3)).double()
    model = cnn(5)
    x = torch.randn(4, 1, 9, 9, dtype=torch.float64)
    spec = spec_of(model, x[:2])
    space = spec.site("2").out_space
    params, wider = widen(_params(model), spec, space, 2, how, torch.Generator().manual_seed(2))
    assert dict(wider.param_shapes())["2.weight"] == (7, 4, 3, 3)
    torch.testing.assert_close(_load(cnn(7), params)(x), model(x), atol=1e-12, rtol=0)


def test_widening_a_zoo_of_networks_and_a_random_symmetry_keep_every_function():
    torch.manual_seed(0)
    models = [make_mlp([3, 6, 2], "relu").double() for _ in range(3)]
    x = torch.randn(8, 3, dtype=torch.float64)
    spec = spec_of(models[0], x[:2])
    zoo = {k: torch.stack([_params(m)[k] for m in models]) for k in _params(models[0])}
    moved = random_symmetry(zoo, spec, torch.Generator().manual_seed(3), leading=1)
    wide, _ = widen(moved, spec, spec.sites[0].out_space, 2, "split", torch.Generator().manual_seed(4), leading=1)
    for i, m in enumerate(models):
        net = _load(make_mlp([3, 8, 2], "relu").double(), {k: v[i] for k, v in wide.items()})
        torch.testing.assert_close(net(x), m(x), atol=1e-12, rtol=0)
    assert not torch.allclose(moved["0.weight"], zoo["0.weight"])              # the symmetry did move the weights


def test_changes_that_would_alter_the_function_are_refused():
    model = make_mlp([3, 5, 2], "relu")
    spec = spec_of(model, torch.randn(2, 3))
    with pytest.raises(ValueError, match="inputs or outputs"):
        widen(_params(model), spec, spec.sites[0].in_space, 1)
    with pytest.raises(ValueError, match="extra must be"):
        widen(_params(model), spec, spec.sites[0].out_space, 6, "split")
    normed = nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    spec = spec_of(normed, torch.randn(2, 3))
    with pytest.raises(ValueError, match="LayerNorm"):
        widen(_params(normed), spec, spec.sites[0].out_space, 1)
