"""PEFT as the real peer: its adapters load exactly, and ours load back into PEFT with identical outputs."""

from __future__ import annotations

import copy

import peft   # a test dependency: the interop tests run, never skip
import torch
from torch import nn

from gradmetanet.lora import LoraLayer, LoraSet


class Base(nn.Module):
    """A plain torch model with 11 blocks (so that layers.10 sorts before layers.2 as text)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(5, 6), "v": nn.Linear(6, 5)}) for _ in range(11))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = torch.tanh(block["v"](torch.tanh(block["q"](x))))
        return x


def merged(base: nn.Module, lora: LoraSet) -> nn.Module:
    """A copy of ``base`` with ``W + dW`` in every adapted layer."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for path, dw in lora.delta_weights().items():
            model.get_submodule(path).weight += dw
    return model


def test_installing_peft_left_torch_alone():
    assert torch.__version__.startswith("2.13.0")


def test_adapters_made_by_peft_load_exactly(tmp_path):
    torch.manual_seed(0)
    base = Base().double()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], rank_pattern={"layers.10.q": 8},
                             alpha_pattern={"v": 2}, init_lora_weights=False, use_rslora=False)
    model = peft.get_peft_model(copy.deepcopy(base), config)
    model.save_pretrained(tmp_path)
    lora = LoraSet.from_peft(tmp_path)
    assert lora.paths[:4] == ["layers.0.q", "layers.0.v", "layers.1.q", "layers.1.v"] and len(lora) == 22
    assert {layer.path: layer.rank for layer in lora.layers}["layers.10.q"] == 8
    x = torch.randn(7, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(merged(base, lora)(x), model(x), atol=1e-12, rtol=0)


def test_our_adapters_load_into_peft_with_identical_outputs(tmp_path):
    torch.manual_seed(1)
    base = Base().double()
    layers = []
    for i in range(11):
        for name, (out, inp) in (("q", (6, 5)), ("v", (5, 6))):
            r = 6 if (i, name) == (3, "v") else 2
            layers.append(LoraLayer(f"layers.{i}.{name}", torch.randn(r, inp, dtype=torch.float64),
                                    torch.randn(out, r, dtype=torch.float64), 0.5 if name == "q" else 1.5))
    lora = LoraSet(tuple(layers))
    lora.to_peft(tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    x = torch.randn(7, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), merged(base, lora)(x), atol=1e-12, rtol=0)
    assert LoraSet.from_peft(tmp_path).layer_shapes == lora.layer_shapes
