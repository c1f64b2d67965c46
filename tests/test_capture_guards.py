"""Capture is never silently wrong: the failures found by trying the library as a new user would."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from gradmetanet import CaptureError, GradientCapture, GradientSet, UnsupportedModuleError
from gradmetanet.models.mlp import make_mlp
from gradmetanet.capture import functional_factors, functional_features
from gradmetanet.testing import check_symmetry
from gradmetanet import spec_of


def reference(model: nn.Module, x: torch.Tensor, loss_one, batch_dim: int = 0) -> dict[str, torch.Tensor]:
    """Per-example gradients of ``loss_one(output of one example)`` by ``vmap(grad(...))``."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xi):
        return loss_one(functional_call(model, p, (xi.unsqueeze(batch_dim),)))

    return vmap(grad(one), in_dims=(None, batch_dim))(params, x)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("batch_first", [False, True])
def test_transformer_layer_linears_use_the_batch_axis_of_their_module(batch_first):
    """PyTorch's default batch_first=False used to give gradients over the *sequence* axis (7 'examples' for
    4); the batch axis now comes from the enclosing module."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=batch_first).double()
    T, b = 7, 4
    x = torch.randn(b, T, 8, dtype=torch.float64) if batch_first else torch.randn(T, b, 8, dtype=torch.float64)
    with GradientCapture(layer, layers=["linear1", "linear2"], loss_reduction="sum") as cap:
        layer(x).square().sum().backward()
    gs = cap.gradients
    assert gs.batch_size == b and gs.activations["linear1"].shape == (b, T, 8)
    ref = reference(layer, x, lambda out: out.square().sum(), batch_dim=0 if batch_first else 1)
    for name in ("linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"):
        torch.testing.assert_close(gs.per_example_grads()[name], ref[name], atol=1e-10, rtol=0)


def test_attention_variants_capture_cannot_do_exactly_are_refused_with_the_reason():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16)
    with pytest.raises(CaptureError, match="belongs to 'self_attn', which applies its weights functionally"):
        GradientCapture(layer, layers=["self_attn.out_proj"])
    for bad, why in ((nn.MultiheadAttention(8, 2, add_bias_kv=True), "add_bias_kv"),
                     (nn.MultiheadAttention(8, 2, kdim=4, vdim=4), "kdim or vdim"),
                     (nn.Embedding(5, 8, max_norm=1.0), "max_norm"),
                     (nn.Embedding(5, 8, scale_grad_by_freq=True), "couples the examples"),
                     (nn.LayerNorm((3, 8)), "over 2 axes")):
        with pytest.raises(UnsupportedModuleError, match=why):
            GradientCapture(nn.Sequential(bad, nn.Linear(8, 2)) if isinstance(bad, nn.Embedding) else bad)


def test_batch_norm_in_training_mode_is_refused_and_eval_mode_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    with pytest.raises(CaptureError, match="couples|batch|BatchNorm1d in training mode"):
        with GradientCapture(model, layers=["0", "3"]):
            model(x)
    model.eval()
    with GradientCapture(model, layers=["0", "3"], loss_reduction="sum") as cap:
        model(x).square().sum().backward()
    ref = reference(model, x, lambda out: out.square().sum())
    for name in ("0.weight", "3.weight"):
        torch.testing.assert_close(cap.gradients.per_example_grads()[name], ref[name], atol=1e-10, rtol=0)


def test_a_forward_without_backward_does_not_leak_into_the_next_step():
    torch.manual_seed(0)
    model = make_mlp([3, 5, 2]).double()
    x1, x2 = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    with GradientCapture(model, loss_reduction="sum") as cap:
        model(x1)                                   # a forward with gradients that nobody backpropagates
        model(x2).sum().backward()
    gs = cap.gradients
    assert gs.activations["0"].shape == (6, 1, 3)
    torch.testing.assert_close(gs.activations["0"][:, 0], x2)
    ref = reference(model, x2, lambda out: out.sum())
    torch.testing.assert_close(gs.per_example_grads()["0.weight"], ref["0.weight"], atol=1e-10, rtol=0)
    # backpropagating the superseded forward is refused, not mixed in
    with pytest.raises(CaptureError, match="superseded"):
        with GradientCapture(model) as cap:
            first = model(x1).sum()
            model(x2)
            first.backward()


def test_autocast_bf16_views_work():
    torch.manual_seed(0)
    model = make_mlp([8, 16, 4])
    x, y = torch.randn(32, 8), torch.randint(4, (32,))
    with GradientCapture(model) as cap, torch.autocast("cpu", dtype=torch.bfloat16):
        F.cross_entropy(model(x), y).backward()
    gs = cap.gradients
    mean, fisher = gs.mean_grad(), gs.empirical_fisher_diag()
    for name, p in model.named_parameters():
        assert mean[name].shape == p.shape and fisher[name].shape == p.shape
        torch.testing.assert_close(mean[name].float(), p.grad, atol=0.05, rtol=0.05)


def test_load_of_a_foreign_file_says_what_it_is(tmp_path):
    model = make_mlp([3, 4, 2])
    with GradientCapture(model) as cap:
        model(torch.randn(5, 3)).sum().backward()
    torch.save({"a": torch.zeros(3)}, tmp_path / "t.pt")
    with pytest.raises(ValueError, match="not a safetensors file.*torch.save"):
        GradientSet.load(tmp_path / "t.pt")
    (tmp_path / "short").write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="not a safetensors file"):
        GradientSet.load(tmp_path / "short")
    cap.gradients.save(tmp_path / "g.safetensors")
    assert GradientSet.load(tmp_path / "g.safetensors").spec == cap.gradients.spec


def test_concise_repr_and_empty_batches():
    model = make_mlp([3, 4, 2])
    with GradientCapture(model) as cap:
        model(torch.randn(5, 3)).sum().backward()
    text = repr(cap.gradients)
    assert text.startswith("GradientSet(5 examples") and len(text) < 300 and "tensor(" not in text
    with pytest.raises(ValueError, match="empty batch"):
        cap.gradients.select(slice(0, 0))


@pytest.mark.parametrize("tokens", [None, 3])
def test_hooks_functional_and_torch_func_agree(tokens):
    """Every registered kind (nn.Linear today): hooks == functional extractor == torch.func, float64."""
    torch.manual_seed(0)
    model = make_mlp([4, 6, 5, 3], "tanh").double()
    spec = spec_of(model)
    x = torch.randn(7, 4, dtype=torch.float64) if tokens is None else torch.randn(7, tokens, 4, dtype=torch.float64)
    y = torch.randn(*x.shape[:-1], 3, dtype=torch.float64)

    def loss(out):
        return (out - y).square().mean()

    with GradientCapture(model) as cap:
        loss(model(x)).backward()
    hooks = cap.gradients
    params = {k: v.detach() for k, v in model.named_parameters()}
    _, g_params, acts, grads, outs = functional_factors(model, spec, params, (x,), loss)
    functional = GradientSet(spec, acts, grads, outs)
    for site in spec.sites:
        torch.testing.assert_close(functional.activations[site.name], hooks.activations[site.name])
        torch.testing.assert_close(functional.output_grads[site.name], hooks.output_grads[site.name])
    for name, p in model.named_parameters():
        torch.testing.assert_close(g_params[name], p.grad)
    torch.testing.assert_close(functional_features(model, spec, params, (x,), loss)[2], hooks.neuron_tensor())
    per_example = hooks.per_example_grads()

    def one(p, xi, yi):
        return (functional_call(model, p, (xi.unsqueeze(0),)) - yi.unsqueeze(0)).square().mean()

    ref = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    for name in ref:
        torch.testing.assert_close(per_example[name], ref[name], atol=1e-10, rtol=0)
        torch.testing.assert_close(functional.per_example_grads()[name], ref[name], atol=1e-10, rtol=0)


class BatchSoftmax(nn.Module):
    """A softmax over the examples (dim 0) between two layers: every example's output depends on the others."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.a, self.b, self.dim = nn.Linear(3, 4), nn.Linear(4, 2), dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.softmax(self.a(x), self.dim))


