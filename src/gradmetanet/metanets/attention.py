"""Multi-head self-attention along one axis of a ``[B, X, Y, f]`` tensor, fast on CPU for small heads.

GradMetaNet++ attends over the set (``X = b`` examples, for every neuron) and over neurons (``Y = N``, for
every example) with heads of 8 features. PyTorch's fused CPU attention runs such heads at a few GFLOP/s: its
products ``P V`` have 8 output columns, a shape the CPU matrix kernels handle badly. Two CPU kernels here:

- :class:`_FusedAttention` (float32, the default): a C++ kernel (``attention_kernel.cpp``) compiled for this
  machine on first use (about 30 s, once; cached by PyTorch under ``~/.cache/torch_extensions``). It computes
  scores, softmax and weighted sums of 16 queries (or keys) per vector instruction, keeps one log-sum-exp per
  query and recomputes the probabilities in the backward pass, so nothing of size ``L x L`` is stored. Measured
  on one CPU thread, 32 x 128 x 66 entries, 8 heads of 8: one block's two attentions 1.5 s forward and backward
  against 3.1 s for the chunked kernel. ``GRADMETANET_FUSED_ATTENTION=0`` turns it off; where it cannot be built
  (no C++ compiler) a warning names the cause and the chunked kernel runs.
- :class:`_ChunkedAttention` (float64, and the fallback): every product in the transposed, wide form, a chunk of
  sequences at a time (the chunk's ``L x L`` scores stay in the cache), scores recomputed in the backward pass.

Both read the packed ``[q | k | v]`` projection where it lies and write the output in the input's layout. On
CUDA, for heads wider than :data:`SMALL_HEAD` and under ``torch.func`` transforms (``vmap``, ``grad``),
:func:`F.scaled_dot_product_attention` is used. Neither CPU kernel's backward is differentiable again: a second
derivative through it raises.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["attend", "fused_kernel", "SMALL_HEAD"]

#: widest head the CPU kernels take (wider heads use ``F.scaled_dot_product_attention``)
SMALL_HEAD = 8
_CHUNK_SCORES = 2 ** 18       # score entries per chunk (1 MiB of float32): a chunk's scores stay in the cache


def attend(qkv: torch.Tensor, heads: int, seq_dim: int) -> torch.Tensor:
    """Attention among the entries along ``seq_dim`` (1 or 2), separately for every index of the other axes.

    ``qkv [B, X, Y, 3 f]`` packs queries, keys and values (``f = heads * d``); returns ``[B, X, Y, f]``,
    the attention output of every entry (scaled dot products, softmax, no mask, no dropout).
    """
    if seq_dim not in (1, 2) or qkv.dim() != 4 or qkv.shape[-1] % (3 * heads):
        raise ValueError(f"expected qkv [B, X, Y, 3 * heads * d] and seq_dim 1 or 2, got {tuple(qkv.shape)}, "
                         f"heads={heads}, seq_dim={seq_dim}")
    B, X, Y, f3 = qkv.shape
    d = f3 // (3 * heads)
    if qkv.is_cuda or d > SMALL_HEAD or torch._C._are_functorch_transforms_active():
        return _sdpa(qkv, heads, seq_dim)
    if qkv.dtype == torch.float32 and fused_kernel() is not None:
        return _FusedAttention.apply(qkv, heads, seq_dim)
    return _ChunkedAttention.apply(qkv, heads, seq_dim)


_KERNEL_SOURCE = Path(__file__).with_name("attention_kernel.cpp")


@functools.cache
def fused_kernel():
    """The compiled C++ kernel (built for this machine's instruction set on first use), or ``None`` when
    ``GRADMETANET_FUSED_ATTENTION=0`` or when it cannot be built (a warning names the cause)."""
    if os.environ.get("GRADMETANET_FUSED_ATTENTION", "1") == "0":
        return None
    if shutil.which("ninja") is None:            # pip installs ninja beside this interpreter, off PATH in a venv
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    try:
        from torch.utils.cpp_extension import get_default_build_root, load
        name = _kernel_name()
        build = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / name
        with _build_lock(build):
            return load(name, [str(_KERNEL_SOURCE)], extra_cflags=["-O3", "-march=native"], build_directory=str(build),
                        verbose=False)
    except Exception as error:                               # no compiler, no ninja, an unknown platform
        warnings.warn(f"gradmetanet: the fused CPU attention kernel could not be built ({type(error).__name__}: "
                      f"{str(error).strip().splitlines()[-1] if str(error).strip() else ''}); GradMetaNet++ runs the "
                      "slower chunked kernel (same results). Install a C++ compiler and ninja to build it, or set "
                      "GRADMETANET_FUSED_ATTENTION=0 to silence this.", RuntimeWarning, stacklevel=3)
        return None


def _kernel_name() -> str:
    """The extension's name: it changes with the source, this CPU (the build is ``-march=native``), Python and torch."""
    cpu = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "") \
        if Path("/proc/cpuinfo").exists() else os.uname().machine
    versions = f"{sys.version_info[:2]} {torch.__version__}"
    return "gradmetanet_attention_" + hashlib.sha1(_KERNEL_SOURCE.read_bytes() + (cpu + versions).encode()).hexdigest()[:12]


