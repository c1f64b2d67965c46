"""ws-bench: INR classification by every backbone, and the function-preserving test sets it scores them on."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from torch.func import vmap

from gradmetanet.zoos.inr import render
from gradmetanet.experiments import ws_bench
from gradmetanet.experiments.inr_edit import inr_spec


def test_changed_test_networks_draw_the_same_images():
    """Every variant of a SIREN renders the image the original renders (the changes preserve the function), and
    the widened ones have the announced widths."""
    spec = inr_spec()
    gen = torch.Generator().manual_seed(0)
    params = {k: torch.randn(3, *s, generator=gen, dtype=torch.float64) * 0.3 for k, s in spec.param_shapes().items()}
    variants = ws_bench.changed_test_networks(params, spec, widen_by=4, seed=0)
    assert set(variants) == set(ws_bench.VARIANTS)
    images = vmap(render)(params)
    for name, (changed, changed_spec) in variants.items():
        assert {k: tuple(v.shape[1:]) for k, v in changed.items()} == dict(changed_spec.param_shapes()), name
        torch.testing.assert_close(vmap(render)(changed), images, atol=1e-10, rtol=0, msg=name)
    assert variants["widened_zero"][1].space("s1").size == 36 and variants["widened_split"][1].space("s2").size == 36
    assert not torch.equal(variants["symmetry"][0]["0.weight"], params["0.weight"])


def test_tiny_run_writes_its_table_and_equivariant_backbones_keep_their_score_under_symmetry(tmp_path):
    config = ws_bench.config_from_preset("tiny")
    results = ws_bench.run(config, tmp_path, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["models"]) == set(ws_bench.BACKBONES) and "provenance" in saved
    for name, row in saved["models"].items():
        acc = row["accuracy"]
        if ws_bench.reads_gradients(name):  # reads SIREN gradient sets: widened INRs are another architecture
            assert set(acc) == {"original", "permutation", "symmetry"}
            continue
        assert all(0.0 <= acc[v]["mean"] <= 1.0 for v in ws_bench.VARIANTS)
        assert acc["permutation"]["mean"] == acc["original"]["mean"], name       # equivariant: the same answers
    for name, row in saved["models"].items():       # the same logits, which at chance accuracy is what tells
        change = row["largest_logit_change"]
        assert change["permutation"] < 1e-5, name    # every model is permutation-equivariant (float32: ~2e-7)
        if name == "probe":                         # reads the function: every change keeps its answers
            assert max(change.values()) < 1e-4, change
            continue
        if name == "scalegmn":                      # ... and only ScaleGMN to the sine neurons' sign flips (with
            assert change["symmetry"] < 1e-5        # gradient features it inherits GradMetaNet's permutations)
        else:
            assert change["symmetry"] > 1e-4, name
        if not ws_bench.reads_gradients(name):      # widening is seen: a model of weights is not one of functions
            assert change["widened_zero"] > 1e-4, name
    table = (tmp_path / "table.md").read_text()
    assert "random symmetry" in table and "widened (split)" in table and "96.59" in table
    assert "| GradMetaNet (gradients) |" in table and "| n/a | n/a |" in table
    assert "| ScaleGMN + gradient features |" in table and "| StatNN (boosted trees) |" in table
    assert "Largest change of a test INR's logits under the random permutation" in table
    for png in ("accuracy.png", "learning_curves.png"):
        assert (tmp_path / png).stat().st_size > 0
    assert results["zoo"]["inrs"] == 40


def test_the_summary_lists_every_weight_space_task_from_the_committed_results(tmp_path):
    """benchmarks/ws_summary.py: one row per task (INR classification, both generalisation zoos, the LoRA tasks), the
    best model of each kind read from its results file, Markdown, JSON and a PNG."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "summary.json"
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "ws_summary.py"), "--out", str(out)],
                         capture_output=True, text=True, check=True)
    rows = {row["task"]: row for row in json.loads(out.read_text())["rows"]}
    assert {"INR classification", "generalisation prediction (cnn-tanh)", "LoRA: membership",
            "LoRA: accuracy", "LoRA: loss"} <= set(rows)
    generalisation = json.loads((root / "results" / "generalisation-cpu" / "results.json").read_text())
    cnn = generalisation["zoos"]["cnn-tanh"]["models"]
    best = max((n for n in ("dws", "gmn", "scalegmn", "flat_mlp") if "tau" in cnn[n]), key=lambda n: cnn[n]["tau"]["mean"])
    assert rows["generalisation prediction (cnn-tanh)"]["weights"]["mean"] == cnn[best]["tau"]["mean"]
    assert "| INR classification |" in run.stdout and out.with_suffix(".png").stat().st_size > 0
