"""The learned-optimizer experiment end to end on a tiny configuration."""

from __future__ import annotations

import json

import pytest


def test_lopt_tiny_run_writes_its_report_and_resumes(tmp_path, monkeypatch):
    from gradmetanet.experiments import lopt
    config = lopt.config_from_preset("tiny", optimizers=("sgdm", "gradmetanet_ds"))
    results = lopt.run(config, tmp_path, progress=False)
    for name in ("results.json", "table.md", "loss_curves.png", "meta_training.png", "adam_grid.png",
                 "meta/sgdm.safetensors", "meta/gradmetanet_ds.ckpt"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved["tasks"]) == ["digits (hidden 32, split 1)", "digits (hidden 8, transfer)",
                                    "iris (hidden 32, transfer)"]
    for race in saved["tasks"].values():
        assert set(race["optimizers"]) == {"adam", "sgdm", "gradmetanet_ds", "shipped:mlp-small"}
        assert race["optimizers"]["adam"]["step_reduction"] == [1.0, 0.0]     # Adam against itself
        assert race["adam_lr"] in config.adam_grid
        assert race["adam_lr_interior"] is False                              # a two-point grid has no interior
    assert "widen the grid" in (tmp_path / "table.md").read_text()
    assert 'shipped "mlp-small"' in (tmp_path / "table.md").read_text()
    assert saved["tasks"] == json.loads(json.dumps(results["tasks"]))
    # a rerun finds the finished meta-training checkpoints and does not meta-train again
    from gradmetanet.lopt import pes
    monkeypatch.setattr(pes.PES, "estimate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-trained")))
    lopt.run(config, tmp_path, progress=False)


def test_finished_rule_files_resume_meta_training_without_checkpoints(tmp_path, monkeypatch):
    """In a fresh checkout the (ignored) checkpoints are gone; a rule file finished under the same meta-training
    settings is reused, with its record; a changed meta-training setting meta-trains again."""
    import torch

    from gradmetanet.experiments import lopt
    from gradmetanet.lopt import pes
    config = lopt.config_from_preset("tiny", optimizers=("ds",))
    rules, record = lopt.meta_train(config, tmp_path, progress=False)
    (tmp_path / "meta" / "ds.ckpt").unlink()
    monkeypatch.setattr(pes.PES, "estimate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-trained")))
    race_change = lopt.config_from_preset("tiny", optimizers=("ds",), eval_seeds=3, adam_grid=(0.1,))
    again, again_record = lopt.meta_train(race_change, tmp_path, progress=False)
    assert json.loads(json.dumps(again_record)) == json.loads(json.dumps(record))
    for k, v in rules["ds"].state_dict().items():
        torch.testing.assert_close(again["ds"].state_dict()[k], v)
    with pytest.raises(AssertionError, match="re-trained"):
        lopt.meta_train(lopt.config_from_preset("tiny", optimizers=("ds",), sigma=0.02), tmp_path, progress=False)


def test_warm_started_meta_training(tmp_path):
    import pytest
    import torch

    from gradmetanet.experiments import lopt
    config = lopt.config_from_preset("tiny", optimizers=("ds", "gradmetanet_ds"), warm_start="ds", warm_start_steps=1)
    rules, record = lopt.meta_train(config, tmp_path, progress=False)
    assert len(record["ds"]["loss"]) == config.meta_steps and record["gradmetanet_ds"]["steps"] == 1
    first = rules["gradmetanet_ds"].per_parameter[0].weight
    # one Adam step (meta-lr 1e-4) away from the DS weights, and from zero on the GradMetaNet features
    torch.testing.assert_close(first[:, :19], rules["ds"].per_parameter[0].weight, atol=1e-3, rtol=0)
    assert first[:, 19:].abs().max() < 1e-3
    bad = lopt.config_from_preset("tiny", optimizers=("gradmetanet_ds", "ds"), warm_start="ds")
    with pytest.raises(ValueError, match="meta-trained before"):
        lopt.meta_train(bad, tmp_path / "bad", progress=False)


