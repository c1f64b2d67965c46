"""LoRA sets: PEFT's file format read and written, numeric layer order, scalings, GL(r) per layer."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from gradmetanet.lora import LoraBatch, LoraLayer, LoraSet, UnsupportedAdapterError
from gradmetanet.testing import check_symmetry

PATHS = ["model.layers.2.q", "model.layers.10.q", "model.layers.2.v"]


def write_adapter(directory, ranks, config=None, extra=None, shapes=((6, 5), (6, 5), (4, 5)), seed=0):
    """An adapter directory as PEFT writes it (keys sorted as text by safetensors on load)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, r, (out, inp) in zip(PATHS, ranks, shapes):
        tensors[f"base_model.model.{path}.lora_A.weight"] = torch.randn(r, inp, generator=gen, dtype=torch.float64)
        tensors[f"base_model.model.{path}.lora_B.weight"] = torch.randn(out, r, generator=gen, dtype=torch.float64)
    tensors.update(extra or {})
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q", "v"], **(config or {})}
    (directory / "adapter_config.json").write_text(json.dumps(cfg))
    return tensors


def test_reads_peft_files_in_numeric_order_with_each_layer_scaling(tmp_path):
    tensors = write_adapter(tmp_path, ranks=(4, 8, 4), config={"rank_pattern": {"layers.10.q": 8},
                                                                "alpha_pattern": {"v": 2}})
    lora = LoraSet.from_peft(tmp_path)
    assert lora.paths == ["model.layers.2.q", "model.layers.2.v", "model.layers.10.q"]   # not text order
    scalings = {layer.path: layer.scaling for layer in lora.layers}
    assert scalings == {"model.layers.2.q": 8 / 4, "model.layers.10.q": 8 / 8, "model.layers.2.v": 2 / 4}
    dw = lora.delta_weights()
    for path in PATHS:
        a, b = (tensors[f"base_model.model.{path}.lora_{k}.weight"] for k in "AB")
        torch.testing.assert_close(dw[path], scalings[path] * b @ a)
    assert lora.layer_shapes == {"model.layers.2.q": (6, 5), "model.layers.2.v": (4, 5), "model.layers.10.q": (6, 5)}


def test_rslora_and_fan_in_fan_out(tmp_path):
    write_adapter(tmp_path, ranks=(4, 4, 4), config={"use_rslora": True, "fan_in_fan_out": True})
    lora = LoraSet.from_peft(tmp_path)
    layer = lora.layers[0]
    assert layer.scaling == pytest.approx(8 / math.sqrt(4))
    assert lora.delta_weights()[layer.path].shape == (5, 6)              # the base layer stores [in, out]


def test_round_trip_through_peft_format(tmp_path):
    write_adapter(tmp_path / "a", ranks=(4, 8, 4), config={"rank_pattern": {"layers.10.q": 8}, "alpha_pattern": {"v": 2}})
    lora = LoraSet.from_peft(tmp_path / "a")
    lora.to_peft(tmp_path / "b")
    again = LoraSet.from_peft(tmp_path / "b")
    assert again.paths == lora.paths
    for x, y in zip(lora.layers, again.layers):
        assert torch.equal(x.A, y.A) and torch.equal(x.B, y.B) and x.scaling == pytest.approx(y.scaling)


@pytest.mark.parametrize("case, error", [
    ("conv", "convolutional LoRA"), ("dora", "DoRA"), ("embedding", "embeddings"), ("bin", "adapter_model.bin"),
    ("rank", "config says r = 4"), ("unpaired", "not both"),
])
def test_unsupported_or_broken_adapters_are_named(tmp_path, case, error):
    extra, config = {}, {}
    if case == "conv":
        extra = {"base_model.model.conv.lora_A.weight": torch.zeros(4, 3, 3, 3),
                 "base_model.model.conv.lora_B.weight": torch.zeros(6, 4, 1, 1)}
    elif case == "dora":
        config = {"use_dora": True}
    elif case == "embedding":
        extra = {"base_model.model.embed.lora_embedding_A": torch.zeros(4, 10)}
    elif case == "unpaired":
        extra = {"base_model.model.extra.lora_A.weight": torch.zeros(4, 5)}
    write_adapter(tmp_path, ranks=(4, 8 if case == "rank" else 4, 4), config=config, extra=extra)
    if case == "bin":
        (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises((UnsupportedAdapterError, ValueError, FileNotFoundError), match=error):
        LoraSet.from_peft(tmp_path)


def test_gl_symmetry_per_layer_with_the_harness(tmp_path):
    """dW is invariant under an independent GL(r) element per layer; the factors are not, and a change
    of one factor changes dW (the harness's sensitivity)."""
    write_adapter(tmp_path, ranks=(4, 4, 4))
    lora = LoraSet.from_peft(tmp_path)
    spec = lora.spec()
    assert [s.group.name for s in spec.spaces if s.name.endswith(":rank")] == ["gl"] * 3
    move = lambda x, g, sp: x.transform(g)                                  # noqa: E731
    check_symmetry(spec, LoraSet.delta_weights, lora, move, lambda y, g, sp: y, trials=3, atol=1e-9,
                   sensitivity=("fixed",))
    g = spec.sample(torch.Generator().manual_seed(1))
    assert not torch.allclose(lora.transform(g).layers[0].A, lora.layers[0].A)


def test_lora_batch_stacks_sets_of_one_base_model(tmp_path):
    sets = []
    for seed in range(3):
        write_adapter(tmp_path / str(seed), ranks=(4, 4, 4), seed=seed)
        sets.append(LoraSet.from_peft(tmp_path / str(seed)))
    batch = LoraBatch.stack(sets)
    assert len(batch) == 3 and batch.rank == 4 and batch.A["model.layers.2.q"].shape == (3, 4, 5)
    for i, s in enumerate(sets):
        for path, dw in s.delta_weights().items():
            torch.testing.assert_close(batch.delta_weights()[path][i], dw)
    other = LoraSet((LoraLayer("x", torch.zeros(4, 5), torch.zeros(6, 4), 1.0),))
    with pytest.raises(ValueError, match="other modules"):
        LoraBatch.stack([sets[0], other])
