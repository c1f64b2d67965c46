"""GradMetaNet, GradMetaNet++ and baselines: exact symmetry, sensitivity, size transfer, learning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gradmetanet import GradientBatch, GradientCapture, NetworkSpec
from gradmetanet.basenets import make_mlp
from gradmetanet.nn import (BatchAsymmetric, GradMetaNet, GradMetaNetPlusPlus, MLPConcat, NeuronAsymmetric,
                            WeightSpaceNet)

SHAPES = [[3, 7, 2], [4, 7, 13, 3], [5, 13, 7, 7, 2], [2, 7, 5, 9, 7, 3]]


def random_batch(sizes, B=2, b=5, f=2, seed=0, params=False) -> GradientBatch:
    gen = torch.Generator().manual_seed(seed)
    spec = NetworkSpec.chain(sizes)
    feats = torch.randn(B, b, spec.n_neurons, f, generator=gen, dtype=torch.float64)
    p = None
    if params:
        p = {k: torch.randn(B, *s, generator=gen, dtype=torch.float64) for k, s in spec.param_shapes().items()}
    return GradientBatch(spec, feats, p)


def symmetry_errors(model, batch: GradientBatch, seed: int = 1) -> tuple[float, float]:
    """(hidden-neuron equivariance error, example-order invariance error), relative to max(1, |output|)."""
    gen = torch.Generator().manual_seed(seed)
    spec = batch.spec
    perms = spec.random_permutations(gen)
    example_perm = torch.randperm(batch.set_size, generator=gen)
    if torch.equal(example_perm, torch.arange(batch.set_size)):     # a symmetry test needs a real permutation
        example_perm = example_perm.roll(1)
    with torch.no_grad():
        out = model(batch)
        out_neurons = model(batch.permute(perms))
        out_examples = model(batch.permute({}, example_perm))
    if isinstance(out, torch.Tensor):          # invariant head
        scale = max(1.0, out.abs().max().item())
        return (out_neurons - out).abs().max().item() / scale, (out_examples - out).abs().max().item() / scale
    if set(out) == {s.name for s in spec.spaces}:     # neuron head
        expected = {k: v.index_select(1, perms[k]) if k in perms else v for k, v in out.items()}
    else:
        expected = spec.permute_parameters(out, perms, leading=1)
    scale = max(1.0, max(v.abs().max().item() for v in out.values()))
    neuron_err = max((out_neurons[k] - expected[k]).abs().max().item() for k in out)
    example_err = max((out_examples[k] - out[k]).abs().max().item() for k in out)
    return neuron_err / scale, example_err / scale


def fixed_space_change(model, batch: GradientBatch, space: str) -> float:
    """How much the output moves when a *fixed* space is permuted (not a symmetry)."""
    n = batch.spec.space(space).size
    perm = torch.roll(torch.arange(n), 1)
    with torch.no_grad():
        out, moved = model(batch), model(batch.permute({space: perm}))
        moved = batch.spec.permute_parameters(moved, {space: torch.argsort(perm)}, leading=1) \
            if isinstance(out, dict) else moved
    if isinstance(out, torch.Tensor):
        return (out - moved).abs().max().item()
    return max((out[k] - moved[k]).abs().max().item() for k in out)


EQUIVARIANT_MODELS = {
    "gradmetanet": lambda: GradMetaNet(hidden=16, out_features=3),
    "gradmetanet_sum": lambda: GradMetaNet(hidden=16, out_features=2, reduction="sum"),
    "gradmetanet_invariant": lambda: GradMetaNet(hidden=16, head="invariant", out_features=4),
    "gradmetanet_neuron": lambda: GradMetaNet(hidden=16, head="neuron", out_features=2),
    "gradmetanet_param": lambda: GradMetaNet(hidden=16, head="parameter_product"),
    "gradmetanet++": lambda: GradMetaNetPlusPlus(hidden=16, heads=4, blocks=2, out_features=2, head_rank=3),
    "gradmetanet++_invariant": lambda: GradMetaNetPlusPlus(hidden=16, heads=4, blocks=2, head="invariant"),
}


@pytest.mark.parametrize("sizes", SHAPES, ids=str)
@pytest.mark.parametrize("name", list(EQUIVARIANT_MODELS))
def test_equivariance_and_invariance(name, sizes):
    torch.manual_seed(0)
    model = EQUIVARIANT_MODELS[name]().double()
    batch = random_batch(sizes, params=name.endswith("param"))
    neuron_err, example_err = symmetry_errors(model, batch)
    assert neuron_err < 1e-8 and example_err < 1e-8
    # sensitivity: inputs and outputs are not permutable, and the model notices (float64 noise is ~1e-15)
    assert fixed_space_change(model, batch, "s0") > 1e-6
    assert fixed_space_change(model, batch, f"s{len(sizes) - 1}") > 1e-6


def test_weight_space_net_is_equivariant():
    torch.manual_seed(0)
    sizes = [3, 7, 5, 2]
    for mode in ("concat", "average"):
        batch = random_batch(sizes, b=4)
        model = WeightSpaceNet(batch.spec, in_channels=4 if mode == "concat" else 1, hidden=8, mode=mode).double()
        neuron_err, example_err = symmetry_errors(model, batch)
        assert neuron_err < 1e-8
        assert fixed_space_change(model, batch, "s0") > 1e-6
        if mode == "average":
            assert example_err < 1e-8
        else:       # channels are examples in order: not example-order invariant
            assert example_err > 1e-4


def test_asymmetric_baselines_fail_the_symmetry_they_lack():
    torch.manual_seed(0)
    sizes = [3, 7, 5, 2]
    batch = random_batch(sizes, b=4)
    neuron_asym = NeuronAsymmetric(batch.spec, hidden=16).double()
    n_err, e_err = symmetry_errors(neuron_asym, batch)
    assert e_err < 1e-8 and n_err > 1e-4
    batch_asym = BatchAsymmetric(set_size=4, hidden=16).double()
    n_err, e_err = symmetry_errors(batch_asym, batch)
    assert n_err < 1e-8 and e_err > 1e-4
    concat = MLPConcat(batch.spec, set_size=4, hidden=16).double()
    n_err, e_err = symmetry_errors(concat, batch)
    assert n_err > 1e-4 and e_err > 1e-4


@pytest.mark.parametrize("model_name", ["gradmetanet", "gradmetanet++"])
def test_end_to_end_base_network_permutation(model_name):
    """Permute a base MLP's hidden neurons, capture again: the metanetwork output permutes alike."""
    torch.manual_seed(0)
    sizes = [4, 13, 7, 3]
    base = make_mlp(sizes, "tanh").double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(3, (6,))

    def capture(model):
        with GradientCapture(model) as cap:
            F.cross_entropy(model(x), y).backward()
        return cap.gradients

    gs = capture(base)
    perms = gs.spec.random_permutations(torch.Generator().manual_seed(3))
    permuted = make_mlp(sizes, "tanh").double()
    permuted.load_state_dict(gs.spec.permute_parameters(base.state_dict(), perms))
    gs_perm = capture(permuted)
    metanet = EQUIVARIANT_MODELS[model_name]().double()
    with torch.no_grad():
        out, out_perm = metanet(gs), metanet(gs_perm)
    assert out["0.weight"].shape == (13, 4, out["0.weight"].shape[-1])          # single set: no batch axis
    expected = gs.spec.permute_parameters(out, perms)
    for name in out:
        torch.testing.assert_close(out_perm[name], expected[name], atol=1e-8, rtol=0)