def test_a_forward_that_mixes_the_examples_is_refused():
    with pytest.raises(CaptureError, match="softmax over dim 0"):
        GradientCapture(BatchSoftmax(0))
    spec = spec_of(BatchSoftmax(-1))        # over the neurons: a permutation symmetry, no coupling
    assert spec.space("s1").group.name == "perm"
    model = BatchSoftmax(-1).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    with GradientCapture(model, loss_reduction="sum") as cap:
        model(x).square().sum().backward()
    ref = reference(model, x, lambda out: out.square().sum())
    for name, value in cap.gradients.per_example_grads().items():
        torch.testing.assert_close(value, ref[name], atol=1e-10, rtol=0)


def test_functional_extractor_moves_with_every_group_element():
    """The symmetry harness on the functional capture path (ReLU: permutations and positive scales)."""
    torch.manual_seed(0)
    model = make_mlp([4, 7, 6, 3], "relu").double()
    spec = spec_of(model)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(3, (8,))

    def factors(params):
        _, _, acts, grads, outs = functional_factors(model, spec, params, (x,), lambda o: F.cross_entropy(o, y))
        return GradientSet(spec, acts, grads, outs)

    params = {k: v.detach() for k, v in model.named_parameters()}
    check_symmetry(spec, factors, params, lambda p, g, sp: sp.transform_parameters(p, g),
                   lambda gs, g, sp: gs.transform(g), sensitivity=("fixed", "negative_scale"))
