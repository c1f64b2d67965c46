"""Capture on models as users write them: tied weights under ``layers=[...]``, extractors checked against
the module they are registered for. Every per-example gradient is compared with ``torch.func`` (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from gradmetanet import CaptureError, GradientCapture, UnsupportedModuleError


class TiedLM(nn.Module):
    """Embedding -> tanh MLP -> unembedding whose weight *is* the embedding's (as GPT-2 and Llama tie it)."""

    def __init__(self, vocab: int = 11, width: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mlp = nn.Linear(width, width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.mlp(self.embed(ids))))


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example sum over tokens, mean over examples."""
    return F.cross_entropy(logits.transpose(1, -1), targets, reduction="none").sum(-1).mean()


def reference_grads(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each example's gradient of its own loss, by ``torch.func`` (keys: ``named_parameters`` names)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, i, t):
        return sequence_loss(functional_call(model, p, (i[None],)), t[None])
    return vmap(grad(loss), in_dims=(None, 0, 0))(params, ids, targets)


@pytest.mark.parametrize("layers", [["embed", "lm_head"], ["embed", "mlp", "lm_head"], None])
def test_tied_weights_under_layers_are_one_parameter(layers):
    torch.manual_seed(0)
    model = TiedLM().double()
    ids, targets = torch.randint(11, (4, 6)), torch.randint(11, (4, 6))
    with GradientCapture(model, layers=layers) as cap:
        sequence_loss(model(ids), targets).backward()
    gs = cap.gradients
    expected = reference_grads(model, ids, targets)
    got = gs.per_example_grads()
    assert set(got) <= set(expected), f"keys that are not parameter names: {set(got) - set(expected)}"
    captured = {"embed.weight", "mlp.weight", "mlp.bias"} if layers is None else \
        {"embed.weight"} | ({"mlp.weight", "mlp.bias"} if "mlp" in layers else set())
    assert set(got) == captured
    for name in captured:
        torch.testing.assert_close(got[name], expected[name], atol=1e-10, rtol=1e-10)
    mean = gs.mean_grad()
    for name in captured:
        torch.testing.assert_close(mean[name], dict(model.named_parameters())[name].grad, atol=1e-10, rtol=1e-10)
    norms = torch.stack([expected[name].flatten(1).square().sum(1) for name in captured]).sum(0).sqrt()
    torch.testing.assert_close(gs.norms(), norms, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("layers", [["lm_head"], ["mlp", "embed"]])
def test_a_tied_weight_captured_at_one_of_its_users_is_refused(layers):
    model = TiedLM()
    with pytest.raises(CaptureError, match=r"tied parameter 'embed.weight'.*Capture all its users"):
        GradientCapture(model, layers=layers)


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 ``Conv1D``: ``y = x W + b`` with ``W`` stored ``[in, out]``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx ** 0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)


def conv1d_extractor(kind: str):
    from gradmetanet.capture import Extractor

    class Conv1DExtractor(Extractor):
        def widths(self, module):
            return module.weight.shape[0], module.weight.shape[1]

        def activation(self, module, inputs, output):
            return inputs[0]
    extractor = Conv1DExtractor()
    extractor.kind = kind
    return extractor


class GPT2MLP(nn.Module):
    def __init__(self, width: int = 6, square: bool = False) -> None:
        super().__init__()
        self.c_fc = Conv1D(width if square else 3 * width, width)
        self.c_proj = Conv1D(width, width if square else 3 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(torch.tanh(self.c_fc(x)))


@pytest.fixture
def registered_conv1d():
    """Register an extractor for Conv1D for one test (the registry is global)."""
    from gradmetanet.capture import registry

    def register(kind: str) -> None:
        registry.register_extractor(Conv1D, conv1d_extractor(kind))
    yield register
    registry._REGISTRY.pop(Conv1D, None)


@pytest.mark.parametrize("square", [False, True])
def test_a_weight_stored_in_out_declared_linear_is_refused(registered_conv1d, square):
    """The README's recipe with kind 'linear' on GPT-2's [in, out] weights: refused by the shape check (non-square
    layers, with the kind to use) or by the gradient probe (square ones, whose shapes agree)."""
    registered_conv1d("linear")
    model = GPT2MLP(square=square).double()
    match = r"declares 'c_fc.weight' with shape \[18, 6\].*tensor is \[6, 18\].*linear_t" if not square else \
        r"does not reproduce autograd's gradient of 'c_fc.weight'.*linear_t"
    with pytest.raises(UnsupportedModuleError, match=match):
        GradientCapture(model)
    with pytest.raises(CaptureError, match="c_fc"):
        GradientCapture(model, layers=["c_fc"])


@pytest.mark.parametrize("square", [False, True])
def test_kind_linear_t_gives_per_example_grads_of_in_out_weights(registered_conv1d, square):
    registered_conv1d("linear_t")
    torch.manual_seed(0)
    model = GPT2MLP(square=square).double()
    x, y = torch.randn(5, 4, 6, dtype=torch.float64), torch.randn(5, 4, 6, dtype=torch.float64)
    with GradientCapture(model) as cap:
        (model(x) - y).square().sum((1, 2)).mean().backward()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return (functional_call(model, p, (xi[None],)) - yi[None]).square().sum()
    expected = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    got = cap.gradients.per_example_grads()
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-10, rtol=1e-10)
    spec = cap.gradients.spec
    assert [space.group.name for space in spec.spaces] == ["trivial", "sign_perm", "trivial"]
    element = spec.sample(torch.Generator().manual_seed(1))
    moved = spec.transform_parameters(params, element)
    hidden = torch.tanh(x @ moved["c_fc.weight"] + moved["c_fc.bias"])
    torch.testing.assert_close(hidden @ moved["c_proj.weight"] + moved["c_proj.bias"], model(x).detach())