@contextlib.contextmanager
def _build_lock(build: Path) -> Iterator[None]:
    """Hold an OS lock on ``build`` (released by the kernel when its holder dies) and clear a stale build marker.

    PyTorch marks a build in progress with a ``lock`` file that only the building process removes: a build that
    was killed leaves it behind, and every later ``load`` of the same extension then waits for it forever. Under
    this lock no other gradmetanet process is building, so a ``lock`` file found here is such a leftover."""
    build.mkdir(parents=True, exist_ok=True)
    with open(build / "gradmetanet.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        (build / "lock").unlink(missing_ok=True)
        yield


class _FusedAttention(torch.autograd.Function):
    """The compiled kernel (float32, contiguous): forward keeps the output and each query's log-sum-exp."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, heads: int, seq_dim: int) -> torch.Tensor:
        qkv = qkv.contiguous()
        out, lse = fused_kernel().forward(qkv, heads, seq_dim)
        ctx.save_for_backward(qkv, out, lse)
        ctx.heads, ctx.seq_dim = heads, seq_dim
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        qkv, out, lse = ctx.saved_tensors
        return fused_kernel().backward(grad_out.contiguous(), qkv, out, lse, ctx.heads, ctx.seq_dim), None, None


def _sdpa(qkv: torch.Tensor, heads: int, seq_dim: int) -> torch.Tensor:
    B, X, Y, f3 = qkv.shape
    f = f3 // 3
    seq = qkv if seq_dim == 2 else qkv.transpose(1, 2)                      # [B, other, L, 3f]
    q, k, v = seq.reshape(-1, seq.shape[2], 3, heads, f // heads).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v)                           # [n, H, L, d]
    out = out.transpose(1, 2).reshape(B, seq.shape[1], seq.shape[2], f)
    return out if seq_dim == 2 else out.transpose(1, 2).contiguous()


def _chunks(qkv: torch.Tensor, heads: int, seq_dim: int):
    """``(index, chunk_size)`` pairs covering every sequence, and the view with sequences on axis 2."""
    seq = qkv if seq_dim == 2 else qkv.transpose(1, 2)                      # [B, S, L, ...]
    L = seq.shape[2]
    size = max(1, _CHUNK_SCORES // (heads * L * L))
    return seq, [(p, j, min(size, seq.shape[1] - j)) for p in range(seq.shape[0]) for j in range(0, seq.shape[1], size)]


def _gather(part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[c, L, 3, H, d]`` -> the scaled queries ``q / sqrt(d)``, the keys and the values, contiguous ``[c H, L, d]``."""
    c, L, _, H, d = part.shape
    q, k, v = part.permute(2, 0, 3, 1, 4).reshape(3, c * H, L, d).unbind(0)
    return q * d ** -0.5, k, v


def _scatter(target: torch.Tensor, transposed: torch.Tensor, c: int, heads: int) -> None:
    """Write ``[c H, d, L]`` into ``target [c, L, H, d]``."""
    target.copy_(transposed.view(c, heads, *transposed.shape[1:]).permute(0, 3, 1, 2))


class _ChunkedAttention(torch.autograd.Function):
    """Softmax attention in the wide product form, a chunk of sequences at a time, scores recomputed in backward."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, heads: int, seq_dim: int) -> torch.Tensor:
        B, X, Y, f3 = qkv.shape
        d = f3 // (3 * heads)
        out = qkv.new_empty(B, X, Y, heads, d)
        seq, chunks = _chunks(qkv.view(B, X, Y, 3, heads, d), heads, seq_dim)
        out_seq = out if seq_dim == 2 else out.transpose(1, 2)
        for p, j, c in chunks:
            q, k, v = _gather(seq[p, j:j + c])
            probs = torch.softmax(torch.bmm(q, k.transpose(1, 2)), -1)                          # [cH, L, L]
            _scatter(out_seq[p, j:j + c], torch.bmm(v.transpose(1, 2), probs.transpose(1, 2)), c, heads)
        ctx.save_for_backward(qkv, out)
        ctx.heads, ctx.seq_dim = heads, seq_dim
        return out.view(B, X, Y, heads * d)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        qkv, out = ctx.saved_tensors
        heads, seq_dim = ctx.heads, ctx.seq_dim
        B, X, Y, f3 = qkv.shape
        d = f3 // (3 * heads)
        grad_qkv = qkv.new_empty(B, X, Y, 3, heads, d)
        seq, chunks = _chunks(qkv.view(B, X, Y, 3, heads, d), heads, seq_dim)
        grad_seq = grad_qkv if seq_dim == 2 else grad_qkv.transpose(1, 2)
        out_seq, grad_out_seq = (t if seq_dim == 2 else t.transpose(1, 2)
                                 for t in (out, grad_out.reshape(B, X, Y, heads, d)))
        for p, j, c in chunks:
            q, k, v = _gather(seq[p, j:j + c])
            probs = torch.softmax(torch.bmm(q, k.transpose(1, 2)), -1)                          # [cH, L, L]
            g = grad_out_seq[p, j:j + c].transpose(1, 2).reshape(c * heads, -1, d)           # [cH, L, d]
            o = out_seq[p, j:j + c].transpose(1, 2).reshape(c * heads, -1, d)
            # dS = P * (dP - rowsum(dO * O)), dP = dO V^T; the three gradients in the wide form [cH, d, L]
            # (the scores are (q / sqrt(d)) k^T: the query gradient is scaled, the key gradient reads the scaled q)
            grad_scores = torch.bmm(g, v.transpose(1, 2)).sub_((g * o).sum(2, keepdim=True)).mul_(probs)
            target = grad_seq[p, j:j + c]                                                     # [c, L, 3, H, d]
            _scatter(target[:, :, 0], torch.bmm(k.transpose(1, 2), grad_scores.transpose(1, 2)).mul_(d ** -0.5), c,
                     heads)
            _scatter(target[:, :, 1], torch.bmm(q.transpose(1, 2), grad_scores), c, heads)
            _scatter(target[:, :, 2], torch.bmm(g.transpose(1, 2), probs), c, heads)
        return grad_qkv.view(B, X, Y, f3), None, None
