"""Transformers as data: per-example gradients of attention, LayerNorm and embeddings equal torch.func's,
the traced spec is true (a random group element leaves the function unchanged), and capture moves with it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from gradmetanet import GradientCapture, NetworkSpec
from gradmetanet.core.groups import Blocks
from gradmetanet.models import CausalTransformer
from gradmetanet import spec_of

pytestmark = [pytest.mark.filterwarnings("ignore:enable_nested_tensor is True"),
              pytest.mark.filterwarnings("ignore:There is a performance drop"),
              pytest.mark.filterwarnings("ignore:Support for mismatched")]


def per_example_reference(model: nn.Module, inputs: tuple, losses) -> dict[str, torch.Tensor]:
    """``d loss_i / d theta`` for every example ``i`` of one batched forward (``jacrev``: one forward, so dropout
    masks are drawn once, as in the captured step)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    return jacrev(lambda p: losses(functional_call(model, p, inputs)))(params)


def per_example_by_loop(model: nn.Module, inputs: tuple, losses) -> dict[str, torch.Tensor]:
    """The same by one eager forward and one ``autograd.grad`` per example (for dropout: functorch transforms may
    draw random numbers differently from the eager kernels)."""
    names, params = zip(*model.named_parameters())
    vector = losses(model(*inputs))
    rows = [torch.autograd.grad(vector[i], params, retain_graph=True, allow_unused=True) for i in range(len(vector))]
    return {n: torch.stack([torch.zeros_like(p) if r[j] is None else r[j] for r in rows])
            for j, (n, p) in enumerate(zip(names, params))}


def captured(model: nn.Module, inputs: tuple, losses, **kwargs):
    with GradientCapture(model, loss_reduction="sum", **kwargs) as cap:
        losses(model(*inputs)).sum().backward()
    return cap.gradients


def lm_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[b]``: each sequence's summed next-token cross-entropy."""
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").sum(1)


def assert_matches(gs, ref: dict[str, torch.Tensor]) -> None:
    mine = gs.per_example_grads()
    assert set(mine) == set(ref), (set(mine) ^ set(ref))
    for name, value in ref.items():
        torch.testing.assert_close(mine[name], value, atol=1e-10, rtol=0, msg=name)


@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("attention", ["torch", "linear"])
def test_causal_lm_per_example_gradients_equal_torch_func(norm, tie, attention):
    torch.manual_seed(0)
    model = CausalTransformer(vocab=11, d=8, heads=2, blocks=2, max_len=6, norm=norm, tie=tie,
                              attention=attention).double()
    for T in (1, 4, 6):
        ids = torch.randint(0, 11, (5, T))
        targets = torch.randint(0, 11, (5, T))
        gs = captured(model, (ids,), lambda out: lm_losses(out, targets))
        assert_matches(gs, per_example_reference(model, (ids,), lambda out: lm_losses(out, targets)))


def test_dropout_with_a_fixed_seed_gives_the_gradients_of_that_step():
    torch.manual_seed(0)
    model = CausalTransformer(vocab=7, d=8, heads=2, blocks=1, max_len=5, dropout=0.3, attention="torch").double()
    ids, targets = torch.randint(0, 7, (4, 5)), torch.randint(0, 7, (4, 5))
    torch.manual_seed(1)
    gs = captured(model, (ids,), lambda out: lm_losses(out, targets))
    torch.manual_seed(1)
    ref = per_example_by_loop(model, (ids,), lambda out: lm_losses(out, targets))
    assert_matches(gs, ref)
    assert ref["blocks.0.ffn_in.weight"].abs().sum() > 0


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [True, False])
def test_torch_encoder_layer_with_masks(batch_first, norm_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=batch_first,
                                       norm_first=norm_first).double()
    b, T = 4, 5
    x = torch.randn(b, T, 8, dtype=torch.float64)
    x_in = x if batch_first else x.transpose(0, 1)
    padding = torch.zeros(b, T, dtype=torch.bool)
    padding[1, 3:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(T, dtype=torch.float64)
    def losses(out: torch.Tensor) -> torch.Tensor:
        return out.square().sum((1, 2) if batch_first else (0, 2))

    for kwargs in ({}, {"src_key_padding_mask": padding}, {"src_mask": causal, "is_causal": True},
                   {"src_mask": causal, "src_key_padding_mask": padding}):
        model = _Wrapped(layer, kwargs)
        gs = captured(model, (x_in,), losses)
        assert gs.batch_size == b
        assert_matches(gs, per_example_reference(model, (x_in,), losses))


class _Wrapped(nn.Module):
    """A module calling ``layer`` with fixed keyword arguments (masks), so that hooks see one input."""

    def __init__(self, layer: nn.Module, kwargs: dict) -> None:
        super().__init__()
        self.layer, self.kwargs = layer, kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x, **self.kwargs)


