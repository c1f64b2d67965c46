"""Scaled curvature estimation (paper G.1): predict the Fisher trace of larger MLPs from their gradients.

Base networks: tanh MLPs ``d0 -> w -> w -> 1`` with a per-network weight scale and input scale,
so traces span orders of magnitude. Inputs: decomposed output gradients at ``set_size`` points
(captured with :class:`~gradmetanet.GradientCapture`). Target: ``log tr F`` with
``tr F = mean_k ||grad f(x_k)||^2`` over ``target_points`` independent points, computed from the
factors as ``sum_l ||g_l||^2 (||a_l||^2 + 1)`` per point, never forming a gradient. Models:
GradMetaNet with the invariant head, and an MLP on the flattened decomposed gradients (the
paper's only baseline that fits). Metric: test MAE divided by the MAE of predicting the mean
training target (1.0 = no better than a constant); the paper reports 0.413 (GradMetaNet) and
0.779 (MLP) on base networks of over 1M parameters.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..atomic import atomic_write_text
from ..models.mlp import make_mlp
from ..features.neurons import GradientBatch
from ..capture import GradientCapture
from ..metanets import FlatMLP, GradMetaNet
from ..features.normalise import NeuronNormaliser
from ..core.spec import NetworkSpec
from ..plots import learning_curves
from ..metanets.training import fit_regression
from . import apply_preset, convergence_line
from .store import RunFolder, settings_of, write_results
from ..capture import spec_of

__all__ = ["FisherTraceConfig", "PRESETS", "run", "config_from_preset"]

METRIC = "test MAE of log tr(F) / MAE of the mean-training-target predictor"


@dataclass
class FisherTraceConfig:
    width: int = 128
    input_dim: int = 4
    n_train: int = 400
    n_val: int = 100
    n_test: int = 200
    set_size: int = 32
    target_points: int = 512
    epochs: int = 30
    patience: int | None = None           # stop a fit after this many epochs without a better validation error
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    device: str = "cpu"


PRESETS = {
    "quick": FisherTraceConfig(),
    "paper": FisherTraceConfig(width=1024, n_train=2000, n_val=500, n_test=500, set_size=128, target_points=1024,
                               epochs=100, batch_size=32, patience=15),
    "tiny": FisherTraceConfig(width=16, n_train=16, n_val=8, n_test=8, set_size=8, target_points=16, epochs=2,
                              batch_size=8),
}


def config_from_preset(preset: str, **overrides) -> FisherTraceConfig:
    """A preset with overrides applied."""
    return apply_preset(PRESETS, preset, overrides)


def _log_trace(model: nn.Module, x: torch.Tensor) -> float:
    """``log tr F`` of the unit-variance Gaussian model at points ``x``, from decomposed gradients."""
    with GradientCapture(model, loss_reduction="sum") as cap:
        model(x).sum().backward()
    gs = cap.gradients
    per_point = sum(gs.output_grads[s.name][:, 0].square().sum(-1) *
                    (gs.activations[s.name][:, 0].square().sum(-1) + (1.0 if s.bias is not None else 0.0))
                    for s in gs.spec.sites)
    return per_point.mean().log().item()


def make_zoo(config: FisherTraceConfig, progress: bool = True) -> tuple[NetworkSpec, torch.Tensor, torch.Tensor]:
    """Features ``[M, b, N, 2]`` and targets ``[M]`` (``log tr F``) of ``M`` random tanh MLPs."""
    gen = torch.Generator().manual_seed(config.seed)
    sizes = [config.input_dim, config.width, config.width, 1]
    M = config.n_train + config.n_val + config.n_test
    feats, targets = [], []
    for _ in tqdm(range(M), desc="MLP zoo", disable=not progress):
        model = make_mlp(sizes, "tanh")
        weight_scale = 0.5 + 1.5 * torch.rand((), generator=gen)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * weight_scale / p.shape[-1] ** 0.5)
        input_scale = torch.exp(torch.randn((), generator=gen))
        x = torch.randn(config.set_size, config.input_dim, generator=gen) * input_scale
        with GradientCapture(model, loss_reduction="sum") as cap:
            model(x).sum().backward()
        feats.append(cap.gradients.neuron_tensor())
        x_target = torch.randn(config.target_points, config.input_dim, generator=gen) * input_scale
        targets.append(_log_trace(model, x_target))
    return spec_of(make_mlp(sizes, "tanh")), torch.stack(feats), torch.tensor(targets)


def run(config: FisherTraceConfig, out_dir: str | os.PathLike, progress: bool = True, overwrite: bool = False
        ) -> dict:
    """Train both models, write ``results.json`` and ``table.md`` into ``out_dir`` (checked before any compute)."""
    out = RunFolder(out_dir, "fisher_trace", settings_of(config), overwrite).path
    spec, feats, targets = make_zoo(config, progress)
    n_tr, n_va = config.n_train, config.n_val
    train, val, test = (torch.arange(n_tr), torch.arange(n_tr, n_tr + n_va),
                        torch.arange(n_tr + n_va, len(targets)))
    feats = NeuronNormaliser(spec, per_fixed_neuron=True).fit(feats[train])(feats)    # per space, as the model
    t_mean, t_std = targets[train].mean(), targets[train].std()
    y = ((targets - t_mean) / t_std).unsqueeze(1)
    constant_mae = (targets[test] - t_mean).abs().mean().item()
    models = {
        "gradmetanet": lambda: GradMetaNet(hidden=32, set_layers=2, neuron_layers=1, head="invariant"),
        "mlp": lambda: FlatMLP(config.set_size * spec.n_neurons * 2),
    }
    rows = {}
    for name, build in models.items():
        torch.manual_seed(config.seed)
        model = build().to(config.device)

        def predict(m, idx):
            return m(GradientBatch(spec, feats[idx].to(config.device))).cpu()

        start = time.perf_counter()
        with tqdm(total=config.epochs, desc=f"train {name}", unit="epoch", disable=not progress) as bar:
            fit = fit_regression(model, predict, y, train, val, test, config.epochs, config.batch_size, config.lr,
                                 config.seed, on_epoch=lambda epoch, val_mse: (bar.update(), bar.set_postfix(val=val_mse)),
                                 patience=config.patience)
        model.eval()
        with torch.no_grad():
            pred = torch.cat([predict(model, test[i:i + 64]) for i in range(0, len(test), 64)])[:, 0]
        mae = (pred * t_std + t_mean - targets[test]).abs().mean().item()
        rows[name] = {"normalised_mae": mae / constant_mae, "mae": mae, "best_epoch": fit.best_epoch,
                      "converged": fit.converged, "val_history": fit.val_history, "train_history": fit.train_history,
                      "parameters": sum(p.numel() for p in model.parameters()),
                      "seconds": time.perf_counter() - start}
    results = {"experiment": "fisher_trace", "metric": METRIC, "config": asdict(config),
               "base_network": {"sizes": [config.input_dim, config.width, config.width, 1],
                                "parameters": spec.n_params, "neurons": spec.n_neurons},
               "models": rows, "paper": {"gradmetanet": 0.413, "mlp": 0.779}}
    write_results(out / "results.json", results, config.device)
    lines = [f"Base MLP {results['base_network']['sizes']} ({spec.n_params:,} parameters), set size "
             f"{config.set_size}; metric: {METRIC}.", "",
             "| model | params | normalised MAE | paper |", "|---|---:|---:|---:|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['parameters']:,} | {row['normalised_mae']:.3f} | {results['paper'][name]} |")
    lines += ["", convergence_line({name: [row["converged"]] for name, row in rows.items()}, config.patience)]
    atomic_write_text(out / "table.md", "\n".join(lines) + "\n")
    learning_curves(out / "learning_curves.png", {n: (r["train_history"], r["val_history"]) for n, r in rows.items()},
                    "MSE (normalised log trace)", "Fisher trace: learning curves")
    return results
