"""GradMetaNet++'s CPU attention kernels (metanets/attention.py), the compiled one and the chunked one, against
PyTorch's scaled-dot-product attention."""

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

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


@pytest.fixture
def compiled():
    kernel = attention.fused_kernel()
    assert kernel is not None, "the fused attention kernel did not build on this machine (see the warning)"
    return kernel


@pytest.mark.parametrize("seq_dim", [1, 2])
@pytest.mark.parametrize("heads,d,length", [(4, 3, 7), (2, 8, 17), (1, 1, 33), (3, 5, 1), (8, 8, 16)])
def test_compiled_attention_equals_reference_attention(compiled, seq_dim, heads, d, length):
    """float32 outputs and gradients of the compiled kernel equal float64 scaled-dot-product attention's to float32
    rounding, for head widths padded to 4 and 8 and lengths that fill 16 lanes partly, once or not at all; also
    with scores up to a few hundred (inputs x 8: exp would overflow without the row maximum, and the smallest
    probabilities reach the exponent's clamp)."""
    torch.manual_seed(0)
    other = 6
    for gain in (1.0, 8.0):
        qkv = (gain * torch.randn(2, length if seq_dim == 1 else other, other if seq_dim == 1 else length,
                                  3 * heads * d)).double()                  # float32 values: no input rounding
        grad = torch.randn(*qkv.shape[:3], heads * d, dtype=torch.float64)
        x64 = qkv.clone().requires_grad_()
        expected = attention._sdpa(x64, heads, seq_dim)
        expected_grad, = torch.autograd.grad(expected, x64, grad)
        x32 = qkv.float().requires_grad_()
        out = attention._FusedAttention.apply(x32, heads, seq_dim)
        got_grad, = torch.autograd.grad(out, x32, grad.float())
        scale = expected_grad.abs().max().item()
        torch.testing.assert_close(out.double(), expected, atol=2e-5 * gain, rtol=1e-4)
        torch.testing.assert_close(got_grad.double(), expected_grad, atol=2e-5 * max(scale, 1.0), rtol=1e-3)


def test_compiled_attention_runs_on_several_threads(compiled):
    """The kernel splits (sequence, head) tasks over threads: the result is the one-thread result, bit for bit."""
    torch.manual_seed(1)
    qkv = torch.randn(2, 9, 5, 3 * 16, requires_grad=True)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            out = attention._FusedAttention.apply(qkv, 2, 1)
            results.append((out, torch.autograd.grad(out.square().sum(), qkv)[0]))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_a_kernel_that_cannot_be_built_warns_and_falls_back(monkeypatch):
    """No compiler: a warning names the cause and the chunked kernel answers; GRADMETANET_FUSED_ATTENTION=0 turns the
    compiled kernel off without a warning."""
    import torch.utils.cpp_extension as cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    qkv = torch.randn(1, 3, 4, 3 * 8)
    expected = attention._ChunkedAttention.apply(qkv, 1, 1)
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    attention.fused_kernel.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not be built.*Ninja is required.*chunked kernel"):
            assert attention.fused_kernel() is None
        torch.testing.assert_close(attention.attend(qkv, 1, 1), expected)
        attention.fused_kernel.cache_clear()
        monkeypatch.setenv("GRADMETANET_FUSED_ATTENTION", "0")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert attention.fused_kernel() is None
    finally:
        attention.fused_kernel.cache_clear()


def test_a_build_killed_midway_does_not_hang_the_next_process(compiled, tmp_path):
    """A build killed midway leaves PyTorch's ``lock`` marker in the build folder, and PyTorch's ``load`` then waited
    for it forever (a GradMetaNet++ run slept for 15 minutes before this was found). A new process finds the kernel."""
    from torch.utils.cpp_extension import get_default_build_root

    name = attention._kernel_name()
    built = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / name
    shutil.copytree(built, tmp_path / name)                       # the built kernel, so nothing is compiled again
    (tmp_path / name / "lock").touch()                            # what a killed build leaves behind
    probe = "import gradmetanet.metanets.attention as a; print(a.fused_kernel() is not None)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=240,
                          env=os.environ | {"TORCH_EXTENSIONS_DIR": str(tmp_path)})
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr[-2000:]
    assert not (tmp_path / name / "lock").exists()


def test_attend_dispatch_and_errors(monkeypatch, compiled):
    """Small float32 heads on CPU take the compiled kernel, float64 ones the chunked kernel, wider heads PyTorch's;
    bad shapes are refused by name."""
    calls = []
    monkeypatch.setattr(attention._ChunkedAttention, "apply", lambda *a: calls.append("chunked") or a[0][..., :8])
    monkeypatch.setattr(attention._FusedAttention, "apply", lambda *a: calls.append("compiled") or a[0][..., :8])
    attention.attend(torch.randn(1, 2, 3, 3 * 8), heads=1, seq_dim=1)
    attention.attend(torch.randn(1, 2, 3, 3 * 8, dtype=torch.float64), heads=1, seq_dim=1)
    attention.attend(torch.randn(1, 2, 3, 3 * 32), heads=2, seq_dim=1)
    assert calls == ["compiled", "chunked"]
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


def test_a_second_derivative_through_the_compiled_kernel_raises(compiled):
    x = torch.randn(1, 3, 4, 3 * 8, requires_grad=True)
    first, = torch.autograd.grad(attention.attend(x, 1, 2).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        first.sum().backward()


def test_gradmetanet_plus_plus_is_the_same_model_with_either_cpu_kernel(monkeypatch, compiled):
    """A seeded GradMetaNet++ in float32: outputs and every parameter gradient with the compiled kernel equal those
    with the chunked kernel to float32 rounding."""
    from gradmetanet import GradientBatch, NetworkSpec
    from gradmetanet.metanets import GradMetaNetPlusPlus

    spec = NetworkSpec.chain([1, 8, 8, 1])
    torch.manual_seed(0)
    batch = GradientBatch(spec, torch.randn(3, 20, spec.n_neurons, 2))
    model = GradMetaNetPlusPlus(hidden=32, blocks=2, heads=4)
    runs = []
    for kernel in (compiled, None):
        monkeypatch.setattr(attention, "fused_kernel", lambda kernel=kernel: kernel)
        model.zero_grad()
        out = model(batch)
        sum(v.square().sum() for v in out.values()).backward()
        runs.append(({k: v.detach() for k, v in out.items()}, [p.grad.clone() for p in model.parameters()]))
    (out_a, grads_a), (out_b, grads_b) = runs
    for name in out_a:
        torch.testing.assert_close(out_a[name], out_b[name], atol=1e-5, rtol=1e-4)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)
