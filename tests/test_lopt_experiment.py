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
    assert set(saved["optimizers"]) == {"adam", "sgdm", "gradmetanet_ds"}
    assert saved["optimizers"]["adam"]["step_reduction"] == [1.0, 0.0]     # Adam against itself
    assert saved["adam_lr"] in config.adam_grid and saved["adam_lr"] == results["adam_lr"]
    # a rerun finds the finished meta-training checkpoints and does not meta-train again
    from gradmetanet.lopt import pes
    monkeypatch.setattr(pes.PES, "estimate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-trained")))
    lopt.run(config, tmp_path, progress=False)
