"""The core: group actions, specs (JSON, hand-written, data-flow), the transform, the harness on every group."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from gradmetanet import GradientCapture, NetworkSpec, UnsupportedModuleError
from gradmetanet.models.mlp import make_mlp
from gradmetanet.core import GL, Axis, Blocks, Parameter, Perm, ScalePerm, SignPerm, Site, Space, Trivial
from gradmetanet.core.groups import group_from_json
from gradmetanet.testing import check_symmetry
from gradmetanet import spec_of

GROUPS = [Trivial(), Perm(), SignPerm(), ScalePerm(), GL(), Blocks(3, Perm()), Blocks(3, GL())]


def dense(element, n: int) -> torch.Tensor:
    """``rho(g)`` as a matrix: its action on the identity's columns."""
    return element.act(torch.eye(n, dtype=torch.float64), 0)


@pytest.mark.parametrize("group", GROUPS, ids=repr)
def test_group_actions_agree_with_their_matrix(group):
    gen = torch.Generator().manual_seed(0)
    g = group.sample(6, gen)
    m = dense(g, 6)
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    torch.testing.assert_close(g.act(x, 1), torch.einsum("ij,bjc->bic", m, x))
    torch.testing.assert_close(g.act_inverse(x, 1), torch.einsum("ij,bjc->bic", torch.linalg.inv(m), x))
    torch.testing.assert_close(g.act_inverse_transpose(x, 1), torch.einsum("ij,bjc->bic", torch.linalg.inv(m).T, x))
    assert group_from_json(group.to_json()) == group
    if group.name in ("perm", "sign_perm", "scale_perm"):     # monomial: a permutation times a diagonal
        assert ((m != 0).sum(0) == 1).all() and ((m != 0).sum(1) == 1).all()
    if group.name == "scale_perm":
        assert (m >= 0).all()
    if group.name == "sign_perm":
        assert set(m[m != 0].abs().tolist()) == {1.0}


def residual_spec() -> NetworkSpec:
    """``h = relu(W0 x); h = h + W2 relu(W1 h); y = W3 h``: the stream s1 is read by W1, W3 and written by W0, W2."""
    spaces = (Space("x", 3), Space("s1", 6, Perm()), Space("s2", 5, ScalePerm()), Space("y", 2))
    sites = (Site("l0", "x", "s1", "l0.weight", "l0.bias"), Site("l1", "s1", "s2", "l1.weight", "l1.bias"),
             Site("l2", "s2", "s1", "l2.weight", "l2.bias"), Site("l3", "s1", "y", "l3.weight", "l3.bias"))
    return NetworkSpec(spaces, sites)


class Residual(nn.Module):
    """Layers registered out of order, activations applied functionally, a residual addition."""

    def __init__(self) -> None:
        super().__init__()
        self.l3, self.l1 = nn.Linear(6, 2), nn.Linear(6, 5)
        self.l0, self.l2 = nn.Linear(3, 6), nn.Linear(5, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.l0(x))
        h = h + self.l2(F.relu(self.l1(h)))
        return self.l3(h)


