"""Which change moves GradMetaNet on the curvature task: an ablation at a small training budget.

    python benchmarks/curvature_ablation.py [--train 400] [--epochs 20] [--variants a,b,...]
                                            [--out benchmarks/results/curvature_ablation_cpu.json]

Data: the SIREN zoo of the curvature experiment's ``cpu`` preset (``b = 128`` points, the 1024-point
target, 500 test and 250 validation networks), the first ``--train`` networks of its training pool.
Every variant is a GradMetaNet of about the experiment's size, trained with Adam 1e-3 (batch 32)
on the same loss; the error is the experiment's metric at the best-validation epoch. Variants add
one change at a time: the squared channels ``a^2, g^2``, the per-example path from the fixed
neurons into every set layer, per-network gradient scaling (:class:`~gradmetanet.features.GradientScale`),
a cosine schedule, the same-example (set product) head, and a loss in which every network weighs
the same (the others weigh networks by their size, as the metric does). Prints a Markdown table and writes JSON;
finished variants are kept in the JSON and skipped when it is run again.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from gradmetanet.zoos.siren import load_or_generate_siren_zoo
from gradmetanet.experiments import curvature
from gradmetanet.metanets import GradMetaNet
from gradmetanet import GradientBatch
from gradmetanet.metanets.training import evaluate_mse, fit_regression
from gradmetanet.features import flatten_weights

from common import machine, write_json

POOLED = dict(hidden=32, set_layers=2, neuron_layers=2, head_hidden=32)
SET_HEAD = dict(hidden=32, set_layers=2, neuron_layers=1, head_hidden=32, head="set_product", head_rank=32,
                head_layers=1, bias_product=True)
#: name -> (input mode, GradMetaNet keyword arguments, uses the fixed-neuron path, schedule); "squares":
#: ``a^2, g^2`` channels, "scale_free": those after GradientScale, "fixed": the fixed-neuron path,
#: "set_head": the same-example head
VARIANTS = {
    "paper": ("raw", POOLED, False, "constant"),
    "squares": ("squares", POOLED, False, "constant"),
    "squares+fixed": ("squares", POOLED, True, "constant"),
    "scale_free": ("scale_free", POOLED, False, "constant"),
    "scale_free+fixed": ("scale_free", POOLED, True, "constant"),
    "scale_free+fixed+cosine": ("scale_free", POOLED, True, "cosine"),
    "scale_free+fixed+set_head": ("scale_free", SET_HEAD, True, "constant"),
    "scale_free+fixed+set_head+equal_weights": ("scale_free", SET_HEAD, True, "constant"),
}
#: variants trained on the standardised scale-free targets ``F / output_scale`` (every network weighs the
#: same in the loss) instead of the common loss (networks weigh by their size, as in the metric)
EQUAL_WEIGHTS = ("scale_free+fixed+set_head+equal_weights",)


def fit_equal_weights(model, data: curvature.Prepared, train_idx, val_idx, test_idx, epochs: int, schedule: str):
    """Fit on standardised ``F / output_scale`` (model selection on it too); test error in the common units."""
    features = data.inputs("scale_free")
    scaled = (data.targets * data.target_std + data.target_mean) / data.output_scale
    targets = (scaled - scaled[train_idx].mean()) / scaled[train_idx].std()

    def predict(m, idx):
        return flatten_weights(m(GradientBatch(data.spec, features[idx])), data.spec)
    fit = fit_regression(model, predict, targets, train_idx, val_idx, test_idx, epochs, 32, 1e-3, 0,
                         schedule=schedule)
    fit.test = evaluate_mse(model, curvature.gradient_predictor(data, "scale_free"), test_idx, data.targets)
    return fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names (default: all)")
    parser.add_argument("--out", default="benchmarks/results/curvature_ablation_cpu.json")
    args = parser.parse_args()
    config = curvature.PRESETS["cpu"]
    zoo = load_or_generate_siren_zoo(config.zoo(), config.cache_dir)
    test_idx = torch.arange(config.n_test)
    val_idx = torch.arange(config.n_test, config.n_test + config.n_val)
    train_idx = torch.arange(config.n_test + config.n_val, config.n_test + config.n_val + args.train)
    test_var = zoo.target[test_idx].var().item()
    data = curvature.prepare(zoo, train_idx)
    scale = data.target_std ** 2 / test_var
    fixed = len(zoo.spec.fixed_neurons())
    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if out.exists() else {}
    for name in args.variants.split(","):
        if name in rows:
            continue
        mode, kwargs, fixed_path, schedule = VARIANTS[name]
        torch.manual_seed(0)
        model = GradMetaNet(2 if mode == "raw" else 4, fixed_neurons=fixed if fixed_path else 0, **kwargs)
        start = time.perf_counter()
        if name in EQUAL_WEIGHTS:
            fit = fit_equal_weights(model, data, train_idx, val_idx, test_idx, args.epochs, schedule)
        else:
            fit = fit_regression(model, curvature.gradient_predictor(data, mode), data.targets, train_idx, val_idx,
                                 test_idx, args.epochs, 32, 1e-3, 0, schedule=schedule)
        rows[name] = {"test": fit.test * scale, "best_epoch": fit.best_epoch, "seconds": time.perf_counter() - start,
                      "parameters": sum(p.numel() for p in model.parameters())}
        print(f"{name}: {rows[name]['test']:.4f} ({rows[name]['seconds']:.0f} s)", flush=True)
        standard = ((zoo.standard[test_idx] - zoo.target[test_idx]).square().mean() / test_var).item()
        write_json({"benchmark": "curvature_ablation", "train_networks": args.train, "epochs": args.epochs,
                    "standard_estimator": standard, "rows": rows, "machine": machine("cpu")}, str(out))
    print(f"\n{args.train} training networks, {args.epochs} epochs; metric: {curvature.METRIC}\n")
    print("| variant | params | error | best epoch |\n|---|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['parameters']:,} | {row['test']:.4f} | {row['best_epoch'] + 1} |")


if __name__ == "__main__":
    main()