def test_decoder_layer_with_memory_and_attention_weights():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=True).double()
    tgt, memory = torch.randn(3, 4, 8, dtype=torch.float64), torch.randn(3, 6, 8, dtype=torch.float64)
    losses = lambda out: out.square().sum((1, 2))  # noqa: E731
    gs = captured(layer, (tgt, memory), losses)
    assert {"self_attn:q", "multihead_attn:k", "multihead_attn:o", "norm3"} <= {s.name for s in gs.spec.sites}
    assert_matches(gs, per_example_reference(layer, (tgt, memory), losses))

    attn = nn.MultiheadAttention(8, 2, dropout=0.2, batch_first=True).double()
    model = _AttentionWithWeights(attn)
    torch.manual_seed(3)
    gs = captured(model, (tgt,), losses)
    torch.manual_seed(3)
    assert_matches(gs, per_example_by_loop(model, (tgt,), losses))


class _AttentionWithWeights(nn.Module):
    def __init__(self, attn: nn.MultiheadAttention) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, weights = self.attn(x, x, x)                      # need_weights=True: the explicit softmax path
        return out + weights.sum(-1, keepdim=True)


def test_captured_attention_outputs_equal_the_module_and_the_state_dict_is_untouched():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=True).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    keys = list(layer.state_dict())
    want = layer(x)
    with GradientCapture(layer) as cap:
        got = layer(x)
        got.sum().backward()
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert list(layer.state_dict()) == keys and "forward" not in vars(layer.self_attn)
    assert cap.gradients.activations["self_attn:q"].shape == (3, 5, 8)


def test_embedding_padding_rows_get_no_gradient_and_norms_match_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 4, padding_idx=0), nn.Linear(4, 3)).double()
    ids = torch.tensor([[0, 2, 2, 5], [1, 0, 0, 3], [4, 4, 4, 4]])
    losses = lambda out: out.square().sum((1, 2))  # noqa: E731
    gs = captured(model, (ids,), losses)
    ref = per_example_reference(model, (ids,), losses)
    assert_matches(gs, ref)
    dense = torch.stack([v.flatten(1).square().sum(1) for v in ref.values()]).sum(0).sqrt()
    torch.testing.assert_close(gs.norms(), dense, atol=1e-10, rtol=0)
    per = gs.norms(per_parameter=True)
    torch.testing.assert_close(per["0.weight"], ref["0.weight"].flatten(1).norm(dim=1), atol=1e-10, rtol=0)


def test_transformer_norms_and_fisher_match_dense_per_example_gradients():
    torch.manual_seed(0)
    for tie in (False, True):
        model = CausalTransformer(vocab=9, d=8, heads=2, blocks=1, max_len=5, tie=tie).double()
        ids, targets = torch.randint(0, 9, (4, 5)), torch.randint(0, 9, (4, 5))
        gs = captured(model, (ids,), lambda out: lm_losses(out, targets))
        dense = gs.per_example_grads()
        norms = gs.norms(per_parameter=True)
        for name, value in dense.items():
            torch.testing.assert_close(norms[name], value.flatten(1).norm(dim=1), atol=1e-10, rtol=0, msg=name)
            torch.testing.assert_close(gs.empirical_fisher_diag()[name], value.square().mean(0), atol=1e-10, rtol=0)


def test_the_traced_transformer_spec_is_true():
    """Residual stream tied across blocks (Perm, through LayerNorm), per-head Q/K and V/O spaces, FFN hidden
    spaces; vocabulary and positions fixed; a random element leaves the model's function unchanged."""
    torch.manual_seed(0)
    for norm, tie in (("pre", False), ("post", True)):
        model = CausalTransformer(vocab=7, d=8, heads=2, blocks=2, max_len=5, norm=norm, tie=tie).double()
        spec = spec_of(model)
        residual = spec.site("embed").out_space
        assert spec.site("blocks.1.ffn_out").out_space == residual == spec.site("unembed").in_space
        assert spec.site("blocks.0.ln2").in_space == residual
        assert spec.space(residual).group.name == "perm"
        qk = spec.site("blocks.0.attn:q").out_space
        assert spec.site("blocks.0.attn:k").out_space == qk != spec.site("blocks.1.attn:q").out_space
        assert isinstance(spec.space(qk).group, Blocks) and spec.space(qk).group.heads == 2
        assert spec.space(spec.site("blocks.0.ffn_in").out_space).group.name == "perm"
        assert not spec.space(spec.site("embed").in_space).permutable
        assert not spec.space(spec.site("unembed").out_space).permutable
        ids = torch.randint(0, 7, (3, 5))
        params = {k: v.detach() for k, v in model.named_parameters()}
        moved = spec.transform_parameters(params, spec.sample(torch.Generator().manual_seed(1)))
        assert any(not torch.equal(moved[k], params[k]) for k in params)
        torch.testing.assert_close(functional_call(model, moved, (ids,)), model(ids), atol=1e-10, rtol=0)
        assert NetworkSpec.from_json(spec.to_json()) == spec


