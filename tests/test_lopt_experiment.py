"""The learned-optimizer experiment end to end on a tiny configuration."""

from __future__ import annotations

import json


def test_lopt_tiny_run_writes_its_report_and_resumes(tmp_path, monkeypatch):
    from gradmetanet.experiments import lopt
    config = lopt.config_from_preset("tiny", optimizers=("sgdm", "gradmetanet_ds"))
    results = lopt.run(config, tmp_path, progress=False)
    for name in ("results.json", "table.md", "loss_curves.png", "meta/sgdm.safetensors", "meta/gradmetanet_ds.ckpt"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved["tasks"]) == ["digits (hidden 32)", "digits (hidden 8, transfer)", "iris (hidden 32, transfer)"]
    for race in saved["tasks"].values():
        assert set(race["optimizers"]) == {"adam", "sgdm", "gradmetanet_ds"}
        assert race["optimizers"]["adam"]["step_reduction"] == [1.0, 0.0]     # Adam against itself
        assert race["adam_lr"] in config.adam_grid
    assert saved["tasks"] == json.loads(json.dumps(results["tasks"]))
    # a rerun finds the finished meta-training checkpoints and does not meta-train again
    from gradmetanet.lopt import pes
    monkeypatch.setattr(pes.PES, "estimate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-trained")))
    lopt.run(config, tmp_path, progress=False)
