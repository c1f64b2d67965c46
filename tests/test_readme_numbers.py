"""The README's "Results at a glance" quotes figures that a command wrote into a committed results file: each
figure below is read from its file, formatted as the README prints it, and must appear in the README's row.
A figure edited by hand, or a results folder rerun without updating the README, fails here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def results(folder: str) -> dict:
    return json.loads((ROOT / "results" / folder / "results.json").read_text())


def curvature(model: str, n: str = "2000") -> float:
    return results("curvature-cpu-0.8")["models"][model][n]["mean"]


def improvement(model: str) -> float:
    return 100 * results("curvature-cpu-0.8")["relative_improvement_over_standard"][model]["2000"]


def curvature_cell(key: str) -> dict:
    """The newest cell of ``key`` in the curvature folder's store (a later version's cell is written after)."""
    cells = json.loads((ROOT / "results" / "curvature-cpu-0.8" / "cells.json").read_text())["cells"]
    return [cell["value"] for cell in cells if cell["key"] == key][-1]


def curvature_std(model: str) -> float:
    return results("curvature-cpu-0.8")["models"][model]["2000"]["std"]


def curvature_seeds() -> int:
    """Seeds behind the folder's table, and 3 only if every fit of them converged."""
    converged = results("curvature-cpu-0.8")["converged"]
    flags = [flag for model in ("gradmetanet", "gradmetanet_set") for flag in converged[model]["2000"]]
    return len(results("curvature-cpu-0.8")["models"]["gradmetanet"]["2000"]["runs"]) if all(flags) else 0


def gradmetanet_pp_cell() -> dict:
    """GradMetaNet++'s seed-0 cell at 2000 networks (the folder's table has no row for it: one seed)."""
    return curvature_cell("gradmetanet++/2000/0")


def inr(backbone: str, variant: str) -> float:
    return 100 * results("inr-edit-cpu")["models"][backbone][variant]["mean"]


def generalisation(zoo: str, model: str) -> float:
    return results("generalisation-cpu")["zoos"][zoo]["models"][model]["tau"]["mean"]


def generalisation_std(zoo: str, model: str) -> float:
    return results("generalisation-cpu")["zoos"][zoo]["models"][model]["tau"]["std"]


def generalisation_fits_converged() -> str:
    """"" when every learned fit of both zoos converged (the README says so), else the count that did not."""
    flags = [flag for zoo in results("generalisation-cpu")["zoos"].values() for row in zoo["models"].values()
             for flag in row.get("converged", [])]
    return "" if all(flags) else f" except {flags.count(False)}"


def converged_inr_09(backbone: str, variant: str) -> float:
    return 100 * results("inr-edit-quick-converged-0.9")["models"][backbone][variant]["mean"]


def plateau_zoo(method: str, key: str, epochs: str | None = None) -> float:
    row = results("amortize-cpu-mnist1d-long")["mlp-tanh-mnist1d-long"]["lambda=0"][method]
    return (row[epochs] if epochs else row)[key]


def ws_bench(model: str, variant: str = "original") -> float:
    return 100 * results("ws-bench-cpu")["models"][model]["accuracy"][variant]["mean"]


def lora(target: str, model: str, metric: str) -> float:
    return results("lora-cpu")["targets"][target][model][metric]


def streamed(key: str) -> float:
    return json.loads((ROOT / "benchmarks" / "results" / "streamed_training_cpu.json").read_text())["rows"][0][key]


def compile_speedups(gradient_sets: bool) -> list[float]:
    """Step speed-ups of ``torch.compile`` (benchmarks/results/torch_compile_cpu.json): the GradMetaNet cases or the
    weight-space backbones'."""
    cases = json.loads((ROOT / "benchmarks" / "results" / "torch_compile_cpu.json").read_text())["cases"]
    return [c["speedup"] for name, c in cases.items() if name.startswith("gradmetanet") == gradient_sets]


