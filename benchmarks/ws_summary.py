"""Every weight-space task of the library in one table (issue 26): INR classification, generalisation prediction
and the LoRA tasks, read from the results folders the experiments wrote, beside the published numbers.

For each task the table gives the best model of each kind (chosen by its test mean over seeds, as each
experiment's own table reports it; each model's settings were chosen on validation inside its experiment):
a classical baseline (StatNN's tensor statistics, a probe of what the network computes, or an MLP on a LoRA's
singular values or dense update), a weight-space model (DWSNet, GMN, ScaleGMN, or GL-net on LoRA factors),
GradMetaNet on gradient sets, and a weight-space model reading gradient features too. Prints Markdown, writes
JSON with provenance and a PNG beside it.

    python benchmarks/ws_summary.py --out benchmarks/results/ws_summary_cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gradmetanet.experiments import generalisation as gen
from gradmetanet.experiments import lora as lora_experiment
from gradmetanet.experiments import ws_bench
from gradmetanet.plots import figure
from gradmetanet.provenance import provenance

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("classical", "weights", "gradients", "weights + gradients")


def _read(folder: Path) -> dict | None:
    path = folder / "results.json"
    return json.loads(path.read_text()) if path.exists() else None


def _best(candidates: dict[str, tuple[float, float | None]]) -> dict | None:
    """The candidate ``{label: (mean, std)}`` with the highest mean, as ``{"model", "mean", "std"}``."""
    if not candidates:
        return None
    label = max(candidates, key=lambda k: candidates[k][0])
    return {"model": label, "mean": candidates[label][0], "std": candidates[label][1]}


def inr_classification(results: dict) -> dict:
    models = results["models"]

    def pick(names):
        return _best({ws_bench.LABELS[n]: (100 * models[n]["accuracy"]["original"]["mean"],
                                  100 * models[n]["accuracy"]["original"]["std"]) for n in names if n in models})
    return {"task": "INR classification", "data": f"{results['zoo']['inrs']} digit INRs (28 x 28 SIRENs)",
            "metric": "test accuracy %", "published": "ScaleGMN-B 96.59, DWSNets 85.71 (MNIST INRs, 70K)",
            "classical": pick(ws_bench.CLASSICAL), "weights": pick(ws_bench.WEIGHT_BACKBONES),
            "gradients": pick(["gradmetanet"]), "weights + gradients": pick([f"{b}+grad" for b in ws_bench.WEIGHT_BACKBONES])}


def generalisation(results: dict, zoo: str) -> dict:
    row = results["zoos"][zoo]
    models = {n: m for n, m in row["models"].items() if m.get("tau", {}).get("mean") is not None}

    def pick(names):
        return _best({gen.LABELS[n]: (models[n]["tau"]["mean"], models[n]["tau"]["std"]) for n in names if n in models})
    weights = [n for n in models if n not in gen.CLASSICAL + gen.GRADIENT_MODELS]
    published = {"cnn-tanh": "NFN-HNP 0.934, StatNN 0.915 (Small CNN Zoo, CIFAR-10-GS)"}.get(zoo, "-")
    return {"task": f"generalisation prediction ({zoo})", "data": f"{row['networks']} digit classifiers",
            "metric": "Kendall tau", "published": published, "classical": pick(gen.CLASSICAL), "weights": pick(weights),
            "gradients": pick(gen.GRADIENT_MODELS), "weights + gradients": None}


def lora(results: dict, target: str, metric: str, data: str) -> dict:
    models = results["targets"][target]

    def pick(names):
        return _best({lora_experiment.LABELS[n]: (models[n][metric], None) for n in names if n in models})
    return {"task": f"LoRA: {target.replace('_', ' ')}", "data": data,
            "metric": "bit accuracy" if metric == "bit_accuracy" else "R^2", "published": "-",
            "classical": pick(["spectrum_mlp", "dense_mlp"]), "weights": pick(["glnet"]), "gradients": None,
            "weights + gradients": None}


def summary(results_dir: Path) -> list[dict]:
    rows = []
    if (r := _read(results_dir / "ws-bench-cpu")) is not None:
        rows.append(inr_classification(r))
    if (r := _read(results_dir / "generalisation-cpu")) is not None:
        rows += [generalisation(r, zoo) for zoo in r["zoos"]]
    if (r := _read(results_dir / "lora-cpu")) is not None:
        data = f"{r['zoo']['loras']} rank-{r['zoo']['rank']} LoRAs of a digits MLP"
        rows += [lora(r, "membership", "bit_accuracy", data), lora(r, "accuracy", "r2", data)]
    if (r := _read(results_dir / "lora-lm-quick-cpu")) is not None:
        data = f"{r['zoo']['loras']} rank-{r['zoo']['rank']} LoRAs of a small language model (pydoc text)"
        rows += [lora(r, "membership", "bit_accuracy", data), lora(r, "loss", "r2", data)]
    return rows


def _cell(entry: dict | None, digits: int) -> str:
    if entry is None:
        return "n/a"
    std = f" ± {entry['std']:.{digits}f}" if entry["std"] else ""
    return f"{entry['model']}: {entry['mean']:.{digits}f}{std}"


def markdown(rows: list[dict]) -> str:
    lines = ["| task | data (ours) | metric | " + " | ".join(KINDS) + " | published |",
             "|---|---|---|" + "---|" * len(KINDS) + "---|"]
    for row in rows:
        digits = 1 if row["metric"].endswith("%") else 3
        lines.append(f"| {row['task']} | {row['data']} | {row['metric']} | "
                     + " | ".join(_cell(row[k], digits) for k in KINDS) + f" | {row['published']} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    with figure(path, "task", "score (accuracy as a fraction, tau, R^2)", "Weight-space tasks: the best model of each "
                "kind", size=(10, 4.5), legend_outside=True) as ax:
        width = 0.8 / len(KINDS)
        for i, kind in enumerate(KINDS):
            values = [(row[kind]["mean"] / (100 if row["metric"].endswith("%") else 1)) if row[kind] else 0.0
                      for row in rows]
            ax.bar([j + i * width for j in range(len(rows))], values, width, label=kind)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], [r["task"] for r in rows], rotation=25,
                      ha="right", fontsize=7)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(ROOT / "results"), help="the folder holding the results folders")
    parser.add_argument("--out", default=None, help="JSON file (a PNG beside it)")
    args = parser.parse_args(argv)
    rows = summary(Path(args.results))
    table = markdown(rows)
    print(table)
    result = {"rows": rows, "markdown": table, "provenance": provenance("cpu")}
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        plot(rows, out.with_suffix(".png"))
        print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
