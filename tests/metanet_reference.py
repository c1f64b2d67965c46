"""Outputs and parameter gradients of GradMetaNet and GradMetaNet++ as gradmetanet 0.6.1 computed them.

``tests/data/metanet_reference_0_6_1.safetensors`` was made with the last 0.6.1 commit (4310336's successor
a172c29^) by ``PYTHONPATH=<that checkout>/src python tests/metanet_reference.py``. Version 0.8 rewrote the
set layers, the set product head and the attention for speed (``benchmarks/metanet_throughput.py``); the
test holds today's outputs and gradients to these, in float64, for every head and reduction and for both
attention kernels (heads of 4 features take the chunked CPU kernel, heads of 16 the fused one).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REFERENCE = Path(__file__).parent / "data" / "metanet_reference_0_6_1.safetensors"


def _models():
    from gradmetanet.metanets import GradMetaNet, GradMetaNetPlusPlus
    return {
        "gmn-product-fixed": lambda: GradMetaNet(hidden=16, set_layers=2, neuron_layers=1, fixed_neurons=5),
        "gmn-set-product": lambda: GradMetaNet(hidden=16, head="set_product", bias_product=True, out_features=2),
        "gmn-sum-invariant": lambda: GradMetaNet(hidden=16, head="invariant", reduction="sum", out_features=3),
        "gmnpp-small-heads": lambda: GradMetaNetPlusPlus(hidden=16, heads=4, blocks=2, out_features=2),
        "gmnpp-wide-heads": lambda: GradMetaNetPlusPlus(hidden=32, heads=2, blocks=1, head="invariant"),
    }


def compute() -> dict[str, torch.Tensor]:
    from gradmetanet import GradientBatch, NetworkSpec

    spec = NetworkSpec.chain([3, 6, 5, 2])
    torch.manual_seed(0)
    batch = GradientBatch(spec, torch.randn(2, 5, spec.n_neurons, 2, dtype=torch.float64))
    out = {}
    for name, make in _models().items():
        torch.manual_seed(1)
        model = make().double()
        result = model(batch)
        results = {"": result} if isinstance(result, torch.Tensor) else result
        loss = sum((v.square() * torch.linspace(0.5, 1.5, v.numel(), dtype=v.dtype).view(v.shape)).sum()
                   for v in results.values())
        loss.backward()
        out.update({f"{name}/out/{k}": v.detach() for k, v in results.items()})
        out.update({f"{name}/grad/{k}": p.grad for k, p in model.named_parameters()})
    return out


if __name__ == "__main__":
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in compute().items()}, str(REFERENCE))
    print(f"wrote {REFERENCE}", file=sys.stderr)