def test_capture_moves_with_the_group_element():
    """Capturing the transformed transformer gives the transformed gradient set (activations, gradients)."""
    torch.manual_seed(0)
    model = CausalTransformer(vocab=7, d=8, heads=2, blocks=1, max_len=5).double()
    ids, targets = torch.randint(0, 7, (3, 5)), torch.randint(0, 7, (3, 5))
    gs = captured(model, (ids,), lambda out: lm_losses(out, targets))
    element = gs.spec.sample(torch.Generator().manual_seed(2))
    moved = gs.spec.transform_parameters({k: v.detach() for k, v in model.named_parameters()}, element)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(moved[name])
    again = captured(model, (ids,), lambda out: lm_losses(out, targets))
    expected = gs.transform(element)
    for site in gs.spec.sites:
        torch.testing.assert_close(again.activations[site.name], expected.activations[site.name], atol=1e-10, rtol=0)
        torch.testing.assert_close(again.output_grads[site.name], expected.output_grads[site.name], atol=1e-10, rtol=0)


def _lm_gradient_fn(model: CausalTransformer, ids: torch.Tensor, targets: torch.Tensor, metanet: nn.Module):
    """base parameters -> the metanetwork's per-parameter output on the gradient set captured under them."""
    def fn(params: dict[str, torch.Tensor]):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(params[name])
        gs = captured(model, (ids,), lambda out: lm_losses(out, targets))
        return metanet(gs)
    return fn


@pytest.mark.parametrize("kind", ["gradmetanet", "set_product", "gradmetanet++"])
def test_metanetworks_on_transformer_gradients_are_equivariant_end_to_end(kind):
    """Permute a base transformer function-preservingly (residual stream, per-head Q/K and V/O, FFN hidden),
    capture again: the per-parameter outputs (LayerNorm, embeddings, packed in_proj included) move alike;
    permuting the vocabulary or the positions, or untying the residual stream, changes them."""
    from gradmetanet.metanets import GradMetaNet, GradMetaNetPlusPlus
    from gradmetanet.testing import check_symmetry

    torch.manual_seed(0)
    model = CausalTransformer(vocab=5, d=8, heads=2, blocks=1, max_len=4, ffn_mult=2).double()
    ids, targets = torch.randint(0, 5, (3, 4)), torch.randint(0, 5, (3, 4))
    metanet = {"gradmetanet": lambda: GradMetaNet(hidden=16, set_layers=1, neuron_layers=1),
               "set_product": lambda: GradMetaNet(hidden=16, set_layers=1, neuron_layers=1, head="set_product"),
               "gradmetanet++": lambda: GradMetaNetPlusPlus(hidden=16, blocks=1, heads=2)}[kind]().double()
    spec = spec_of(model)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    fn = _lm_gradient_fn(model, ids, targets, metanet)
    out = fn(params)
    assert set(out) == set(params)
    assert all(out[k].shape == (*v.shape, 1) for k, v in params.items())

    def move(x, g, s):
        return s.transform_parameters(x, g)

    check_symmetry(spec, fn, params, move, move, group="perm", trials=1, sensitivity=("fixed", "untie"))
    # the harness's "fixed" breaker permutes the vocabulary; permuting the positions changes the output too
    from gradmetanet.core import Monomial
    positions = spec.site("position").in_space
    g = {positions: Monomial(torch.arange(spec.space(positions).size).roll(1))}
    moved_out, expected = fn(move(params, g, spec)), move(out, g, spec)
    assert max((moved_out[k] - expected[k]).abs().max().item() for k in out) > 1e-6


def test_hooks_equal_the_functional_extractor_on_a_transformer():
    """One registry, two capture paths: the functional extractor (for vmap) gives the hooks' factors."""
    from gradmetanet.capture import functional_factors

    torch.manual_seed(0)
    model = CausalTransformer(vocab=6, d=8, heads=2, blocks=1, max_len=4, tie=True).double()
    ids, targets = torch.randint(0, 6, (3, 4)), torch.randint(0, 6, (3, 4))
    gs = captured(model, (ids,), lambda out: lm_losses(out, targets))
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss, grads, acts, out_grads, outs = functional_factors(
        model, gs.spec, params, (ids,), lambda out: lm_losses(out, targets).sum(), loss_reduction="sum")
    for site in gs.spec.sites:
        torch.testing.assert_close(acts[site.name], gs.activations[site.name], atol=1e-12, rtol=0)
        torch.testing.assert_close(out_grads[site.name], gs.output_grads[site.name], atol=1e-12, rtol=0)
    for name, value in gs.mean_grad().items():
        torch.testing.assert_close(grads[name], value, atol=1e-10, rtol=0)           # a summed loss
    assert "forward" not in vars(model.blocks[0].attn)


