"""Weight-space features, depth-free weight-space layers and the normalisers, through the symmetry harness."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from gradmetanet import NetworkSpec
from gradmetanet.models.mlp import make_mlp
from gradmetanet.features import GradientScale, NeuronNormaliser, WeightSpaceNormaliser, space_rms
from gradmetanet.features import WeightSpaceFeatures, flatten_weights, unflatten_weights
from gradmetanet.metanets import WeightSpaceLayer
from gradmetanet.testing import check_symmetry, move_weight_space as move_ws
from gradmetanet import spec_of


def random_features(spec: NetworkSpec, B: int = 3, C: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(B, *s, C, generator=gen, dtype=torch.float64) for k, s in spec.param_shapes().items()}


@pytest.mark.parametrize("sizes", [[3, 7, 2], [4, 6, 6, 5, 6, 3]], ids=["depth2", "depth5"])
def test_one_weight_space_layer_runs_at_depth_2_and_5_and_is_equivariant(sizes):
    torch.manual_seed(0)
    layer = WeightSpaceLayer(4, 5).double()              # the same parameters at every depth
    n_params = sum(p.numel() for p in layer.parameters())
    spec = NetworkSpec.chain(sizes)
    x = WeightSpaceFeatures(spec, random_features(spec))
    out = layer(x.tensors, spec)
    assert {k: v.shape[1:-1] for k, v in out.items()} == dict(spec.param_shapes())
    breakers = ("fixed", "swap") if len(set(sizes[1:-1])) < len(sizes[1:-1]) else ("fixed",)

    def move_in(f: WeightSpaceFeatures, element, sp):       # features carry the spec a breaker relabels
        return WeightSpaceFeatures(sp, sp.transform_parameters(f.tensors, element, leading=1))

    with torch.no_grad():
        check_symmetry(spec, lambda f: layer(f.tensors, f.spec), x, move_in, move_ws, group="perm",
                       sensitivity=breakers)
    assert sum(p.numel() for p in layer.parameters()) == n_params


def test_weight_space_features_convert_and_move():
    spec = spec_of(make_mlp([3, 5, 2]))
    nets = [make_mlp([3, 5, 2]) for _ in range(4)]
    dicts = [dict(reversed(list(n.state_dict().items()))) for n in nets]       # any key order
    feats = WeightSpaceFeatures.from_state_dicts(spec, dicts)
    assert feats.batch_size == 4 and feats.channels == 1
    for net, sd in zip(nets, feats.state_dicts()):
        for k, v in net.state_dict().items():
            assert torch.equal(sd[k], v)
    flat = feats.flatten()
    assert flat.shape == (4, spec.n_params)
    assert torch.equal(WeightSpaceFeatures.unflatten(spec, flat).flatten(), flat)
    assert torch.equal(flatten_weights(unflatten_weights(flat, spec), spec), flat)
    w, b = feats.to_nfn()
    assert w[0].shape == (4, 1, 5, 3) and b[1].shape == (4, 1, 2)
    assert torch.equal(WeightSpaceFeatures.from_nfn(spec, w, b).flatten(), flat)
    w, b = feats.to_dws()
    assert w[0].shape == (4, 3, 5, 1) and b[0].shape == (4, 5, 1)
    assert torch.equal(WeightSpaceFeatures.from_dws(spec, w, b).flatten(), flat)
    assert torch.equal((feats + feats * 2).flatten(), 3 * flat)
    g = spec.sample(torch.Generator().manual_seed(0))
    moved = feats.apply(g).state_dicts()[0]
    model = make_mlp([3, 5, 2])
    model.load_state_dict(moved)
    x = torch.randn(6, 3)
    torch.testing.assert_close(model(x), nets[0](x), atol=1e-5, rtol=1e-5)    # a true symmetry (ReLU: scales)
    with pytest.raises(KeyError, match="no parameter '2.bias'"):
        WeightSpaceFeatures.from_state_dicts(spec, [{k: v for k, v in dicts[0].items() if k != "2.bias"}])


def test_normalisers_respect_the_groups():
    """Statistics shared within permutable spaces: normalising commutes with hidden permutations. Per-neuron
    statistics (what the fisher-trace experiment used) do not, and the harness sees it."""
    spec = NetworkSpec.chain([3, 6, 5, 2])
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(20, 8, spec.n_neurons, 2, generator=gen, dtype=torch.float64) * \
        torch.rand(spec.n_neurons, 2, generator=gen, dtype=torch.float64) * 5
    norm = NeuronNormaliser(spec, per_fixed_neuron=True).double().fit(feats)

    def move(x, element, sp):
        return sp.transform_neurons(x, element, dim=-2)

    check_symmetry(spec, norm, feats, move, move, group="perm", sensitivity=("fixed",))
    per_neuron = NeuronNormaliser(spec).double()
    per_neuron.mean.copy_(feats.mean((0, 1)))
    per_neuron.std.copy_(feats.std((0, 1)))
    with pytest.raises(AssertionError, match="not equivariant"):
        check_symmetry(spec, per_neuron, feats, move, move, group="perm")
    torch.testing.assert_close(norm.inverse(norm(feats)), feats)
    ws = random_features(spec)
    ws_norm = WeightSpaceNormaliser(spec).double().fit(ws)
    check_symmetry(spec, ws_norm, ws, move_ws, move_ws)
    assert abs(ws_norm(ws)["0.weight"].std().item() - 1) < 1e-9


def test_dividing_by_each_networks_space_rms_moves_with_permutations_and_signs():
    """The per-network scale of INR editing and of GradMetaNet's scaled variant: one statistic per network, space
    and channel, so the scaled features move as the raw ones under permutations and sign flips; a scale that is
    one number per neuron (what a per-neuron statistic would be) is not."""
    spec = NetworkSpec.chain([3, 6, 5, 2], activation="tanh")
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(4, 8, spec.n_neurons, 2, generator=gen, dtype=torch.float64) * torch.rand(
        4, 1, spec.n_neurons, 2, generator=gen, dtype=torch.float64) * 5

    def move(x, element, sp):
        return sp.transform_neurons(x, element, dim=-2)

    def scaled(x):
        return x / space_rms(x, spec)

    check_symmetry(spec, scaled, feats, move, move, group="full")
    hidden = spec.space_slices()[spec.spaces[1].name]
    assert scaled(feats)[:, :, hidden].square().mean((1, 2)).allclose(torch.ones(4, 2, dtype=torch.float64))
    per_neuron = feats.square().mean((0, 1)).sqrt()                     # [N, 2], fitted once on these networks
    with pytest.raises(AssertionError, match="not equivariant"):
        check_symmetry(spec, lambda x: x / per_neuron, feats, move, move, group="perm")


@pytest.mark.parametrize("activation", ["tanh", "relu", None], ids=["sign_perm", "scale_perm", "gl"])
def test_normalisers_move_with_sign_scale_and_gl_groups(activation):
    """Fitted on features with a large mean, both normalisers commute with sign flips, positive scales and GL
    (0.6.1 subtracted a per-tensor mean: ScaleGMN's invariant output moved 5e-4 against 1e-17); the neuron
    normaliser keeps its per-neuron statistics on the fixed spaces, which the ``fixed`` breaker detects."""
    spec = NetworkSpec.chain([3, 6, 5, 2], activation=activation)
    ws = {k: v + 3.0 for k, v in random_features(spec).items()}
    ws_norm = WeightSpaceNormaliser(spec).double().fit(ws)
    check_symmetry(spec, ws_norm, ws, move_ws, move_ws)
    assert ws_norm.mean[:-1].abs().max() == 0 and ws_norm.mean[-1] != 0   # only the output bias is centred
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(20, 8, spec.n_neurons, 2, generator=gen, dtype=torch.float64) + 2.0

    def move(x, element, sp):
        return sp.transform_neurons(x, element, dim=-2, roles=("act", "grad"))

    norm = NeuronNormaliser(spec, per_fixed_neuron=True).double().fit(feats)
    check_symmetry(spec, norm, feats, move, move, sensitivity=("fixed",))
    if activation is not None:
        with pytest.raises(ValueError, match="cannot respect") if activation == "relu" else nullcontext():
            GradientScale(spec)


def test_unf_rule_and_its_file_run_at_any_depth(tmp_path):
    """The UNF update rule shares its weight-space weights by parameter kind: one rule file steps MLPs of
    depth 2 and 4 (version 0.1 built one set of weights per layer position)."""
    import torch.nn.functional as F

    from gradmetanet.lopt import NetworkOptimizer, load_rule, save_rule, unf_rule

    torch.manual_seed(0)
    rule = unf_rule(beta=0.1)
    save_rule(rule, "unf", tmp_path / "unf.safetensors")
    for sizes in ([5, 8, 3], [5, 8, 6, 7, 3]):
        model = make_mlp(sizes, "tanh")
        opt = NetworkOptimizer(model, load_rule(tmp_path / "unf.safetensors"))
        x, y = torch.randn(16, 5), torch.randint(3, (16,))
        before = F.cross_entropy(model(x), y).item()
        for _ in range(20):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        assert F.cross_entropy(model(x), y).item() < before


def test_no_cached_tensors_survive_inference_mode():
    """Constants are built per call: evaluating under inference_mode, then training, works."""
    from gradmetanet import GradientBatch
    from gradmetanet.metanets import GradMetaNet

    spec = NetworkSpec.chain([3, 5, 2])
    batch = GradientBatch(spec, torch.randn(2, 4, spec.n_neurons, 2))
    model = GradMetaNet(hidden=8)
    with torch.inference_mode():
        model(batch)
    loss = sum(v.square().sum() for v in model(batch).values())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_gradient_batch_rebuilds_per_example_gradients_of_token_sequences():
    import torch.nn.functional as F

    from gradmetanet import GradientBatch, GradientCapture

    torch.manual_seed(0)
    model = make_mlp([4, 6, 3]).double()
    x = torch.randn(5, 7, 4, dtype=torch.float64)                 # 5 examples of 7 tokens
    with GradientCapture(model) as cap:
        F.mse_loss(model(x), torch.zeros(5, 7, 3, dtype=torch.float64)).backward()
    gs = cap.gradients
    batch = GradientBatch.from_gradient_sets([gs, gs])
    assert batch.tokens == 7 and batch.features.shape[1] == 35
    for name, value in gs.per_example_grads().items():
        torch.testing.assert_close(batch.per_example_grads()[name][1], value)
    with pytest.raises(ValueError, match="empty"):
        GradientBatch(batch.spec, batch.features[:, :0])


def test_gradient_scale_is_equivariant_homogeneous_and_per_space():
    """Dividing out each network's per-space gradient scale commutes with permutations and sign flips,
    removes any rescaling of g, scales the output back with degree 2, and keeps the spaces apart."""
    from gradmetanet.models import siren_spec
    from gradmetanet.features import GradientScale

    spec = siren_spec((1, 6, 5, 1))                                # SignPerm hidden spaces
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(4, 7, spec.n_neurons, 2, generator=gen, dtype=torch.float64)
    feats[..., 1] *= torch.logspace(-3, 3, 4, dtype=torch.float64)[:, None, None]
    scale = GradientScale(spec)

    def move(x, element, sp):
        return sp.transform_neurons(x, element, dim=-2)

    def move_out(out, element, sp):                                 # scales are squares: signs leave them alone
        normalised, scales = out
        permuted = sp.transform_neurons(scales.unsqueeze(-1), sp.permutation_part(element), dim=-2).squeeze(-1)
        return move(normalised, element, sp), permuted

    check_symmetry(spec, scale, feats, move, move_out)
    normalised, scales = scale(feats)
    boosted = feats.clone()
    boosted[..., 1] *= 10.0
    again, boosted_scales = scale(boosted)
    torch.testing.assert_close(again, normalised)
    torch.testing.assert_close(scale.output_scale(boosted_scales), 100 * scale.output_scale(scales))
    assert scale.output_scale(scales).shape == (4, spec.n_params)
    one_space = feats.clone()
    one_space[:, :, spec.space_slices()[spec.spaces[1].name], 1] *= 10.0
    moved_scales = scale.scales(one_space) / scales
    assert sorted(set(moved_scales[0].round(decimals=6).tolist())) == [1.0, 100.0]
