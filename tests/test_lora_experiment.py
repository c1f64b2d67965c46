"""The LoRA experiment end to end on the tiny preset."""

from __future__ import annotations

import json


def test_lora_tiny_run_writes_its_report(tmp_path):
    from gradmetanet.experiments import lora
    config = lora.config_from_preset("tiny")
    results = lora.run(config, tmp_path, progress=False)
    for name in ("results.json", "table.md", "accuracy.png"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["targets"]) == set(lora.TARGETS)
    assert set(saved["targets"]["accuracy"]) == set(lora.MODELS)
    assert set(saved["unseen_rank"]) == set(lora.RANK_FREE)                    # rank-bound models are left out
    assert results["speed"]["speedup"] > 1
    table = (tmp_path / "table.md").read_text()
    assert "GL-net" in table and "rank-8" in table
