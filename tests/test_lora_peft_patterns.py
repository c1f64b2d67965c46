"""rank_pattern / alpha_pattern keys are matched exactly as the installed PEFT matches them.

PEFT reads every key as a regular expression and wraps it in a group (``(.*\\.)?(KEY)$``), so an
alternation ``q_proj|v_proj`` binds inside the group. Each case builds the adapter with PEFT
itself and compares every layer's rank and scaling, and the model's outputs, with what
:meth:`LoraSet.from_peft` reads.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from peft.utils.other import get_pattern_key
from torch import nn

from gradmetanet.lora import LoraSet
from gradmetanet.lora.sets import pattern_key


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.q_proj(x)) * self.k_proj(x) + self.v_proj(x)


class Base(nn.Module):
    """Twelve blocks (``layers.1`` is a prefix of ``layers.10`` and ``layers.11``)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"attn": Attention(), "out": nn.Linear(6, 6)}) for _ in range(12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = torch.tanh(block["out"](block["attn"](x)))
        return x


def assert_same_outputs(base: nn.Module, lora: LoraSet, peft_model: nn.Module) -> None:
    """``base`` with every ``dW`` of ``lora`` merged computes what ``peft_model`` computes."""
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for path, dw in lora.delta_weights().items():
            merged.get_submodule(path).weight += dw
        x = torch.randn(5, 6, dtype=torch.float64)
        torch.testing.assert_close(merged(x), peft_model(x), atol=1e-12, rtol=0)


CASES = {
    "alternation (the issue's adapter)": dict(target_modules=["q_proj", "v_proj"], alpha_pattern={"q_proj|v_proj": 32}),
    "alternation in rank_pattern": dict(target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj|v_proj": 2}),
    "escaped dots, one layer": dict(target_modules=["q_proj", "v_proj", "out"],
                                    rank_pattern={r"layers\.1\.attn\.q_proj": 6}, alpha_pattern={r"layers\.1\.out": 3}),
    "unescaped dot and per-layer keys": dict(target_modules=["q_proj", "out"],
                                             rank_pattern={"layers.1.out": 2, "layers.10.attn.q_proj": 8}),
    "overlapping keys with one value": dict(target_modules=["q_proj", "k_proj", "v_proj"],
                                            alpha_pattern={"layers.2.attn.q_proj": 5, "q_proj": 5, "(q|k)_proj": 5},
                                            rank_pattern={"layers.2.attn.q_proj": 2, "q_proj": 2}),
    "character class and anchors inside a key": dict(target_modules=["q_proj", "k_proj", "out"],
                                                     rank_pattern={"layers.1[01].*": 2}, alpha_pattern={"[qk]_proj": 7}),
    "a part of a component matches nothing": dict(target_modules=["q_proj", "v_proj"], alpha_pattern={"_proj": 9}),
    "rsLoRA with patterns": dict(target_modules=["q_proj", "v_proj"], use_rslora=True,
                                 rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj|v_proj": 12}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ranks_and_scalings_equal_peft(case, tmp_path):
    torch.manual_seed(0)
    base = Base().double()
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **CASES[case])
    model = peft.get_peft_model(copy.deepcopy(base), config)
    model.save_pretrained(tmp_path)
    lora = LoraSet.from_peft(tmp_path)
    theirs = {name.removeprefix("base_model.model."): module for name, module in model.named_modules()
              if isinstance(module, peft.tuners.lora.LoraLayer)}
    assert sorted(lora.paths) == sorted(theirs)
    for layer in lora.layers:
        assert layer.rank == theirs[layer.path].r["default"], layer.path
        assert layer.scaling == pytest.approx(theirs[layer.path].scaling["default"], rel=1e-12), layer.path
    assert_same_outputs(base, lora, model)


OVERLAPPING = dict(target_modules=["q_proj", "k_proj"], alpha_pattern={"q_proj": 11, "(q|k)_proj": 13})


def test_overlapping_keys_with_different_values_are_refused(tmp_path):
    """PEFT sorts the keys when it writes the config, so it reloads such an adapter with another scaling than
    it trained with (shown here); the file cannot tell which, so it is refused, naming the keys."""
    torch.manual_seed(0)
    base = Base().double()
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                     **OVERLAPPING))
    model.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    trained_with = model.base_model.model.layers[0].attn.q_proj.scaling["default"]
    assert reloaded.base_model.model.layers[0].attn.q_proj.scaling["default"] != trained_with
    with pytest.raises(ValueError, match=r"layers.0.attn.q_proj.*several alpha_pattern keys.*'q_proj': 11"):
        LoraSet.from_peft(tmp_path)
    as_peft_reloads = LoraSet.from_peft(tmp_path, overlapping_patterns="first")
    assert_same_outputs(base, as_peft_reloads, reloaded)


def test_our_written_patterns_round_trip_through_peft(tmp_path):
    """An adapter read with patterns, written by to_peft, loads into PEFT with the same outputs."""
    torch.manual_seed(1)
    base = Base().double()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                             rank_pattern={"layers.1.attn.v_proj": 2}, alpha_pattern={"q_proj|v_proj": 32})
    model = peft.get_peft_model(copy.deepcopy(base), config)
    model.save_pretrained(tmp_path / "theirs")
    LoraSet.from_peft(tmp_path / "theirs").to_peft(tmp_path / "ours")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    x = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("keys", [["q_proj|v_proj"], [r"layers\.1\.q_proj", "q_proj"], ["layers.1.q_proj"],
                                  ["proj"], ["_proj"], ["a|b|q_proj"], ["(q|v)_proj$"], [".*"]])
@pytest.mark.parametrize("path", ["q_proj", "layers.1.q_proj", "layers.11.q_proj", "model.layers.1.v_proj",
                                  "layersX1.q_proj", "layers.1.k_proj"])
def test_pattern_key_is_peft_get_pattern_key(keys, path):
    """The pure-Python rule used when PEFT is not installed gives PEFT's answer."""
    assert pattern_key(keys, path) == get_pattern_key(keys, path)
