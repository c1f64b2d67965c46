"""Generalisation prediction (`gradmetanet run generalisation`): the metrics, the weight statistics, the baselines
learning to rank a zoo, and the run's report."""

from __future__ import annotations

import json

import pytest
import torch

from gradmetanet.experiments import generalisation as g


def test_scores_are_kendall_tau_on_all_and_the_better_half_and_r2():
    true = torch.arange(10, dtype=torch.float64)
    s = g.scores(true * 2 + 1, true)                                  # a perfect ranking, wrong values
    assert s["tau"] == pytest.approx(1) and s["tau_top_half"] == pytest.approx(1)
    assert s["r2"] == pytest.approx(1 - 385 / 82.5)                   # sum (t + 1)^2 over sum (t - 4.5)^2
    s = g.scores(-true, true)
    assert s["tau"] == pytest.approx(-1) and s["tau_top_half"] == pytest.approx(-1)
    assert g.scores(true, true)["r2"] == pytest.approx(1)
    flipped_bottom = torch.cat([true[:5].flip(0), true[5:]])          # the worse half misranked, the better right
    s = g.scores(flipped_bottom, true)
    assert s["tau_top_half"] == pytest.approx(1) and s["tau"] < 1


def test_weight_statistics_per_tensor():
    params = {"w": torch.arange(12.0).reshape(2, 2, 3), "b": torch.tensor([[1.0, -3.0], [0.0, 0.0]])}
    stats = g.weight_statistics(params)
    assert stats.shape == (2, 16)
    first = torch.arange(6.0, dtype=torch.float64)
    expected = [first.mean(), first.std(), first.abs().mean(), 0.0, 1.25, 2.5, 3.75, 5.0]
    torch.testing.assert_close(stats[0, :8], torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(stats[0, 8:11], torch.tensor([-1.0, 8 ** 0.5, 2.0], dtype=torch.float64))


def test_baselines_rank_a_zoo_of_spread_accuracies(tmp_path):
    """60 ReLU MLPs trained 2-150 steps (test accuracies 9-90%): boosted trees on weight statistics and a ridge on
    each network's loss over 32 images both rank the 12 test networks with Kendall tau > 0.6 (0.82 each when
    written); the choice among candidates is made on validation and recorded."""
    config = g.config_from_preset("tiny", networks=60, zoo_steps=(2, 150), models=("statnn", "loss_probe"))
    results = g.run(config, tmp_path, progress=False)
    models = results["zoos"]["mlp-relu"]["models"]
    for name in ("statnn", "loss_probe"):
        assert models[name]["tau"]["mean"] > 0.6, (name, models[name]["tau"])
        assert "val_r2" in models[name]["runs"][0] and models[name]["runs"][0]["chosen"]


def test_tiny_run_writes_its_report_and_resumes(tmp_path):
    config = g.config_from_preset("tiny")
    results = g.run(config, tmp_path, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["zoos"]["mlp-relu"]["models"]) == set(g.MODELS)
    assert "provenance" in saved and (tmp_path / "tau.png").stat().st_size > 0
    assert (tmp_path / "learning_curves.png").stat().st_size > 0
    table = (tmp_path / "table.md").read_text()
    assert "| ScaleGMN |" in table and "Converged" in table and "NFN-HNP 0.934" in table
    again = g.run(config, tmp_path, progress=False)                 # every cell is read back, nothing retrained
    assert again["zoos"] == results["zoos"]
    public_only = g.config_from_preset("tiny", small_cnn_activation="relu")   # changes nothing on generated zoos
    assert g.run(public_only, tmp_path, progress=False, overwrite=True)["zoos"] == results["zoos"]
    with pytest.raises(ValueError, match="unknown models"):
        g.config_from_preset("tiny", models=("nfn",))


def test_a_model_that_cannot_read_the_zoo_is_marked_not_applicable(tmp_path):
    """DWSNet reads linear layers only: on the CNN zoo its row says n/a and why, instead of stopping the run."""
    config = g.config_from_preset("tiny", zoos=("cnn-tanh",), networks=20, models=("statnn", "dws"))
    results = g.run(config, tmp_path, progress=False)
    assert "not_applicable" in results["zoos"]["cnn-tanh"]["models"]["dws"]
    table = (tmp_path / "table.md").read_text()
    assert "| DWSNet | n/a | n/a | n/a |" in table and "n/a: DWSNet reads linear layers only" in table


def test_the_public_small_cnn_zoo_files_join_the_table(tmp_path):
    """Networks in the public file format (written here) are read with their published test accuracy; the models
    that need the networks' images are n/a, naming why; the others are scored."""
    from small_cnn_files import write_small_cnn_zoo
    from gradmetanet.models import small_cnn_zoo_template

    template = small_cnn_zoo_template("tanh")
    gen = torch.Generator().manual_seed(0)
    nets = [{k: torch.randn(v.shape, generator=gen) * (1 + i / 10) for k, v in template.state_dict().items()}
            for i in range(30)]
    accuracy = [0.1 + 0.02 * i for i in range(30)]                    # grows with the weights' scale
    nets.append(nets[0])                                              # an earlier checkpoint, left out
    write_small_cnn_zoo(tmp_path, nets, [f"86,tanh,{a}" for a in accuracy] + ["85,tanh,0.5"])
    config = g.config_from_preset("tiny", zoos=(), small_cnn_zoo_dir=str(tmp_path),
                                  models=("statnn", "loss_probe", "gradmetanet", "gmn"))
    results = g.run(config, tmp_path / "run", progress=False)
    public = results["zoos"]["small-cnn-zoo"]
    assert public["networks"] == 30 and public["test_accuracy"]["max"] <= max(accuracy) + 1e-6
    assert "public zoo files" in public["models"]["loss_probe"]["not_applicable"]
    assert "not_applicable" in public["models"]["gradmetanet"]
    assert public["models"]["statnn"]["tau"]["mean"] > 0.5               # the std of the weights gives it away
    assert "**small-cnn-zoo**" in (tmp_path / "run" / "table.md").read_text()


def test_a_zoo_made_by_zoo_make_joins_the_table(tmp_path):
    """``sharded_zoos``: a folder made by ``gradmetanet zoo make classifier`` is read (verified) and scored like a
    generated zoo; its cells depend on the zoo's manifest."""
    from gradmetanet.zoos.classifier import ClassifierZooConfig, make_sharded_classifier_zoo

    make_sharded_classifier_zoo(ClassifierZooConfig(architecture="mlp", activation="relu", networks=40,
                                                    steps=(5, 60)), tmp_path / "z", 16, progress=False)
    config = g.config_from_preset("tiny", zoos=(), sharded_zoos=(str(tmp_path / "z"),), models=("statnn", "gmn"))
    results = g.run(config, tmp_path / "run", progress=False)
    block = results["zoos"]["sharded:z"]
    assert block["networks"] == 40 and set(block["models"]) == {"statnn", "gmn"}
    assert "**sharded:z**" in (tmp_path / "run" / "table.md").read_text()