def test_one_model_runs_on_several_widths():
    torch.manual_seed(0)
    for model in (GradMetaNet(hidden=16), GradMetaNetPlusPlus(hidden=16, heads=4, blocks=1)):
        n_params = sum(p.numel() for p in model.parameters())
        for width in (16, 64):
            batch = random_batch([3, width, width, 2], b=4).to(torch.float32)
            out = model(batch)
            assert out["1.weight"].shape == (2, width, width, 1)
            assert out["2.bias"].shape == (2, 2, 1)
        assert sum(p.numel() for p in model.parameters()) == n_params


def test_input_validation():
    spec = NetworkSpec.chain([3, 5, 2])
    with pytest.raises(ValueError, match="neurons but the spec has"):
        GradientBatch(spec, torch.zeros(1, 4, 9, 2))
    with pytest.raises(ValueError, match=r"must be \[B, b, N, f\]"):
        GradientBatch(spec, torch.zeros(4, 10, 2))
    with pytest.raises(TypeError, match="expected a GradientBatch"):
        GradMetaNet()(torch.zeros(1, 4, 10, 2))
    with pytest.raises(ValueError, match="needs the base network's parameters"):
        GradMetaNet(head="parameter_product")(GradientBatch(spec, torch.zeros(1, 4, 10, 2)))
    with pytest.raises(ValueError, match="divisible"):
        GradMetaNetPlusPlus(hidden=10, heads=4)
    with pytest.raises(ValueError, match="built for another base network"):
        NeuronAsymmetric(spec)(GradientBatch(NetworkSpec.chain([3, 6, 2]), torch.zeros(1, 4, 11, 2)))


