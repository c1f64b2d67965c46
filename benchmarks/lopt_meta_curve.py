"""How the learned optimizers' race moves with meta-training length (issue 24): meta-steps vs steps to Adam's best.

For each rule, PES meta-trains it as ``gradmetanet run lopt --preset PRESET`` does (same task, PES settings and
seed; no meta-validation: every snapshot is the rule as trained so far) and, every ``--every`` meta-steps, races
the rule as it stands against Adam tuned on its grid (the preset's race on the meta-training task's unseen
split, ``--eval-seeds`` seeds). Reports seconds per meta-step on this machine, and per snapshot the seeds that
reach Adam's best test loss within the horizon, the steps they need (x fewer than Adam) and the best test loss,
so a reader can extrapolate towards the paper's 50,000 meta-steps. Resumable: the PES checkpoint and every
finished snapshot live in ``--work``; a rerun continues where it stopped. Prints a Markdown table, writes JSON
with provenance and a PNG.

    OMP_NUM_THREADS=1 python benchmarks/lopt_meta_curve.py --out benchmarks/results/lopt_meta_curve_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch

from gradmetanet.experiments import lopt
from gradmetanet.lopt import MetaTrainer
from gradmetanet.lopt.optimizers import make_rule
from gradmetanet.metanets import LINEAR_SIGNATURES
from gradmetanet.plots import figure
from gradmetanet.provenance import provenance


def snapshot_row(step: int, seconds: float, race: dict, name: str) -> dict:
    """One point of the curve from a race's result."""
    row = race["optimizers"][name]
    return {"meta_step": step, "meta_seconds": seconds, "reached": row["reached_adam_best"],
            "steps_to_adam_best": row["steps_to_adam_best"], "step_reduction": row["step_reduction"],
            "best_test_loss": row["best_test_loss"], "adam_best_test_loss": race["optimizers"]["adam"]["best_test_loss"],
            "adam_lr": race["adam_lr"]}


def curve(name: str, config: lopt.LoptConfig, every: int, work: Path, done: list[dict], progress: bool
          ) -> Iterator[list[dict]]:
    """The curve of rule ``name``, ``done`` (points finished before) extended point by point to
    ``config.meta_steps``; yields the points after each new one. PES runs without meta-validation: each point is
    the rule as trained so far, not the best one seen."""
    torch.manual_seed(config.seed)
    rule = make_rule(name, LINEAR_SIGNATURES)
    trainer = MetaTrainer(lopt.make_task(config), rule, lopt.pes_config(replace(config, evaluate_every=0),
                                                                        config.meta_steps), work / f"{name}.ckpt")
    task = next(iter(lopt.race_tasks(config).values()))
    points = list(done)
    for step in range(0, config.meta_steps + 1, every):
        if any(p["meta_step"] == step for p in points):
            continue
        start = time.perf_counter()
        trainer.train(steps=step, progress=progress)
        spent = time.perf_counter() - start
        before = max((p for p in points if p["meta_step"] < step), key=lambda p: p["meta_step"], default=None)
        seconds = spent + (before["meta_seconds"] if before else 0.0)
        points.append(snapshot_row(step, seconds, lopt.race(task, {name: rule}, config, False), name))
        points.sort(key=lambda p: p["meta_step"])
        yield points


def plot(curves: dict[str, list[dict]], path: Path) -> None:
    """Best test loss of each rule's snapshots against meta-steps, with tuned Adam's as a line."""
    with figure(path, "meta-steps", "best test loss within the horizon", "race vs meta-training length") as ax:
        for name, points in curves.items():
            ax.plot([p["meta_step"] for p in points], [p["best_test_loss"][0] for p in points], marker="o",
                    label=f"{lopt.label_of(name)} (labels: seeds reaching Adam's best)")
            for p in points:
                ax.annotate(p["reached"], (p["meta_step"], p["best_test_loss"][0]), fontsize=7)
        if curves:
            ax.axhline(next(iter(curves.values()))[0]["adam_best_test_loss"][0], color="k", ls="--",
                       label="Adam (tuned)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--rules", nargs="+", default=["gradmetanet_ds", "ds"])
    parser.add_argument("--meta-steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--eval-seeds", type=int, default=3)
    parser.add_argument("--work", default="runs/lopt-meta-curve", help="PES checkpoints and finished points")
    parser.add_argument("--out", default=None, help="JSON file for the results (a PNG beside it)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    saved = work / "points.json"
    curves: dict[str, list[dict]] = json.loads(saved.read_text()) if saved.exists() else {}
    for name in args.rules:
        config = lopt.config_from_preset(args.preset, optimizers=(name,), meta_steps=args.meta_steps,
                                         eval_seeds=args.eval_seeds)
        for points in curve(name, config, args.every, work, curves.get(name, []), not args.quiet):
            curves[name] = points
            saved.write_text(json.dumps(curves, indent=2))
    print("| rule | meta-steps | meta-training seconds | reached Adam's best | x fewer steps | best test loss "
          "(Adam) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, points in curves.items():
        for p in points:
            fewer = p["step_reduction"][0]
            print(f"| {lopt.label_of(name)} | {p['meta_step']} | {p['meta_seconds']:.0f} | {p['reached']} | "
                  f"{'-' if fewer != fewer else f'{fewer:.2f}'} | {p['best_test_loss'][0]:.3f} "
                  f"({p['adam_best_test_loss'][0]:.3f}) |")
    if args.out:
        Path(args.out).write_text(json.dumps({"preset": args.preset, "every": args.every, "curves": curves,
                                              "provenance": provenance("cpu")}, indent=2))
        plot(curves, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
