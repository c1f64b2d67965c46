"""Outputs of GradMetaNet and GradMetaNet++ on captured gradients of MLP chains, with fixed seeds.

``tests/data/chain_reference.safetensors`` holds these outputs as computed by gradmetanet 0.1.0
(commit 64bbc9d, before spaces had groups and features became incidences), made with
``PYTHONPATH=<0.1.0 checkout>/src python tests/chain_reference.py``. The test compares today's
outputs with them: the core rewrite must leave every MLP-chain result unchanged.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REFERENCE = Path(__file__).parent / "data" / "chain_reference.safetensors"
CASES = {"relu-4-7-5-3": ([4, 7, 5, 3], "relu"), "tanh-3-6-2": ([3, 6, 2], "tanh"),
         "sine-2-5-5-4-2": ([2, 5, 5, 4, 2], "sine")}


def compute_outputs() -> dict[str, torch.Tensor]:
    from gradmetanet import GradientCapture
    from gradmetanet.models.mlp import make_mlp
    from gradmetanet.metanets import GradMetaNet, GradMetaNetPlusPlus

    out = {}
    for name, (sizes, activation) in CASES.items():
        torch.manual_seed(0)
        model = make_mlp(sizes, activation).double()
        x, y = torch.randn(6, sizes[0], dtype=torch.float64), torch.randint(sizes[-1], (6,))
        with GradientCapture(model) as cap:
            F.cross_entropy(model(x), y).backward()
        gs = cap.gradients
        torch.manual_seed(1)
        metanets = {"gradmetanet": GradMetaNet(hidden=16, out_features=2),
                    "gradmetanet_invariant": GradMetaNet(hidden=16, head="invariant", out_features=3),
                    "gradmetanet++": GradMetaNetPlusPlus(hidden=16, heads=4, blocks=2, out_features=2, head_rank=3)}
        for model_name, metanet in metanets.items():
            with torch.no_grad():
                result = metanet.double()(gs)
            if isinstance(result, torch.Tensor):
                out[f"{name}/{model_name}"] = result
            else:
                out.update({f"{name}/{model_name}/{k}": v for k, v in result.items()})
        out[f"{name}/features"] = gs.neuron_tensor() if hasattr(gs, "neuron_tensor") else \
            torch.cat(list(gs.neuron_features().values()), 1)
    return out


if __name__ == "__main__":
    from safetensors.torch import save_file

    REFERENCE.parent.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in compute_outputs().items()}, str(REFERENCE))
    print(f"wrote {REFERENCE}", file=sys.stderr)
