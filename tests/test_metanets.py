"""GradMetaNet, GradMetaNet++ and baselines: exact symmetry, sensitivity, size transfer, learning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gradmetanet import GradientBatch, GradientCapture, NetworkSpec
from gradmetanet.models.mlp import make_mlp
from gradmetanet.metanets import BatchAsymmetric, GradMetaNet, GradMetaNetPlusPlus, MLPConcat, NeuronAsymmetric, WeightSpaceNet
from gradmetanet.testing import check_symmetry, distance
from gradmetanet.testing import move_gradient_batch as move_batch, move_outputs as move_output

SHAPES = [[3, 7, 2], [4, 7, 13, 3], [5, 13, 7, 7, 2], [2, 7, 5, 9, 7, 3]]


def random_batch(sizes, B=2, b=5, f=2, seed=0, params=False) -> GradientBatch:
    gen = torch.Generator().manual_seed(seed)
    spec = NetworkSpec.chain(sizes)
    feats = torch.randn(B, b, spec.n_neurons, f, generator=gen, dtype=torch.float64)
    p = None
    if params:
        p = {k: torch.randn(B, *s, generator=gen, dtype=torch.float64) for k, s in spec.param_shapes().items()}
    return GradientBatch(spec, feats, p)


def permute_examples(batch: GradientBatch, seed: int = 1) -> GradientBatch:
    perm = torch.randperm(batch.set_size, generator=torch.Generator().manual_seed(seed))
    perm = perm if not torch.equal(perm, torch.arange(batch.set_size)) else perm.roll(1)
    return batch.transform({}, perm)


def example_order_error(model, batch: GradientBatch) -> float:
    with torch.no_grad():
        return distance(model(permute_examples(batch)), model(batch))


#: name -> builder of the model for specs with ``fixed`` fixed (Trivial) neurons
EQUIVARIANT_MODELS = {
    "gradmetanet": lambda fixed: GradMetaNet(hidden=16, out_features=3),
    "gradmetanet_sum": lambda fixed: GradMetaNet(hidden=16, out_features=2, reduction="sum"),
    "gradmetanet_invariant": lambda fixed: GradMetaNet(hidden=16, head="invariant", out_features=4),
    "gradmetanet_neuron": lambda fixed: GradMetaNet(hidden=16, head="neuron", out_features=2),
    "gradmetanet_param": lambda fixed: GradMetaNet(hidden=16, head="parameter_product"),
    "gradmetanet_fixed_path": lambda fixed: GradMetaNet(hidden=16, out_features=2, fixed_neurons=fixed),
    "gradmetanet_set_head": lambda fixed: GradMetaNet(hidden=16, out_features=2, head="set_product", head_rank=5,
                                                      fixed_neurons=fixed, bias_product=True),
    "gradmetanet++": lambda fixed: GradMetaNetPlusPlus(hidden=16, heads=4, blocks=2, out_features=2, head_rank=3),
    "gradmetanet++_invariant": lambda fixed: GradMetaNetPlusPlus(hidden=16, heads=4, blocks=2, head="invariant"),
}


@pytest.mark.parametrize("sizes", SHAPES, ids=str)
@pytest.mark.parametrize("name", list(EQUIVARIANT_MODELS))
def test_equivariance_and_invariance(name, sizes):
    """Hidden permutations commute with the model, the example order does not matter; permuting a fixed
    space or exchanging two equal-size spaces changes the output (float64 noise is ~1e-15)."""
    torch.manual_seed(0)
    model = EQUIVARIANT_MODELS[name](sizes[0] + sizes[-1]).double()
    batch = random_batch(sizes, params=name.endswith("param"))
    breakers = ("fixed", "swap") if len(set(sizes[1:-1])) < len(sizes[1:-1]) else ("fixed",)
    with torch.no_grad():
        check_symmetry(batch.spec, model, batch, move_batch, move_output, group="perm", atol=1e-8,
                       sensitivity=breakers)
    assert example_order_error(model, batch) < 1e-8


def test_weight_space_net_is_equivariant():
    torch.manual_seed(0)
    sizes = [3, 7, 5, 2]
    for mode in ("concat", "average"):
        batch = random_batch(sizes, b=4)
        model = WeightSpaceNet(batch.spec, in_channels=4 if mode == "concat" else 1, hidden=8, mode=mode).double()
        with torch.no_grad():
            check_symmetry(batch.spec, model, batch, move_batch, move_output, group="perm", atol=1e-8,
                           sensitivity=("fixed",))
        if mode == "average":
            assert example_order_error(model, batch) < 1e-8
        else:       # channels are examples in order: not example-order invariant
            assert example_order_error(model, batch) > 1e-4


def _perm_error(model, batch: GradientBatch) -> float:
    g = batch.spec.permutation_part(batch.spec.sample(torch.Generator().manual_seed(1)))
    with torch.no_grad():
        return distance(model(move_batch(batch, g, batch.spec)), move_output(model(batch), g, batch.spec))


def test_asymmetric_baselines_fail_the_symmetry_they_lack():
    torch.manual_seed(0)
    sizes = [3, 7, 5, 2]
    batch = random_batch(sizes, b=4)
    neuron_asym = NeuronAsymmetric(batch.spec, hidden=16).double()
    assert example_order_error(neuron_asym, batch) < 1e-8 and _perm_error(neuron_asym, batch) > 1e-4
    batch_asym = BatchAsymmetric(set_size=4, hidden=16).double()
    assert _perm_error(batch_asym, batch) < 1e-8 and example_order_error(batch_asym, batch) > 1e-4
    concat = MLPConcat(batch.spec, set_size=4, hidden=16).double()
    assert _perm_error(concat, batch) > 1e-4 and example_order_error(concat, batch) > 1e-4


@pytest.mark.parametrize("model_name", ["gradmetanet", "gradmetanet_set_head", "gradmetanet++"])
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
    perms = gs.spec.permutation_part(gs.spec.sample(torch.Generator().manual_seed(3)))
    permuted = make_mlp(sizes, "tanh").double()
    permuted.load_state_dict(gs.spec.transform_parameters(base.state_dict(), perms))
    gs_perm = capture(permuted)
    metanet = EQUIVARIANT_MODELS[model_name](sizes[0] + sizes[-1]).double()
    with torch.no_grad():
        out, out_perm = metanet(gs), metanet(gs_perm)
    assert out["0.weight"].shape == (13, 4, out["0.weight"].shape[-1])          # single set: no batch axis
    expected = gs.spec.transform_parameters(out, perms)
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
    with pytest.raises(ValueError, match=r"built for specs with 4 fixed neurons; this spec has 5 \(build it with fixed_neurons=5"):
        GradMetaNet(fixed_neurons=4)(GradientBatch(spec, torch.zeros(1, 4, 10, 2)))
    with pytest.raises(ValueError, match="set_layers >= 1"):
        GradMetaNet(set_layers=0, head="set_product")
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
    from gradmetanet.metanets.layers import SetNeuronLayer
    torch.manual_seed(0)
    layer = SetNeuronLayer(5 + 3, 7, reduction).double()
    x, codes = torch.randn(2, 4, 6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    expected = layer(torch.cat([x, codes.expand(2, 4, -1, -1)], dim=-1))
    torch.testing.assert_close(layer(x, codes), expected, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="in_features"):
        layer(x, codes[:, :2])


def test_chain_outputs_identical_to_version_0_1():
    """Incidence features and the new spec leave GradMetaNet / GradMetaNet++ outputs on MLP chains as version 0.1
    computed them (reference file made with that version, fixed seeds): features bit for bit, outputs bit for
    bit at the same thread count and to float64 rounding (1e-12) at another (BLAS sums in another order)."""
    from safetensors.torch import load_file

    from chain_reference import REFERENCE, compute_outputs
    reference, now = load_file(str(REFERENCE)), compute_outputs()
    assert reference.keys() == now.keys()
    for key, value in reference.items():
        if key.endswith("/features"):
            assert torch.equal(now[key], value), key
        else:
            torch.testing.assert_close(now[key], value, atol=1e-12, rtol=1e-12, msg=key)


def test_gradmetanet_on_a_residual_network_respects_the_tied_stream():
    """Incidence features on a network whose stream is read and written by several layers: the metanetwork
    stays equivariant to a permutation of the whole stream, and rebuilding per-example gradients from pooled
    features is refused (the pooled neurons no longer hold each layer's own factors)."""
    from test_core import Residual

    torch.manual_seed(0)
    model = Residual().double()
    x = torch.randn(6, 3, dtype=torch.float64)
    with GradientCapture(model, loss_reduction="sum") as cap:
        model(x).square().sum().backward()
    gs = cap.gradients
    batch = GradientBatch.from_gradient_sets([gs])
    metanet = GradMetaNet(hidden=16, out_features=2).double()
    with torch.no_grad():
        check_symmetry(gs.spec, metanet, batch, move_batch, move_output, group="perm", atol=1e-8,
                       sensitivity=("fixed",))
    with pytest.raises(ValueError, match="pool the incidences"):
        batch.per_example_grads()


def test_outputs_and_gradients_identical_to_version_0_6_1():
    """The faster set layers, set product head and attention (version 0.8) compute what 0.6.1 computed: outputs
    and every parameter gradient, float64, every head and reduction, both attention kernels (tests/metanet_reference.py)."""
    from safetensors.torch import load_file

    from metanet_reference import REFERENCE, compute
    reference, now = load_file(str(REFERENCE)), compute()
    assert reference.keys() == now.keys()
    for key, value in reference.items():
        torch.testing.assert_close(now[key], value, atol=1e-12, rtol=1e-10, msg=key)
