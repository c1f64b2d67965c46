"""LoRA sets as PEFT writes them: ragged ranks (rank_pattern) in a LoraBatch, GPT-2's fan_in_fan_out layers,
files that also hold modules_to_save heads or lora_B biases, embedding LoRA (refused by name)."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import test_hf_models as hf
from gradmetanet.lora import GLNet, LoraBatch, LoraSet
from gradmetanet.lora.sets import UnsupportedAdapterError
from test_lora_peft_patterns import Base


def peft_adapter(base: nn.Module, tmp_path, **config):
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **config))
    model.save_pretrained(tmp_path)
    return model


def test_ragged_ranks_stack_move_by_gl_and_feed_glnet(tmp_path):
    torch.manual_seed(0)
    base = Base().double()
    sets = []
    for i in range(3):
        torch.manual_seed(i)
        peft_adapter(base, tmp_path / str(i), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                     rank_pattern={"v_proj": 2})
        sets.append(LoraSet.from_peft(tmp_path / str(i)))
    batch = LoraBatch.stack(sets)
    assert set(batch.ranks.values()) == {2, 4} and batch.ranks["layers.0.attn.v_proj"] == 2
    with pytest.raises(ValueError, match="ranks .*rank_pattern"):
        batch.rank
    spec = batch.spec()
    assert spec.space("layers.0.attn.v_proj:rank").size == 2
    moved = batch.transform(spec.sample(torch.Generator().manual_seed(3)))
    for path, dw in batch.delta_weights().items():
        torch.testing.assert_close(moved.delta_weights()[path], dw)
        assert not torch.allclose(moved.A[path], batch.A[path])
    torch.manual_seed(0)
    model = GLNet(batch.layer_shapes, 2, hidden=8).double().eval()
    with torch.no_grad():
        torch.testing.assert_close(model(moved), model(batch))
    with pytest.raises(ValueError, match=r"other ranks than set 0 at \['layers.0.attn.q_proj'"):
        peft_adapter(base, tmp_path / "r8", r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                     rank_pattern={"v_proj": 2})
        LoraBatch.stack([sets[0], LoraSet.from_peft(tmp_path / "r8")])


def test_gpt2_fan_in_fan_out_layers_keep_their_layout_in_a_batch(tmp_path):
    base = hf.build("gpt2")
    model = peft_adapter(base, tmp_path, r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    lora = LoraSet.from_peft(tmp_path)
    batch = LoraBatch.stack([lora, lora])
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for path, dw in batch.delta_weights().items():
            assert dw.shape[1:] == merged.get_submodule(path).weight.shape
            torch.testing.assert_close(dw[1], lora.delta_weights()[path])
            merged.get_submodule(path).weight += dw[0]
        ids = torch.randint(hf.VOCAB, (2, hf.T))
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, atol=1e-10, rtol=1e-10)


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x)))


def test_files_with_heads_or_lora_biases_are_read_with_skip_non_lora(tmp_path):
    torch.manual_seed(0)
    model = peft_adapter(Classifier().double(), tmp_path, r=4, lora_alpha=8, target_modules=["proj"],
                         modules_to_save=["head"], lora_bias=True)
    with pytest.raises(UnsupportedAdapterError, match="skip_non_lora=True"):
        LoraSet.from_peft(tmp_path)
    with pytest.warns(UserWarning, match=r"left out \d+ tensors that are not LoRA factors: \[.*lora_B.bias"):
        lora = LoraSet.from_peft(tmp_path, skip_non_lora=True)
    assert lora.paths == ["proj"]
    torch.testing.assert_close(lora.delta_weights()["proj"], model.base_model.model.proj.get_delta_weight("default"))


class Embedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.proj = nn.Embedding(10, 6), nn.Linear(6, 6)

    def forward(self, ids):
        return self.proj(self.embed(ids))


def test_embedding_lora_is_refused_by_name(tmp_path):
    peft_adapter(Embedder(), tmp_path, r=2, lora_alpha=4, target_modules=["embed", "proj"])
    with pytest.raises(UnsupportedAdapterError, match="LoRA on embeddings is not supported"):
        LoraSet.from_peft(tmp_path)
