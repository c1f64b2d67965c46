"""The chunked CPU attention of GradMetaNet++ (metanets/attention.py) against PyTorch's fused attention."""

import pytest
import torch

import gradmetanet.metanets.attention as attention


@pytest.mark.parametrize("seq_dim", [1, 2])
@pytest.mark.parametrize("heads,d", [(4, 3), (2, 8)])
def test_chunked_attention_equals_fused_attention(monkeypatch, seq_dim, heads, d):
    """Outputs and gradients equal F.scaled_dot_product_attention's to float64 rounding, whatever the chunking
    (a chunk of one sequence, chunks that do not divide the sequences, one chunk for all)."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 5, 7, 3 * heads * d, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 5, 7, heads * d, dtype=torch.float64)
    expected = attention._sdpa(qkv, heads, seq_dim)
    expected_grad, = torch.autograd.grad(expected, qkv, grad)
    for scores in (1, 3 * heads * 7 * 7, 2 ** 20):
        monkeypatch.setattr(attention, "_CHUNK_SCORES", scores)
        out = attention._ChunkedAttention.apply(qkv, heads, seq_dim)
        torch.testing.assert_close(out, expected, atol=1e-13, rtol=1e-12)
        torch.testing.assert_close(torch.autograd.grad(out, qkv, grad)[0], expected_grad, atol=1e-13, rtol=1e-12)


def test_chunked_attention_gradcheck(monkeypatch):
    monkeypatch.setattr(attention, "_CHUNK_SCORES", 20)
    qkv = torch.randn(1, 3, 4, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: attention._ChunkedAttention.apply(t, 2, 1), (qkv,))


def test_attend_dispatch_and_errors(monkeypatch):
    """Small heads on CPU take the chunked kernel, wider ones the fused one; bad shapes are refused by name."""
    calls = []
    monkeypatch.setattr(attention._ChunkedAttention, "apply", lambda *a: calls.append("chunked") or a[0][..., :8])
    attention.attend(torch.randn(1, 2, 3, 3 * 8), heads=1, seq_dim=1)
    attention.attend(torch.randn(1, 2, 3, 3 * 32), heads=2, seq_dim=1)
    assert calls == ["chunked"]
    with pytest.raises(ValueError, match="seq_dim"):
        attention.attend(torch.randn(1, 2, 3, 24), heads=1, seq_dim=3)
    with pytest.raises(ValueError, match="3 \\* heads"):
        attention.attend(torch.randn(1, 2, 3, 25), heads=1, seq_dim=1)


def test_attend_under_torch_func_and_a_second_derivative():
    """Under vmap and grad the fused kernel answers (the chunked one is no functorch Function); a second derivative
    through the chunked kernel raises instead of returning a wrong one."""
    torch.manual_seed(0)
    qkv = torch.randn(3, 2, 4, 5, 24, dtype=torch.float64)
    batched = torch.vmap(lambda t: attention.attend(t, 2, 1))(qkv)
    for i in range(3):
        torch.testing.assert_close(batched[i], attention.attend(qkv[i], 2, 1), atol=1e-12, rtol=1e-12)
    by_func = torch.func.grad(lambda t: attention.attend(t, 2, 1).square().sum())(qkv[0])
    x = qkv[0].clone().requires_grad_()
    by_autograd, = torch.autograd.grad(attention.attend(x, 2, 1).square().sum(), x)
    torch.testing.assert_close(by_func, by_autograd, atol=1e-12, rtol=1e-12)
    first, = torch.autograd.grad(attention.attend(x, 2, 1).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        first.sum().backward()
