"""Cost of capturing decomposed gradients, against a plain backward and dense per-example peers.

    python benchmarks/capture.py [--widths 128 512 1024] [--device cpu|cuda] [--out benchmarks/results/capture.json]
    python benchmarks/capture.py --model transformer [--widths 256] [--tokens 128] [--batch 16]

Base networks: MLPs ``w -> w -> w -> w`` (three linear layers, ReLU), batch 128, float32; or
(``--model transformer``) the causal LM of :class:`gradmetanet.models.CausalTransformer` with
``d = w``, 2 blocks, 8 heads (``nn.MultiheadAttention``), pre-LN, a 256-token vocabulary, sequences
of ``--tokens``, next-token cross-entropy.
Methods, each a full forward + backward of a cross-entropy batch loss:
  plain      the ordinary step, the reference (ratio 1.00);
  capture    the same under ``GradientCapture``, reading ``cap.gradients`` at the end;
  torch.func ``vmap(grad(...))`` dense per-example gradients;
  opacus     Opacus ``GradSampleModule`` dense per-example gradients (only when installed).
Time is the median of repeated runs, the methods interleaved run by run so that drifts in
machine speed hit all of them alike. Peak memory is measured in a fresh subprocess per cell:
on CPU the growth of the resident-set high-water mark (``VmHWM``, reset first) over the set-up, on CUDA
``torch.cuda.max_memory_allocated`` over the set-up. Prints a Markdown table, writes JSON.
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from gradmetanet import GradientCapture
from gradmetanet.models.mlp import make_mlp
from gradmetanet.models import CausalTransformer
from gradmetanet.timing import interleaved_median_times

from common import machine, peak_extra_bytes, run_child, write_json

METHODS = ["plain", "capture", "torch.func", "opacus"]


def has_opacus() -> bool:
    try:
        import opacus  # noqa: F401
    except ImportError:
        return False
    return True


class SequenceFirst(torch.nn.Module):
    """Runs a sequence-first attention on batch-first inputs (Opacus 1.6's DPMultiheadAttention checks a 2-D mask
    against the wrong axis under batch_first=True)."""

    def __init__(self, attn: torch.nn.Module) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, q, k, v, **kwargs):
        out, weights = self.attn(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), **kwargs)
        return out.transpose(0, 1), weights


def make_problem(model_kind: str, width: int, batch: int, tokens: int, device: str):
    """``(model, x, y, loss(logits, y))`` for one benchmark cell."""
    torch.manual_seed(0)
    if model_kind == "mlp":
        model = make_mlp([width] * 4, "relu").to(device)
        return model, torch.randn(batch, width, device=device), torch.randint(width, (batch,), device=device), \
            F.cross_entropy
    vocab = 256
    model = CausalTransformer(vocab, d=width, heads=8, blocks=2, max_len=tokens).to(device)
    x = torch.randint(vocab, (batch, tokens), device=device)
    y = torch.randint(vocab, (batch, tokens), device=device)
    return model, x, y, lambda logits, target: F.cross_entropy(logits.flatten(0, -2), target.flatten())


def make_step(method: str, model_kind: str, width: int, batch: int, tokens: int, device: str):
    """A closure running one step of ``method``, and a function returning the bytes it keeps."""
    model, x, y, loss_fn = make_problem(model_kind, width, batch, tokens, device)
    kept: dict[str, int] = {}
    if method == "plain":
        def step():
            model.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
    elif method == "capture":
        def step():
            model.zero_grad(set_to_none=True)
            with GradientCapture(model) as cap:
                loss_fn(model(x), y).backward()
            gs = cap.gradients
            kept["bytes"] = gs.nbytes()
            kept["dense_bytes"] = gs.dense_nbytes()
    elif method == "torch.func":
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss_one(p, xi, yi):
            return loss_fn(functional_call(model, p, (xi[None],)), yi[None])

        per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))

        def step():
            grads = per_example(params, x, y)
            kept["bytes"] = sum(g.numel() * g.element_size() for g in grads.values())
    elif method == "opacus":
        from opacus import GradSampleModule
        if model_kind == "transformer":
            from opacus.layers import DPMultiheadAttention
            for block in model.blocks:
                dp = DPMultiheadAttention(width, block.attn.num_heads).to(device)
                dp.load_state_dict(block.attn.state_dict())
                block.attn = SequenceFirst(dp)
        wrapped = GradSampleModule(model, loss_reduction="mean")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")

        def step():
            wrapped.zero_grad(set_to_none=True)
            loss_fn(wrapped(x), y).backward()
            kept["bytes"] = sum(p.grad_sample.numel() * p.grad_sample.element_size() for p in wrapped.parameters())
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return step, kept


def peak_memory(method: str, model_kind: str, width: int, batch: int, tokens: int, device: str) -> int:
    """Peak extra bytes of a few steps of ``method``, measured in a fresh process."""
    return run_child(__file__, [method, model_kind, str(width), str(batch), str(tokens), device])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mlp", choices=["mlp", "transformer"])
    parser.add_argument("--widths", type=int, nargs="+", default=None,
                        help="MLP widths (default 128 512 1024) or transformer d (default 256)")
    parser.add_argument("--batch", type=int, default=None, help="default 128 (MLP), 16 (transformer)")
    parser.add_argument("--tokens", type=int, default=128, help="sequence length of the transformer")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=None, help="default benchmarks/results/capture[_transformer].json")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        method, kind, width, batch, tokens, device = args.child
        print(peak_extra_bytes(make_step(method, kind, int(width), int(batch), int(tokens), device)[0], device))
        return {}
    transformer = args.model == "transformer"
    widths = args.widths or ([256] if transformer else [128, 512, 1024])
    batch = args.batch or (16 if transformer else 128)
    tokens = args.tokens if transformer else 1
    out = args.out or f"benchmarks/results/capture{'_transformer' if transformer else ''}.json"
    methods = [m for m in METHODS if m != "opacus" or has_opacus()]
    rows = []
    for width in widths:
        steps, kept, mems = {}, {}, {}
        for method in methods:
            steps[method], kept[method] = make_step(method, args.model, width, batch, tokens, args.device)
        times = interleaved_median_times(steps, repeats=args.repeats)
        for method in methods:
            mems[method] = peak_memory(method, args.model, width, batch, tokens, args.device)
        kept_bytes = {m: kept[m].get("bytes") for m in methods}
        dense_bytes = kept["capture"]["dense_bytes"]
        for method in methods:
            rows.append({
                "width": width, "method": method, "median_ms": 1e3 * times[method],
                "time_ratio_to_plain": times[method] / times["plain"], "peak_extra_bytes": mems[method],
                "per_example_bytes": kept_bytes[method], "dense_per_example_bytes": dense_bytes,
            })
    model = ("CausalTransformer d=w, 2 blocks, 8 heads, pre-LN, vocab 256, T=%d" % tokens if transformer
             else "MLP w-w-w-w (3 linear layers, ReLU)")
    result = {"benchmark": "capture", **machine(args.device), "batch": batch, "tokens": tokens, "dtype": "float32",
              "model": model, "rows": rows}
    print(render_table(result))
    write_json(result, out)
    return result


def render_table(result: dict) -> str:
    lines = [f"Capture cost, {result['model']}, batch {result['batch']}, {result['dtype']}, {result['device']} "
             f"({result['device_name']}, {result['threads']} threads, torch {result['torch']})", "",
             "| width | method | median ms | x plain | peak extra MiB | per-example storage MiB |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        stored = "-" if r["per_example_bytes"] is None else f"{r['per_example_bytes'] / 2**20:.2f}"
        if r["method"] == "capture":
            stored += f" (dense: {r['dense_per_example_bytes'] / 2**20:.1f})"
        lines.append(f"| {r['width']} | {r['method']} | {r['median_ms']:.2f} | {r['time_ratio_to_plain']:.2f} | "
                     f"{r['peak_extra_bytes'] / 2**20:.1f} | {stored} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