class Linear2(nn.Module):
    """Two linear maps without an activation between them: the hidden space is GL."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_from_module_follows_data_flow():
    spec = spec_of(Residual())
    assert [s.name for s in spec.sites] == ["l0", "l1", "l2", "l3"]          # run order, not registration order
    assert spec.site("l0").out_space == spec.site("l2").out_space == spec.site("l3").in_space   # tied stream
    # the stream is read by ReLU (after l0) and added to: positive scales survive; l1's output is ReLU-read
    assert [(s.size, s.group.name) for s in spec.spaces] == [(3, "trivial"), (6, "scale_perm"),
                                                             (5, "scale_perm"), (2, "trivial")]
    assert spec_of(Linear2()).space("s1").group.name == "gl"
    for act, group in [(nn.ReLU(), "scale_perm"), (nn.Tanh(), "sign_perm"), (nn.GELU(), "perm"),
                       (nn.Softmax(-1), "perm"), (nn.Sigmoid(), "perm")]:
        spec = spec_of(nn.Sequential(nn.Linear(3, 4), act, nn.Linear(4, 2)))
        assert spec.space("s1").group.name == group, act


class Cumsum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x).cumsum(-1))              # mixes hidden neurons in order: no symmetry


class ConstantBias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)
        self.register_buffer("shift", torch.arange(4.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x) + self.shift))    # a fixed per-neuron constant


@pytest.mark.parametrize("model", [Cumsum(), ConstantBias()], ids=lambda m: type(m).__name__)
def test_unknown_or_neuron_specific_operations_fix_the_space(model):
    spec = spec_of(model)
    assert spec.space("s1").group.name == "trivial"
    params = {k: v.detach().double() for k, v in model.state_dict().items()}
    x = torch.randn(5, 3, dtype=torch.float64)
    loose = NetworkSpec(tuple(Space(s.name, s.size, Perm() if s.name == "s1" else s.group) for s in spec.spaces),
                        spec.sites)
    moved = loose.transform_parameters(params, loose.sample(torch.Generator().manual_seed(0)))
    model = model.double()
    # the permutation the tracer refused really is no symmetry
    assert not torch.allclose(functional_call(model, moved, (x,)), functional_call(model, params, (x,)))


def test_functional_use_of_a_captured_weight_is_refused():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(torch.tanh(self.a(x)), self.a.weight.T)

    with pytest.raises(UnsupportedModuleError, match="used outside that module's forward"):
        spec_of(Tied())


def test_json_round_trip_keeps_groups_and_extra_parameters():
    spec = residual_spec()
    gain = Parameter("norm.weight", (Axis("diag", "s1"),))
    kernel = Parameter("conv.weight", (Axis("row", "s2"), Axis("col", "x"), Axis("fixed", size=3)))
    rich = NetworkSpec(spec.spaces + (Space("heads", 6, Blocks(2, GL())),), spec.sites, (gain, kernel))
    again = NetworkSpec.from_json(rich.to_json())
    assert again == rich
    assert again.param_shapes()["conv.weight"] == (5, 3, 3) and again.space("heads").group == Blocks(2, GL())
    with pytest.raises(ValueError, match="unknown space"):
        NetworkSpec(spec.spaces, spec.sites, (Parameter("p", (Axis("row", "nowhere"),)),))
    with pytest.raises(ValueError, match="two different axis labelings"):
        NetworkSpec(spec.spaces, spec.sites, (Parameter("l0.bias", (Axis("row", "s2"),)),))


def test_version_1_spec_json_still_reads():
    old = '{"spaces": [["s0", 3, false], ["s1", 4, true], ["s2", 2, false]], ' \
          '"sites": [["0", "s0", "s1", "0.weight", "0.bias"], ["2", "s1", "s2", "2.weight", null]]}'
    spec = NetworkSpec.from_json(old)
    assert [s.group.name for s in spec.spaces] == ["trivial", "perm", "trivial"] and spec.site("2").bias is None


def model_function(model: nn.Module, x: torch.Tensor):
    def run(params):
        with torch.no_grad():
            return functional_call(model, params, (x,))
    return run


def move_params(params, element, spec):
    return spec.transform_parameters(params, element)


@pytest.mark.parametrize("name", ["relu", "tanh", "sine", "residual", "gl"])
def test_specs_are_true_for_every_group_element(name):
    """The harness on hand-written and traced specs: every element leaves the function unchanged (float64),
    and every breaker the spec offers (fixed space, negative scale, untied stream, swapped spaces) changes it."""
    torch.manual_seed(0)
    if name == "residual":
        model, spec = Residual(), residual_spec()
        spec = NetworkSpec(tuple(Space(s.name, s.size, g) for s, g in
                                 zip(spec.spaces, [Trivial(), ScalePerm(), ScalePerm(), Trivial()])), spec.sites)
        breakers = ("fixed", "negative_scale", "untie")
    elif name == "gl":
        model = Linear2()
        spec = NetworkSpec(spaces=(Space("x", 4), Space("h", 5, GL()), Space("y", 3)),
                           sites=(Site("a", "x", "h", "a.weight", "a.bias"), Site("b", "h", "y", "b.weight", "b.bias")))
        breakers = ("fixed",)
    else:
        model = make_mlp([4, 7, 7, 3], name)
        spec = NetworkSpec.chain([4, 7, 7, 3], ["0", "2", "4"], activation=name)
        breakers = ("fixed", "negative_scale") if name == "relu" else ("fixed",)
    model = model.double()
    if name in ("relu", "tanh", "sine"):          # the traced spec of the chain is the hand-written one
        assert spec_of(model) == spec
    x = torch.randn(9, spec.spaces[0].size, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.state_dict().items()}
    check_symmetry(spec, model_function(model, x), params, move_params, lambda y, g, sp: y, trials=3,
                   sensitivity=breakers)


def test_traced_spec_of_a_residual_model_is_true():
    model = Residual().double()
    spec = spec_of(model)
    x = torch.randn(9, 3, dtype=torch.float64)
    check_symmetry(spec, model_function(model, x), {k: v.detach() for k, v in model.state_dict().items()},
                   move_params, lambda y, g, sp: y, trials=3, sensitivity=("fixed", "negative_scale", "untie"))


def test_capture_takes_a_hand_written_spec():
    model = Residual().double()
    spec = residual_spec()
    x = torch.randn(7, 3, dtype=torch.float64)
    with GradientCapture(model, spec=spec, loss_reduction="sum") as cap:
        model(x).sum().backward()
    gs = cap.gradients
    assert gs.spec is spec
    for name, p in model.named_parameters():
        torch.testing.assert_close(gs.mean_grad()[name], p.grad)
    feats = gs.neuron_features()["s1"]                 # the stream's activation: the mean of its two readers
    expected = (gs.activations["l1"][:, 0] + gs.activations["l3"][:, 0]) / 2
    torch.testing.assert_close(feats[..., 0], expected)
    with pytest.raises(ValueError, match="widths"):
        GradientCapture(model, spec=NetworkSpec.chain([3, 5, 5, 5, 2], ["l0", "l1", "l2", "l3"]))


@pytest.mark.parametrize("activation", [nn.Softmax(-1), nn.GELU(), nn.LeakyReLU(0.1), nn.Dropout(0.0)],
                         ids=lambda m: type(m).__name__)
def test_traced_groups_are_true_symmetries(activation):
    """Softmax over the neurons and GELU keep permutations, LeakyReLU positive scales: the harness proves each
    traced group true, and where the group is only Perm, a scale is shown not to be a symmetry."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), activation, nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    spec = spec_of(model)
    x = torch.randn(9, 3, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.state_dict().items()}
    # a space only dropout reads keeps every non-zero scale (we declare ScalePerm, a subgroup): a negative
    # scale is then a true symmetry, not a breaker
    homogeneous = spec.space("s1").group.name == "scale_perm" and not isinstance(activation, nn.Dropout)
    check_symmetry(spec, model_function(model, x), params, move_params, lambda y, g, sp: y, trials=3,
                   sensitivity=("fixed", "negative_scale") if homogeneous else ("fixed",))
    if spec.space("s1").group.name == "perm":
        scaled = NetworkSpec(tuple(Space(s.name, s.size, ScalePerm() if s.name == "s1" else s.group)
                                   for s in spec.spaces), spec.sites)
        g = {"s1": scaled.sample(torch.Generator().manual_seed(1))["s1"]}
        moved = scaled.transform_parameters(params, g)
        assert not torch.allclose(model_function(model, x)(moved), model_function(model, x)(params))