def test_weight_space_layer_on_transformer_weights_is_equivariant():
    """The UNF rule's layer runs on every transformer parameter kind (tables, gains, packed Q/K/V) and moves
    with the spec's permutations; permuting the vocabulary changes its output."""
    from gradmetanet.metanets import TRANSFORMER_SIGNATURES, WeightSpaceLayer
    from gradmetanet.testing import check_symmetry

    torch.manual_seed(0)
    model = CausalTransformer(vocab=5, d=8, heads=2, blocks=2, max_len=4, ffn_mult=2, tie=True).double()
    spec = spec_of(model)
    layer = WeightSpaceLayer(3, 2, signatures=TRANSFORMER_SIGNATURES).double()
    x = {k: torch.randn(2, *v.shape, 3, dtype=torch.float64) for k, v in model.named_parameters()}
    out = layer(x, spec)
    assert {k: v.shape[:-1] for k, v in out.items()} == {k: v.shape[:-1] for k, v in x.items()}

    def move(t, g, s):
        return s.transform_parameters(t, g, leading=1)

    check_symmetry(spec, lambda t: layer(t, spec), x, move, move, group="perm", sensitivity=("fixed",))
    with pytest.raises(ValueError, match=r"'embed.weight' has axes \('col', 'row'\); this layer handles"):
        WeightSpaceLayer(3, 2)(x, spec)


def test_a_transformer_gradient_set_saves_and_loads(tmp_path):
    """Self-attention's Q, K and V read one tensor; safetensors keeps no aliases, so each is written on its own
    (this used to raise); token ids keep their dtype through to(float64)."""
    from gradmetanet import GradientSet

    torch.manual_seed(0)
    model = CausalTransformer(vocab=9, d=8, heads=2, blocks=1, max_len=5, tie=True).double()
    ids = torch.randint(0, 9, (3, 5))
    gs = captured(model, (ids,), lambda out: lm_losses(out, ids))
    gs.save(tmp_path / "gs.safetensors")
    back = GradientSet.load(tmp_path / "gs.safetensors")
    assert back.spec == gs.spec and back.activations["embed"].dtype == torch.int64
    for site in gs.spec.sites:                       # the factors exactly (views computed from them may sum in
        assert torch.equal(back.activations[site.name], gs.activations[site.name])    # another memory order)
        assert torch.equal(back.output_grads[site.name], gs.output_grads[site.name])
    for name, value in gs.per_example_grads().items():
        torch.testing.assert_close(back.per_example_grads()[name], value, atol=1e-14, rtol=0, msg=name)
    assert gs.to(torch.float32).activations["embed"].dtype == torch.int64


def test_the_transformer_encoder_container_keeps_the_residual_stream_permutable():
    """``nn.TransformerEncoder`` asks ``is_nested`` of its input (0.6.1 traced that query as an operation and
    fixed the stream); the container and a ModuleList of the same layers give one spec."""

    def layer():
        return nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)

    class Net(nn.Module):
        def __init__(self, container: bool) -> None:
            super().__init__()
            self.inp, self.head, self.container = nn.Linear(8, 16), nn.Linear(16, 3), container
            self.body = nn.TransformerEncoder(layer(), 2, enable_nested_tensor=False) if container else \
                nn.ModuleList([layer(), layer()])

        def forward(self, x):
            x = self.inp(x)
            if self.container:
                x = self.body(x)
            else:
                for block in self.body:
                    x = block(x)
            return self.head(x)

    x = torch.randn(3, 5, 8)
    specs = [spec_of(Net(c), (x,)) for c in (True, False)]
    assert [(s.group.name, s.size) for s in specs[0].spaces] == [(s.group.name, s.size) for s in specs[1].spaces]
    assert ("perm", 16) in [(s.group.name, s.size) for s in specs[0].spaces]


def test_explain_names_the_operation_and_module_that_fixed_a_space():
    from gradmetanet import explain

    class Cumulative(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.c(torch.tanh(self.b(torch.relu(self.a(x)).cumsum(-1))))

    table = explain(Cumulative(), (torch.randn(3, 4),))
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert "| trivial |" in rows["s1"] and "cumsum in '<root>' (removes" in rows["s1"]        # a's output
    assert "| trivial |" in rows["s2"] and "the output of cumsum in '<root>'" in rows["s2"]   # b's input
    assert "| sign_perm |" in rows["s3"] and "tanh in '<root>' (removes gl, scale)" in rows["s3"]
    assert "the model's output" in rows["s4"]
