"""Attention heads followed by the tracer: a projection viewed as ``[b, T, heads, d]`` gives ``Blocks(heads, Perm)``
spaces (Q with K, V with O) that are true (every element leaves the model's function unchanged) and not larger than
true (a permutation across heads changes it); heads that rotary embeddings, grouped-query attention, a packed
projection or an operation across heads fix are ``Trivial`` with that cause named. Before version 0.9 every head
split fixed its spaces."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from gradmetanet.core import NetworkSpec
from gradmetanet.capture.trace import trace
from gradmetanet.core.groups import Blocks, Perm
from gradmetanet import spec_of

HEADS, WIDTH, T, B = 4, 16, 5, 3


class Attention(nn.Module):
    """Self-attention as users write it: separate projections, ``view`` into heads, ``how`` computes the scores."""

    def __init__(self, how: str = "eager") -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(WIDTH, WIDTH) for _ in range(4))
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, HEADS, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        if self.how == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
            out = torch.matmul(scores.softmax(-1), v)
        if self.how == "mixed heads":                    # every head reads the mean of all heads
            out = out + out.mean(1, keepdim=True)
        return self.o(out.transpose(1, 2).reshape(b, t, WIDTH))


class Block(nn.Module):
    def __init__(self, how: str = "eager") -> None:
        super().__init__()
        self.embed, self.attn, self.head = nn.Linear(3, WIDTH), Attention(how), nn.Linear(WIDTH, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        return self.head(torch.tanh(h + self.attn(h)))


def spaces_of(spec: NetworkSpec, *site_names: str) -> list:
    return [spec.space(spec.site(n).out_space) for n in site_names]


def moved_output(model: nn.Module, spec: NetworkSpec, element: dict, x: torch.Tensor) -> torch.Tensor:
    params = {k: v.detach() for k, v in model.named_parameters()}
    with torch.no_grad():
        return functional_call(model, spec.transform_parameters(params, element), (x,))


@pytest.mark.parametrize("how", ["eager", "sdpa"])
def test_heads_of_a_user_attention_are_blocks_true_and_no_larger(how):
    torch.manual_seed(0)
    model = Block(how).double()
    x = torch.randn(B, T, 3, dtype=torch.float64)
    spec = spec_of(model, (x,))
    qk, k, vo = spaces_of(spec, "attn.q", "attn.k", "attn.v")
    assert qk is k and qk is not vo, "Q and K share one space, V (and O's input) another"
    assert spec.space(spec.site("attn.o").in_space) is vo
    assert repr(qk.group) == repr(vo.group) == repr(Blocks(HEADS, Perm()))
    with torch.no_grad():
        reference = model(x)
    for seed in range(3):
        element = spec.sample(torch.Generator().manual_seed(seed))
        torch.testing.assert_close(moved_output(model, spec, element, x), reference, atol=1e-12, rtol=1e-12)
    for space in (qk, vo):                        # sensitivity: one permutation across heads is not a symmetry
        across = Perm().sample(WIDTH, torch.Generator().manual_seed(5))
        assert not torch.allclose(moved_output(model, spec, {space.name: across}, x), reference, atol=1e-6)


def test_an_operation_across_heads_fixes_them_and_is_named():
    model = Block("mixed heads").double()
    tr = trace(model, (torch.randn(B, T, 3, dtype=torch.float64),))
    vo = spaces_of(tr.spec, "attn.v")[0]
    assert vo.group.name == "trivial"
    assert "mean" in "; ".join(tr.why[vo.name])
    assert spaces_of(tr.spec, "attn.q")[0].group.name == "blocks", "the scores stay per head"


def test_a_module_reading_per_head_features_fixes_the_heads():
    """One Linear applied to every head's features: the same permutation would have to act on every head."""
    class Shared(Attention):
        def __init__(self) -> None:
            super().__init__()
            self.per_head = nn.Linear(WIDTH // HEADS, WIDTH // HEADS)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, _ = x.shape
            v = self.per_head(self.v(x).view(b, t, HEADS, -1))
            return self.o(v.reshape(b, t, WIDTH))

    model = nn.Sequential(nn.Linear(3, WIDTH), Shared()).double()
    tr = trace(model, (torch.randn(B, T, 3, dtype=torch.float64),))
    assert spaces_of(tr.spec, "1.v")[0].group.name == "trivial"
    assert "every head" in "; ".join(tr.why[tr.spec.site("1.v").out_space])


def bert(attention: str):
    from transformers import BertConfig, BertModel
    return BertModel(BertConfig(hidden_size=WIDTH, intermediate_size=24, num_hidden_layers=1,
                                num_attention_heads=HEADS, vocab_size=40, max_position_embeddings=16,
                                attn_implementation=attention))


def llama(kv_heads: int):
    from transformers import LlamaConfig, LlamaModel
    return LlamaModel(LlamaConfig(hidden_size=WIDTH, intermediate_size=24, num_hidden_layers=1,
                                  num_attention_heads=HEADS, num_key_value_heads=kv_heads, vocab_size=40,
                                  max_position_embeddings=16, pad_token_id=0))


def gpt2():
    from transformers import GPT2Config, GPT2Model
    return GPT2Model(GPT2Config(n_embd=WIDTH, n_layer=1, n_head=HEADS, vocab_size=40, n_positions=16))


def traced(model: nn.Module):
    torch.manual_seed(0)
    return trace(model.double().eval(), (torch.randint(40, (B, T)),))


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_bert_heads_are_blocks(attention):
    tr = traced(bert(attention))
    prefix = "encoder.layer.0.attention."
    qk, k, vo = spaces_of(tr.spec, prefix + "self.query", prefix + "self.key", prefix + "self.value")
    assert qk is k and repr(qk.group) == repr(vo.group) == repr(Blocks(HEADS, Perm()))
    assert tr.spec.space(tr.spec.site(prefix + "output.dense").in_space) is vo


def test_llama_values_are_blocks_and_rotary_queries_and_keys_are_fixed():
    """Rotary embeddings rotate pairs of features, each pair at its own frequency: no permutation inside a head
    commutes with them, so Q/K are fixed (true, not a shortcut); V and O keep their heads."""
    tr = traced(llama(kv_heads=HEADS))
    prefix = "layers.0.self_attn."
    q, k, v = spaces_of(tr.spec, prefix + "q_proj", prefix + "k_proj", prefix + "v_proj")
    assert q.group.name == k.group.name == "trivial"
    assert "mul" in "; ".join(tr.why[q.name])
    assert repr(v.group) == repr(Blocks(HEADS, Perm()))


def test_llama_grouped_query_attention_fixes_the_values_and_says_so():
    tr = traced(llama(kv_heads=2))
    v = spaces_of(tr.spec, "layers.0.self_attn.v_proj")[0]
    assert v.group.name == "trivial"
    assert "grouped-query attention" in "; ".join(tr.why[v.name])


def test_gpt2_packed_projection_fixes_its_heads_and_says_so():
    """``c_attn`` writes Q, K and V side by side and the model ``split``s them: one parameter axis over three
    spaces is not a spec the library has, so its output and ``c_proj``'s input stay fixed, naming the split."""
    tr = traced(gpt2())
    out = spaces_of(tr.spec, "h.0.attn.c_attn")[0]
    assert out.group.name == "trivial" and "split" in "; ".join(tr.why[out.name])
    into = tr.spec.site("h.0.attn.c_proj").in_space
    assert tr.spec.space(into).group.name == "trivial" and "split" in "; ".join(tr.why[into])
