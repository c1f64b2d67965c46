"""Files in the public Small CNN Zoo format (Unterthiner et al. 2020), written by tests: ``weights.npy`` (TensorFlow
parameter order), ``layout.csv`` and ``metrics.csv.gz``."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from gradmetanet.models import small_cnn_zoo_template


def write_small_cnn_zoo(folder: Path, nets: list[dict[str, torch.Tensor]], metric_rows: list[str]) -> int:
    """Write ``nets`` (PyTorch layout) and the CSV ``metric_rows`` (``step,config.activation,test_accuracy``);
    returns the number of parameters per network."""
    names = list(small_cnn_zoo_template("tanh").state_dict())
    rows, layout, start = [], [], 0
    for k in names:
        t = nets[0][k]
        tf_shape = tuple(t.permute(2, 3, 1, 0).shape) if t.dim() == 4 else tuple(t.T.shape) if t.dim() == 2 else \
            tuple(t.shape)
        layout.append(f"sequential/{k}:0,{start},{start + t.numel()},\"{tf_shape}\"")
        start += t.numel()
    for net in nets:
        flat = [net[k].permute(2, 3, 1, 0) if net[k].dim() == 4 else net[k].T if net[k].dim() == 2 else net[k]
                for k in names]
        rows.append(torch.cat([t.reshape(-1) for t in flat]).numpy())
    np.save(folder / "weights.npy", np.stack(rows))
    (folder / "layout.csv").write_text("varname,start_idx,end_idx,shape\n" + "\n".join(layout) + "\n")
    with gzip.open(folder / "metrics.csv.gz", "wt") as f:
        f.write("step,config.activation,test_accuracy\n" + "\n".join(metric_rows) + "\n")
    return start