def scaling(*keys: str) -> float:
    value = json.loads((ROOT / "benchmarks" / "results" / "metanet_scaling_cpu_0.9.json").read_text())
    for key in keys:
        value = value[key]
    return value


def ws_over_gradmetanet(quantity: str) -> float:
    return scaling("side_by_side", "ws_concat", quantity) / scaling("side_by_side", "gradmetanet", quantity)


#: (text that starts the README row, figure read from its results file, format the README prints it in)
FIGURES = [
    ("| training on a zoo larger than memory", lambda: streamed("zoo_bytes") / 2 ** 30, "**{:.2f} GiB** zoo"),
    ("| training on a zoo larger than memory", lambda: streamed("cap") / 2 ** 30, "under a **{:.2f} GiB**"),
    ("| training on a zoo larger than memory", lambda: streamed("test_mse"), "test MSE {:.4f}"),
    ("| training on a zoo larger than memory", lambda: streamed("mean_predictor_mse"), "(mean predictor {:.4f})"),
    ("| metanetwork training step", lambda: min(compile_speedups(False)), "`torch.compile` steps {:.1f}–"),
    ("| metanetwork training step", lambda: max(compile_speedups(False)), "–{:.2f}×, GradMetaNets"),
    ("| metanetwork training step", lambda: max(compile_speedups(True)), "GradMetaNets {:.1f}×"),
    ("| GradMetaNet vs a weight-space net", lambda: ws_over_gradmetanet("median_ms"), "**{:.1f}×** faster"),
    ("| GradMetaNet vs a weight-space net", lambda: ws_over_gradmetanet("peak_extra_bytes"), "{:.2f}× less memory (CPU"),
    ("| GradMetaNet vs a weight-space net", lambda: scaling("exponents", "gradmetanet", "b"), "grows as b^{:.2f}"),
    ("| GradMetaNet vs a weight-space net", lambda: scaling("exponents", "gradmetanet", "n_neurons"), "b^0.83, N^{:.2f},"),
    ("| GradMetaNet vs a weight-space net", lambda: scaling("exponents", "gradmetanet", "depth"), "depth^{:.2f} (Grad"),
    ("| GradMetaNet vs a weight-space net", lambda: scaling("exponents", "gradmetanet++", "b"), "GradMetaNet++: b^{:.2f},"),
    ("| GradMetaNet vs a weight-space net", lambda: scaling("exponents", "gradmetanet++", "n_neurons"), "N^{:.2f}, depth^1.31"),
    ("| GradMetaNet vs a weight-space net", lambda: scaling("exponents", "gradmetanet++", "depth"), "depth^{:.2f})"),
    ("| GradMetaNet vs the standard Fisher-diagonal estimator", lambda: improvement("gradmetanet"), "pooled head **{:.1f}% better**"),
    ("| GradMetaNet vs the standard Fisher-diagonal estimator", lambda: curvature("gradmetanet"), "({:.4f} ± 0.0002 vs"),
    ("| GradMetaNet vs the standard Fisher-diagonal estimator", lambda: curvature_std("gradmetanet"), "(0.0099 ± {:.4f} vs"),
    ("| GradMetaNet vs the standard Fisher-diagonal estimator", lambda: curvature("standard"), " vs {:.4f};"),
    ("| GradMetaNet vs the standard Fisher-diagonal estimator", lambda: improvement("gradmetanet_set"),
     "same-example head **{:.1f}% better**"),
    ("| GradMetaNet vs the standard Fisher-diagonal estimator", lambda: curvature("gradmetanet_set"), "({:.4f} ± 0.0002)"),
    ("| GradMetaNet vs the standard Fisher-diagonal estimator", lambda: curvature_std("gradmetanet_set"), "(0.0100 ± {:.4f})"),
    ("| GradMetaNet vs the standard Fisher-diagonal estimator", lambda: curvature_seeds(), "converged, {:d} seeds)"),
    ("| GradMetaNet++ vs the standard estimator", lambda: 100 * (1 - gradmetanet_pp_cell()["test"] / curvature("standard")),
     "1 seed: **{:.1f}% better** ("),
    ("| GradMetaNet++ vs the standard estimator", lambda: curvature("standard"), "(0.0100 vs {:.4f})"),
    ("| GradMetaNet++ vs the standard estimator", lambda: gradmetanet_pp_cell()["test"],
     "**9.8% better** ({:.4f} vs"),
    ("| GradMetaNet++ vs the standard estimator", lambda: 1 + gradmetanet_pp_cell()["best_epoch"],
     "best epoch {:d}, stopped"),
    ("| GradMetaNet++ vs the standard estimator", lambda: gradmetanet_pp_cell()["epochs_run"],
     "by patience at {:d})"),
    ("| Fisher trace, normalised MAE", lambda: results("fisher-trace-quick-cpu")["models"]["gradmetanet"]
     ["normalised_mae"], "{:.3f} vs"),
    ("| Fisher trace, normalised MAE", lambda: results("fisher-trace-quick-cpu")["models"]["mlp"]["normalised_mae"],
     "vs {:.3f}"),
    ("| INR editing (3 x 3 dilation)", lambda: inr("dws", "gradmetanet++"), "DWSNet {:.3f}"),
    ("| INR editing (3 x 3 dilation)", lambda: inr("dws", "probing"), "vs {:.3f}, GMN"),
    ("| INR editing (3 x 3 dilation)", lambda: inr("scalegmn", "ws"), "alone best: {:.3f}"),
    ("| INR editing (3 x 3 dilation)", lambda: converged_inr_09("scalegmn", "ws"), "ScaleGMN {:.3f} /"),
    ("| INR editing (3 x 3 dilation)", lambda: converged_inr_09("scalegmn", "gradmetanet"), "/ **{:.3f}** (the best"),
    ("| INR editing (3 x 3 dilation)", lambda: converged_inr_09("dws", "probing"), "DWSNet 0.607 / {:.3f} /"),
    ("| INR editing (3 x 3 dilation)", lambda: converged_inr_09("gmn", "ws"), "GMN {:.3f} /"),
    ("| INR editing (3 x 3 dilation)", lambda: converged_inr_09("gmn", "gradmetanet"), "/ {:.3f}: the paper's order"),
    ("| one-shot fine-tuning, CNN zoo", lambda: 100 * plateau_zoo("sgd", "mean_acc", "25"), "(SGD-25 {:.1f}%,"),
    ("| one-shot fine-tuning, CNN zoo", lambda: 100 * plateau_zoo("sgd", "mean_acc", "150"), "SGD-150 {:.1f}% from"),
    ("| one-shot fine-tuning, CNN zoo", lambda: 100 * plateau_zoo("before", "mean_acc"), "from {:.1f}%;"),
    ("| one-shot fine-tuning, CNN zoo", lambda: plateau_zoo("scalegmn_grad", "test_loss"), "lowest test loss of all ({:.3f}"),
    ("| one-shot fine-tuning, CNN zoo", lambda: plateau_zoo("sgd", "test_loss", "150"), "SGD-150 {:.3f})"),
    ("| generalisation prediction", lambda: generalisation("cnn-tanh", "loss_probe"), "loss probe **{:.3f}**"),
    ("| generalisation prediction", lambda: generalisation("cnn-tanh", "gradmetanet"), "identified) {:.3f} ±"),
    ("| generalisation prediction", lambda: generalisation_std("cnn-tanh", "gradmetanet"), "0.838 ± {:.3f}, GMN"),
    ("| generalisation prediction", lambda: generalisation("cnn-tanh", "gmn"), "GMN {:.3f}, StatNN"),
    ("| generalisation prediction", lambda: generalisation("cnn-tanh", "statnn"), "StatNN {:.3f}; ReLU"),
    ("| generalisation prediction", lambda: generalisation("mlp-relu", "gradmetanet"), "GradMetaNet **{:.3f} ±"),
    ("| generalisation prediction", lambda: generalisation_std("mlp-relu", "gradmetanet"), "0.763 ± {:.3f}**"),
    ("| generalisation prediction", lambda: generalisation("mlp-relu", "loss_probe"), "the probe {:.3f},"),
    ("| generalisation prediction", lambda: generalisation("mlp-relu", "statnn"), "StatNN {:.3f}, DWSNet"),
    ("| generalisation prediction", lambda: generalisation("mlp-relu", "dws"), "DWSNet {:.3f}, GMN"),
    ("| generalisation prediction", lambda: generalisation("mlp-relu", "gmn"), "GMN {:.3f}: gradients"),
    ("| generalisation prediction", generalisation_fits_converged, "every fit converged{}"),
    ("| INR classification from weights", lambda: ws_bench("gradmetanet"), "gradient sets **{:.1f}%**"),
    ("| INR classification from weights", lambda: ws_bench("gradmetanet", "symmetry"), "({:.1f}% under a random symmetry)"),
    ("| INR classification from weights", lambda: ws_bench("dws"), "(DWSNet {:.1f}%, GMN"),
    ("| INR classification from weights", lambda: ws_bench("gmn"), "GMN {:.1f}%, ScaleGMN"),
    ("| INR classification from weights", lambda: ws_bench("scalegmn"), "ScaleGMN {:.1f}%; StatNN"),
    ("| INR classification from weights", lambda: ws_bench("statnn"), "StatNN {:.1f}%)"),
    ("| INR classification from weights", lambda: ws_bench("dws+grad"), "backbone from chance (DWSNet {:.1f}%,"),
    ("| INR classification from weights", lambda: ws_bench("gmn+grad"), "GMN {:.1f}%, ScaleGMN"),
    ("| INR classification from weights", lambda: ws_bench("scalegmn+grad"), "ScaleGMN {:.1f}%) but none"),
    ("| INR classification from weights", lambda: ws_bench("probe"), "64 pixels {:.1f}% |"),
    ("| GL-net vs non-invariant baselines", lambda: lora("membership", "glnet", "bit_accuracy"), "**{:.3f} /"),
    ("| GL-net vs non-invariant baselines", lambda: lora("membership", "raw_mlp", "bit_accuracy"), "raw {:.3f} /"),
    ("| GL-net vs non-invariant baselines", lambda: lora("accuracy", "glnet", "r2"), "/ {:.3f}** vs"),
    ("| GL-net vs non-invariant baselines", lambda: lora("accuracy", "raw_mlp", "r2"), "raw 0.650 / {:.3f},"),
    ("| GL-net vs non-invariant baselines", lambda: lora("membership", "raw_mlp_gl_aug", "bit_accuracy"),
     "augmentation {:.3f} /"),
    ("| GL-net vs non-invariant baselines", lambda: lora("accuracy", "raw_mlp_gl_aug", "r2"), "/ {:.3f} (cpu preset"),
    ("| GL-net vs invariant baselines", lambda: lora("membership", "spectrum_mlp", "bit_accuracy"),
     "singular values ({:.3f} /"),
    ("| GL-net vs invariant baselines", lambda: lora("accuracy", "spectrum_mlp", "r2"), "/ {:.3f}) |"),
]


def readme_row(start: str) -> str:
    rows = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith(start)]
    assert len(rows) == 1, f"{len(rows)} README rows start with {start!r}"
    return rows[0]


@pytest.mark.parametrize("start, figure, form", FIGURES, ids=[f"{s[2:30]}:{f}" for s, _, f in FIGURES])
def test_readme_figure_matches_its_results_file(start, figure, form):
    expected = form.format(figure())
    assert expected in readme_row(start), f"README row {start!r} should quote {expected!r} (from its results file)"
