"""The LoRA experiment end to end on the tiny preset."""

from __future__ import annotations

import json
import re


def test_lora_tiny_run_writes_its_report(tmp_path):
    from gradmetanet.experiments import lora
    config = lora.config_from_preset("tiny")
    results = lora.run(config, tmp_path, progress=False)
    for name in ("results.json", "table.md", "accuracy.png", "learning_curves.png"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["targets"]) == {"membership", "accuracy", "data_size"}
    assert set(saved["targets"]["accuracy"]) == set(lora.MODELS)
    assert set(saved["unseen_rank"]) == set(lora.RANK_FREE)                    # rank-bound models are left out
    assert results["speed"]["speedup"] > 1
    table = (tmp_path / "table.md").read_text()
    assert "GL-net" in table and "rank-8" in table
    assert re.search(r"Converged \(.*GL-net \d/\d", table)


def test_language_model_lora_zoo_and_experiment(tmp_path):
    """LoRA fine-tunes of the small transformer on sections of the built-in corpus: labels are which sections
    and the held-out loss; every model runs on them, GL-net on an unseen rank too."""
    import torch

    from gradmetanet.zoos.lora_lm import LM_SITES
    from gradmetanet.experiments import lora
    config = lora.config_from_preset("lm-tiny", models=("glnet", "raw_mlp"))
    zoo = config.load_zoo(progress=False)
    assert zoo.sites == LM_SITES and zoo.membership.shape == (40, 8)
    assert ((zoo.membership.sum(1) >= 1) & (zoo.membership.sum(1) <= 3)).all()
    assert torch.isfinite(zoo.loss).all() and zoo.loss.std() > 0
    # the label is the merged model's held-out loss: recompute one from its adapter
    net, data = zoo.evaluation_data()
    assert abs(zoo.evaluate(zoo.merged(zoo.batch(slice(0, 1)).delta_weights(), 0), net, data)
               - zoo.loss[0].item()) < 1e-5
    results = lora.run(config, tmp_path, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["targets"]) == {"membership", "loss", "data_size"} and saved["corpus"].startswith("CPython")
    assert set(saved["unseen_rank"]) == {"glnet"} and results["speed"]["speedup"] > 1
    assert (tmp_path / "loss.png").stat().st_size > 0 and "held-out loss" in (tmp_path / "table.md").read_text()
