"""What GradMetaNet costs on transformer gradient sets, against sequence length and width.

    python benchmarks/metanet_transformer.py [--lengths 8 16 32 64] [--widths 16 32 64 128]
        [--out benchmarks/results/metanet_transformer_cpu.json]

Base network: :class:`gradmetanet.models.CausalTransformer` (2 blocks, 4 heads, pre-LN, vocabulary 64),
batch of 8 sequences, its gradients captured on a next-token loss. Tokens are set elements (the
paper's choice), so a batch of ``b`` sequences of ``T`` tokens is a set of ``b T`` elements over
``N`` neurons (vocabulary in and out, positions, residual, per block Q/K, V/O and FFN hidden).
Each cell times the capture (forward + backward of the base model) and one forward + backward of
GradMetaNet (pooled product head) and of its same-example head (median of interleaved repeats).
The exponents are least-squares slopes of log time against log ``T`` and log ``d``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from gradmetanet import GradientBatch, GradientCapture
from gradmetanet.models import CausalTransformer
from gradmetanet.metanets import GradMetaNet
from gradmetanet.timing import interleaved_median_times

from common import machine, slope, write_json

VOCAB, BATCH, HIDDEN = 64, 8, 32
MODELS = {"gradmetanet": lambda: GradMetaNet(hidden=HIDDEN, set_layers=2, neuron_layers=1),
          "gradmetanet_set_head": lambda: GradMetaNet(hidden=HIDDEN, set_layers=2, neuron_layers=1, head="set_product")}


def measure(d: int, T: int, repeats: int) -> dict:
    torch.manual_seed(0)
    base = CausalTransformer(VOCAB, d=d, heads=4, blocks=2, max_len=T)
    ids, targets = torch.randint(VOCAB, (BATCH, T)), torch.randint(VOCAB, (BATCH, T))

    def capture() -> GradientBatch:
        base.zero_grad(set_to_none=True)
        with GradientCapture(base) as cap:
            F.cross_entropy(base(ids).flatten(0, 1), targets.flatten()).backward()
        return GradientBatch.from_gradient_sets(cap.gradients)

    batch = capture()
    models = {name: make() for name, make in MODELS.items()}

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            sum(v.sum() for v in model(batch).values()).backward()
        return run

    times = interleaved_median_times({"capture": capture, **{n: step(m) for n, m in models.items()}},
                                     repeats=repeats, warmup=1)
    return {"d": d, "T": T, "set_size": batch.set_size, "n_neurons": batch.spec.n_neurons,
            "n_params": batch.spec.n_params, "ms": {k: 1e3 * v for k, v in times.items()}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/metanet_transformer_cpu.json")
    args = parser.parse_args(argv)
    by_length = [measure(32, T, args.repeats) for T in args.lengths]
    by_width = [measure(d, 8, args.repeats) for d in args.widths]
    names = ["capture", *MODELS]
    exponents = {n: {"T": slope([r["T"] for r in by_length], [r["ms"][n] for r in by_length]),
                     "d": slope([r["d"] for r in by_width], [r["ms"][n] for r in by_width])} for n in names}
    result = {"benchmark": "metanet_transformer", **machine("cpu"), "batch": BATCH, "vocab": VOCAB, "hidden": HIDDEN,
              "base": "CausalTransformer, 2 blocks, 4 heads, pre-LN", "by_length": by_length, "by_width": by_width,
              "exponents": exponents}
    print(render(result))
    write_json(result, args.out)
    return result


def render(result: dict) -> str:
    names = list(result["exponents"])
    lines = [f"Transformer gradient sets, {result['batch']} sequences, metanetwork hidden {result['hidden']}, "
             f"{result['device_name']} ({result['threads']} threads, torch {result['torch']}); ms per forward + backward",
             "", "| d | T | set size | neurons | parameters | " + " | ".join(names) + " |",
             "|---:|---:|---:|---:|---:|" + "---:|" * len(names)]
    for r in result["by_length"] + result["by_width"]:
        lines.append(f"| {r['d']} | {r['T']} | {r['set_size']} | {r['n_neurons']} | {r['n_params']:,} | "
                     + " | ".join(f"{r['ms'][n]:.1f}" for n in names) + " |")
    lines += ["", "| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names),
              "| exponent in T | " + " | ".join(f"{result['exponents'][n]['T']:.2f}" for n in names) + " |",
              "| exponent in d | " + " | ".join(f"{result['exponents'][n]['d']:.2f}" for n in names) + " |"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