def _fisher_task(n_nets: int, seed: int, b: int = 16, sizes=(3, 8, 2)):
    """Gradient sets of random MLPs on random inputs, and their empirical Fisher diagonals."""
    torch.manual_seed(seed)
    sets, targets = [], []
    for _ in range(n_nets):
        model = make_mlp(list(sizes), "tanh")
        x = torch.randn(b, sizes[0]) * (0.5 + torch.rand(1) * 1.5)
        with GradientCapture(model, loss_reduction="sum") as cap:
            model(x).sum().backward()
        gs = cap.gradients
        sets.append(gs)
        targets.append(torch.cat([v.flatten() for v in gs.empirical_fisher_diag().values()]))
    return GradientBatch.from_gradient_sets(sets), torch.stack(targets)


def test_gradmetanet_learns_the_fisher_diagonal():
    """Fits diag(F) of held-out random MLPs with < 40% of a constant predictor's error, in seconds."""
    train, y_train = _fisher_task(256, seed=0)
    test, y_test = _fisher_task(64, seed=1)
    y_train, y_test = torch.log1p(y_train), torch.log1p(y_test)
    mu, sd = y_train.mean(), y_train.std()
    torch.manual_seed(0)
    model = GradMetaNet(hidden=32, set_layers=2, neuron_layers=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def predict(batch):
        return torch.cat([v.flatten(1) for v in model(batch).values()], 1)

    for step in range(250):
        idx = torch.randint(len(y_train), (32,))
        batch = GradientBatch(train.spec, train.features[idx])
        loss = F.mse_loss(predict(batch), (y_train[idx] - mu) / sd)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        model_mse = F.mse_loss(predict(test) * sd + mu, y_test).item()
    constant_mse = F.mse_loss(torch.full_like(y_test, y_train.mean().item()), y_test).item()
    print(f"GradMetaNet test MSE {model_mse:.4f} vs constant {constant_mse:.4f}")
    assert model_mse < 0.4 * constant_mse, (model_mse, constant_mse)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_set_layer_with_codes_equals_concatenated_codes(reduction):
    """The split first layer (codes [N, c] never expanded over the set) is the same function."""
    from gradmetanet.nn.layers import SetNeuronLayer
    torch.manual_seed(0)
    layer = SetNeuronLayer(5 + 3, 7, reduction).double()
    x, codes = torch.randn(2, 4, 6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    expected = layer(torch.cat([x, codes.expand(2, 4, -1, -1)], dim=-1))
    torch.testing.assert_close(layer(x, codes), expected, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="in_features"):
        layer(x, codes[:, :2])
