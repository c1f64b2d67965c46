"""Do an INR's gradient features carry its class? Linear probes on the features GradMetaNet reads in ws-bench.

On the quick ws-bench zoo (600 digit INRs, each from its own initialisation), the decomposed gradients at 64 fixed
pixels (``experiments.inr_edit.inr_gradient_sets``) are read three ways by a logistic regression (train INRs, test
INRs scored): all features flattened in pixel order, the output neuron's value at each pixel (the image itself at
64 points), and the same values sorted (a bag of values: what a set-invariant reader could see without the pixel
coordinates). Prints a table and writes JSON with provenance.

    OMP_NUM_THREADS=1 python benchmarks/inr_gradient_probe.py --out benchmarks/results/inr_gradient_probe.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from sklearn.linear_model import LogisticRegression

from gradmetanet.zoos.inr import InrZooConfig, grid_coordinates, load_or_generate_inr_zoo
from gradmetanet.experiments.inr_edit import inr_gradient_sets, inr_spec
from gradmetanet.provenance import provenance
from gradmetanet.zoos import default_cache_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--points", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    zoo = load_or_generate_inr_zoo(InrZooConfig(n_images=args.images), default_cache_dir())
    spec = inr_spec()
    order = torch.randperm(28 * 28, generator=torch.Generator().manual_seed(1234))[:args.points]
    features = inr_gradient_sets(zoo.params, grid_coordinates()[order], spec)          # [M, K, N, 2]
    output = features[:, :, -1, 0]                                                     # the image at K pixels
    inputs = {"all features, pixel order": features.flatten(1), "output values, pixel order": output,
              "output values, sorted (a bag)": output.sort(1).values}
    train, test = zoo.splits["train"], zoo.splits["test"]
    rows = {}
    for name, x in inputs.items():
        clf = LogisticRegression(max_iter=3000).fit(x[train].numpy(), zoo.labels[train].numpy())
        rows[name] = clf.score(x[test].numpy(), zoo.labels[test].numpy())
    print("| probe input | test accuracy |\n|---|---:|")
    for name, acc in rows.items():
        print(f"| {name} | {100 * acc:.1f}% |")
    if args.out:
        Path(args.out).write_text(json.dumps({"accuracy": rows, "inrs": len(zoo), "points": args.points,
                                              "provenance": provenance("cpu")}, indent=2))


if __name__ == "__main__":
    main()
