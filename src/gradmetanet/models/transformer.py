"""A small causal transformer language model written with ``nn.Linear`` layers (spec 7: the LM task).

Token and position embeddings, ``blocks`` blocks of causal multi-head attention and a feed-forward
network, each with a residual connection and a LayerNorm before (``norm="pre"``) or after
(``norm="post"``) it, a final LayerNorm (pre-LN only) and an unembedding, optionally tied to the token
embedding. Attention is ``nn.MultiheadAttention`` (default) or separate ``q``, ``k``, ``v``, ``o`` linear
layers. Shapes: ``ids [B, T]`` -> logits ``[B, T, vocab]``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CausalTransformer"]


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, T, d] -> [B, heads, T, d / heads]``."""
        B, T, d = t.shape
        return t.view(B, T, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        weights = scores.masked_fill(future, float("-inf")).softmax(-1)
        return self.o((weights @ v).transpose(1, 2).reshape(B, T, d))


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, ffn_mult: int, norm: str, dropout: float, attention: str) -> None:
        super().__init__()
        self.norm = norm
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = (nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True) if attention == "torch"
                     else _Attention(d, heads))
        self.ffn_in, self.ffn_out = nn.Linear(d, ffn_mult * d), nn.Linear(ffn_mult * d, d)
        self.drop = nn.Dropout(dropout)

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_out(F.gelu(self.ffn_in(x)))

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.attn, _Attention):
            return self.attn(x)
        T = x.shape[1]
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        return self.attn(x, x, x, attn_mask=future, need_weights=False)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm == "pre":
            x = x + self.drop(self._attend(self.ln1(x)))
            return x + self.drop(self._ffn(self.ln2(x)))
        x = self.ln1(x + self.drop(self._attend(x)))
        return self.ln2(x + self.drop(self._ffn(x)))


class CausalTransformer(nn.Module):
    """Next-token model; the paper's LM task uses ``d = 32``, 4 heads, 2 blocks, sequences of 8.

    Args:
        vocab: number of token ids.
        d: residual width; ``heads`` must divide it.
        max_len: longest sequence (number of learned positions).
        norm: ``"pre"`` (LayerNorm inside each residual branch, plus a final one) or ``"post"``.
        tie: the unembedding reuses the token embedding's matrix (one parameter, ``embed.weight``).
        attention: ``"torch"`` (``nn.MultiheadAttention``: capture and the traced spec know its per-head
            Q/K and V/O spaces) or ``"linear"`` (separate ``q, k, v, o`` ``nn.Linear`` layers, a GPT-style
            model written by hand: captured exactly, its attention spaces fixed, as the tracer cannot see heads).
    """

    def __init__(self, vocab: int, d: int = 32, heads: int = 4, blocks: int = 2, max_len: int = 8,
                 ffn_mult: int = 4, norm: Literal["pre", "post"] = "pre", tie: bool = False,
                 dropout: float = 0.0, attention: Literal["torch", "linear"] = "torch") -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"heads ({heads}) must divide the width d ({d})")
        if norm not in ("pre", "post"):
            raise ValueError(f"norm must be 'pre' or 'post', got {norm!r}")
        if attention not in ("torch", "linear"):
            raise ValueError(f"attention must be 'torch' or 'linear', got {attention!r}")
        self.max_len, self.norm = max_len, norm
        self.embed = nn.Embedding(vocab, d)
        self.position = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(_Block(d, heads, ffn_mult, norm, dropout, attention) for _ in range(blocks))
        self.final_norm = nn.LayerNorm(d) if norm == "pre" else None
        self.unembed = nn.Linear(d, vocab, bias=False)
        if tie:
            self.unembed.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids [B, T]`` (``T <= max_len``) -> logits ``[B, T, vocab]``; position ``t`` sees tokens ``<= t``."""
        if ids.dim() != 2 or ids.shape[1] > self.max_len:
            raise ValueError(f"ids must be [B, T] with T <= max_len ({self.max_len}), got {list(ids.shape)}")
        # positions per example ([B, T], not [T] broadcast): per-example gradients of the position table need it
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        x = self.embed(ids) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self.unembed(x)