def test_language_model_race_runs_every_transformer_rule(tmp_path):
    """The paper's LM task (CausalTransformer on the pydoc text): UNF and GradMetaNet + UNF meta-train on
    transformer parameters (tables, gains, packed Q/K/V) and race Adam; the corpus version is recorded."""
    import pytest

    from gradmetanet.experiments import lopt
    from gradmetanet.lopt.lm_task import LanguageModelTask

    pytest.importorskip("pydoc_data")
    config = lopt.config_from_preset("lm-tiny", optimizers=("unf", "gradmetanet_unf"), eval_seeds=1, horizon=10)
    results = lopt.run(config, tmp_path, progress=False)
    assert results["corpus"].startswith("CPython 3.")
    (race,) = results["tasks"].values()
    assert set(race["optimizers"]) == {"adam", "unf", "gradmetanet_unf"}
    from gradmetanet.lopt.rule_files import load_rule
    unf = load_rule(tmp_path / "meta" / "unf.safetensors")        # the rule file reads transformer signatures
    assert unf.state_dict().keys() == lopt.make_rule("unf", lopt.TRANSFORMER_SIGNATURES).state_dict().keys()
    task = LanguageModelTask(seed=1)
    assert task.spec.space(task.spec.site("blocks.0.attn:q").out_space).group.name == "blocks"
    assert len(task.train_ids) > 4 * len(task.test_ids) > 0
    assert int(task.x_test.max()) < task.vocab


def test_family_run_races_every_member_and_the_held_out_ones(tmp_path):
    from gradmetanet.experiments import lopt
    config = lopt.config_from_preset("family-tiny")
    results = lopt.run(config, tmp_path, progress=False)
    assert list(results["tasks"]) == ["digits:8:16 (split 1)", "mnist1d:8x8:16 (split 1)",
                                      "wine:8:16 (held out, split 1)"]
    assert "task family digits:8:16, mnist1d:8x8:16 (held out: wine:8:16)" in (tmp_path / "table.md").read_text()
    assert len(results["meta_training"]["ds"]["validation"]) == config.meta_steps
    for race in results["tasks"].values():          # DS also raced with its step multiplier tuned like Adam's lr
        tuned = race["learned_lr"]["ds"]
        assert set(race["optimizers"]) == {"adam", "ds", "ds@tuned"}
        assert tuned["grid"][str(tuned["lr"])] == min(tuned["grid"].values())
    assert "DS, lr x" in (tmp_path / "table.md").read_text()


def test_meta_training_can_start_from_a_shipped_rule(tmp_path):
    import pytest

    from gradmetanet.experiments import lopt
    from gradmetanet.lopt import load_rule
    from gradmetanet.lopt.rule_files import shipped_path
    config = lopt.config_from_preset("family-tiny", optimizers=("gradmetanet_ds",), init_from="digits-mlp-v0.2",
                                     meta_steps=1, evaluate_every=0)
    rules, _ = lopt.meta_train(config, tmp_path, progress=False)
    start = load_rule(shipped_path("digits-mlp-v0.2")).state_dict()
    moved = [(rules["gradmetanet_ds"].state_dict()[k] - v).abs().max().item() for k, v in start.items()]
    assert 0 < max(moved) < 2e-4                # one meta-step (Adam, lr 1e-4) away from the shipped rule
    bad = lopt.config_from_preset("family-tiny", optimizers=("ds",), init_from="digits-mlp-v0.2")
    with pytest.raises(ValueError, match="another kind of rule"):
        lopt.meta_train(bad, tmp_path / "bad", progress=False)


@pytest.mark.parametrize("optimizer", ["sgd", "learned"])
def test_a_diverging_run_is_recorded_not_raised(optimizer):
    """A learning rate that blows the model up (SGD: NaN losses; a learned rule: it refuses the non-finite
    gradient) ends the run as diverged, with infinite test losses from there on."""
    import math

    import torch

    from gradmetanet.experiments import lopt
    from gradmetanet.lopt import NetworkOptimizer, classification_task, deepsets_rule
    task = classification_task("digits:8:16")
    make = {"sgd": lambda m: torch.optim.SGD(m.parameters(), lr=1e12),
            "learned": lambda m: NetworkOptimizer(m, deepsets_rule(), lr=1e30)}[optimizer]
    curve = lopt.train_curve(task, make, seed=0, horizon=40, eval_every=5)
    assert curve.diverged and curve.test_loss[-1] == math.inf and len(curve.steps) == 8
    assert curve.trained < 40
