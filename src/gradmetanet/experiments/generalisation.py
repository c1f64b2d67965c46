"""Generalisation prediction: each network's test accuracy from its weights, on the classifier zoos.

The field's second standard weight-space task (Small CNN Zoo: Unterthiner et al. 2020; NFN, ScaleGMN). Every
model reads a network of a zoo and predicts its accuracy on the zoo's held-out images; networks are split
train / validation / test by the zoo (70 / 10 / 20), every model is chosen on validation and scored once on
the test networks by Kendall's tau (the field's metric), tau on the better half of the test networks (where
ranking is hard: their accuracies are close) and R^2.

Models:

- **StatNN**: gradient-boosted trees on 8 statistics per parameter tensor (mean, standard deviation, mean
  absolute value, quantiles 0, 25, 50, 75, 100 %; Unterthiner et al.'s features), depth and size chosen on
  validation;
- **loss probe**: a ridge regression on each network's own cross-entropy and accuracy over ``probe_images``
  training images (what a gradient-reading metanetwork sees), its penalty chosen on validation;
- **flat MLP**: an MLP on all weights, each tensor divided by its root mean square over the training networks;
- **DWSNet, GMN, ScaleGMN**: the weight-space backbones with an invariant readout, same inputs;
- **GradMetaNet** (invariant head) on each network's decomposed per-example gradients of its own loss over the
  same ``probe_images`` images, normalised two ways: ``gradmetanet`` with one statistic per space and channel
  pooled over the training networks (what a user does first), and ``gradmetanet_scaled`` with each network's
  channels divided by its own root mean square per space, the logarithm of that scale given as two more channels
  (a per-space constant: it moves with no permutation). The pair tests whether pooled statistics hide the small
  gradients of well-trained networks. Input and output neurons get their own identity (``fixed_neurons``), as
  in ws-bench, where GradMetaNet could not tell a pixel's x from its y without it.

Published (Small CNN Zoo, Kendall tau, CIFAR-10-GS / SVHN-GS): NFN-HNP 0.934 / 0.931, StatNN 0.915 / 0.843.
Our zoos are smaller networks on the digits (a different task): compare orderings, not values. With the public
files (``small_cnn_zoo_dir``: a folder of ``weights.npy``, ``metrics.csv.gz``, ``layout.csv``) the table gains a
``small-cnn-zoo`` row block on the published networks (final checkpoints of ``small_cnn_activation``), where
the models that need the networks' images (loss probe, GradMetaNet) are n/a: the files do not hold them.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from scipy.stats import kendalltau
from sklearn.ensemble import GradientBoostingRegressor
from sklearn.linear_model import Ridge
from torch import nn
from torch.func import vmap
from tqdm.auto import tqdm

from ..atomic import atomic_write_text
from ..features.neurons import GradientBatch
from ..capture import functional_features, spec_of
from ..core.spec import NetworkSpec
from ..zoos import ShardedZoo
from ..zoos.classifier import (ClassifierZoo, ClassifierZooConfig, batched_logits, load_or_generate_classifier_zoo,
                                   load_sharded_classifier_zoo, load_small_cnn_zoo)
from ..features import NeuronNormaliser, space_rms
from ..metanets import GMN, DWSNet, FlatWeightMLP, GradMetaNet, ScaleGMN
from ..plots import figure, learning_curves
from ..metanets.training import fit_regression
from . import apply_preset, convergence_line, format_mean_std, mean_std
from .store import RunFolder, settings_of

__all__ = ["GeneralisationConfig", "PRESETS", "config_from_preset", "run", "MODELS", "weight_statistics",
           "kendall_tau"]

MODELS = ("statnn", "loss_probe", "flat_mlp", "dws", "gmn", "scalegmn", "gradmetanet", "gradmetanet_scaled")
CLASSICAL = ("statnn", "loss_probe")
GRADIENT_MODELS = ("gradmetanet", "gradmetanet_scaled")
LABELS = {"statnn": "StatNN (boosted trees)", "loss_probe": "loss probe (ridge)", "flat_mlp": "flat MLP",
          "dws": "DWSNet", "gmn": "GMN", "scalegmn": "ScaleGMN", "gradmetanet": "GradMetaNet (pooled statistics)",
          "gradmetanet_scaled": "GradMetaNet (per-network scale)"}
PUBLISHED = {"NFN-HNP": (0.934, 0.931), "StatNN": (0.915, 0.843)}   # Kendall tau, CIFAR-10-GS / SVHN-GS


@dataclass
class GeneralisationConfig:
    zoos: tuple[str, ...] = ("mlp-relu", "mlp-tanh", "cnn-tanh")   # architecture-activation of classifier zoos
    networks: int = 1000                  # networks per zoo
    zoo_steps: tuple[int, int] = (20, 300)
    models: tuple[str, ...] = MODELS
    hidden: int = 32
    layers: int = 3
    epochs: int = 100
    patience: int | None = 10
    batch_size: int = 32
    lr: float = 1e-3
    probe_images: int = 32
    seeds: int = 3
    small_cnn_zoo_dir: str | None = None   # the public Small CNN Zoo files of one dataset, if the user has them
    small_cnn_activation: str = "tanh"
    sharded_zoos: tuple[str, ...] = ()     # classifier zoo folders made by `gradmetanet zoo make classifier`
    cache_dir: str | None = os.environ.get("GRADMETANET_CACHE", str(Path.home() / ".cache" / "gradmetanet"))

    def __post_init__(self) -> None:
        bad = [m for m in self.models if m not in MODELS]
        if bad:
            raise ValueError(f"unknown models {bad}; choose from {list(MODELS)}")
        for zoo in self.zoos:
            zoo_config(self, zoo)                  # an unknown zoo fails here, naming the known ones


def zoo_config(config: GeneralisationConfig, zoo: str) -> ClassifierZooConfig:
    architecture, _, activation = zoo.partition("-")
    return ClassifierZooConfig(architecture=architecture, activation=activation, networks=config.networks,
                               steps=config.zoo_steps)


PRESETS = {
    "paper": GeneralisationConfig(networks=5000, hidden=64, layers=4, epochs=200, patience=20),
    # 100 epochs (0.9 and earlier: 40, where 3 of 6 GradMetaNet fits still improved; results/generalisation-cpu)
    "cpu": GeneralisationConfig(zoos=("mlp-relu", "cnn-tanh"), networks=500, epochs=100, patience=8),
    "quick": GeneralisationConfig(zoos=("mlp-relu", "cnn-tanh"), networks=300, epochs=40, seeds=1),
    "tiny": GeneralisationConfig(zoos=("mlp-relu",), networks=40, zoo_steps=(5, 20), hidden=8, layers=1, epochs=2,
                                 patience=None, seeds=1, cache_dir=None),
}


def config_from_preset(preset: str, **overrides) -> GeneralisationConfig:
    return apply_preset(PRESETS, preset, overrides)


def weight_statistics(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[M, 8 * tensors]``: mean, std (0 for a one-entry tensor), mean |w|, and the 0/25/50/75/100 % quantiles of
    every tensor of each network ``params {name: [M, *shape]}``."""
    columns = []
    for v in params.values():
        flat = v.flatten(1).double()
        q = torch.quantile(flat, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=flat.dtype), dim=1).T
        std = flat.std(1, keepdim=True) if flat.shape[1] > 1 else torch.zeros_like(flat[:, :1])
        columns += [flat.mean(1, keepdim=True), std, flat.abs().mean(1, keepdim=True), q]
    return torch.cat(columns, 1)


def kendall_tau(predicted: torch.Tensor, true: torch.Tensor) -> float:
    """Kendall's tau-b between two ``[M]`` vectors."""
    return float(kendalltau(predicted.numpy(), true.numpy()).statistic)


def scores(predicted: torch.Tensor, true: torch.Tensor) -> dict[str, float]:
    """Kendall tau, tau on the better half of the networks (true accuracy at or above the median), and R^2."""
    top = true >= true.median()
    r2 = 1 - (predicted - true).square().sum() / (true - true.mean()).square().sum()
    return {"tau": kendall_tau(predicted, true), "tau_top_half": kendall_tau(predicted[top], true[top]),
            "r2": float(r2)}


def probe_features(zoo: ClassifierZoo, images: int) -> torch.Tensor:
    """``[M, 2]``: each network's cross-entropy and accuracy on the first ``images`` training images."""
    x, y = zoo.data()
    idx = zoo.images["train"][:images]
    with torch.no_grad():
        logits = batched_logits(zoo.template(), zoo.params, x[idx])              # [M, B, classes]
        loss = F.cross_entropy(logits.transpose(1, 2), y[idx].expand(len(zoo), -1), reduction="none").mean(1)
        acc = (logits.argmax(-1) == y[idx]).float().mean(1)
    return torch.stack([loss, acc], 1).double()


def not_applicable(name: str, zoo: ClassifierZoo) -> str | None:
    """Why model ``name`` cannot read this zoo's networks (``None`` when it can): DWSNet's layers read linear
    layers only, not convolution kernels; the loss probe and GradMetaNet need the networks' images."""
    if name == "dws" and any(v.dim() > 3 for v in zoo.params.values()):
        return "DWSNet reads linear layers only (this zoo has convolutions)"
    if name in ("loss_probe", *GRADIENT_MODELS) and not zoo.images:
        return f"{LABELS[name]} reads the networks' images, which the public zoo files do not hold"
    return None


PUBLIC = "small-cnn-zoo"


def public_zoo(config: GeneralisationConfig) -> ClassifierZoo:
    """The public Small CNN Zoo networks of ``config.small_cnn_zoo_dir`` (final checkpoints of the chosen activation)
    as a zoo without images; networks split 70 / 10 / 20 by seed 0."""
    params, metrics = load_small_cnn_zoo(config.small_cnn_zoo_dir, config.small_cnn_activation)
    n = len(metrics["test_accuracy"])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    a, b = int(round(0.7 * n)), int(round(0.8 * n))
    networks = {"train": order[:a].sort().values, "val": order[a:b].sort().values, "test": order[b:].sort().values}
    zeros = torch.zeros(n)
    return ClassifierZoo(ClassifierZooConfig(architecture="cnn", activation=config.small_cnn_activation, networks=n),
                         params, metrics["test_accuracy"].float(), zeros, zeros, zeros, {}, networks)


def zoo_sources(config: GeneralisationConfig, progress: bool) -> dict[str, tuple[Callable[[], ClassifierZoo], dict]]:
    """Every zoo of the run: ``{name: (load, what it was made by)}``; the second part joins the settings its cells
    depend on (the generated zoos' sizes, the public files' activation, a sharded zoo's manifest)."""
    sources = {name: (lambda name=name: load_or_generate_classifier_zoo(zoo_config(config, name), config.cache_dir,
                                                                        progress),
                      {"networks": config.networks, "zoo_steps": list(config.zoo_steps)}) for name in config.zoos}
    if config.small_cnn_zoo_dir:
        sources[PUBLIC] = (lambda: public_zoo(config), {"small_cnn_zoo_dir": config.small_cnn_zoo_dir,
                                                        "small_cnn_activation": config.small_cnn_activation})
    for folder in config.sharded_zoos:
        made_by = {"sharded_zoo": ShardedZoo(folder).manifest["config"]}
        sources[f"sharded:{Path(folder).name}"] = (lambda folder=folder: load_sharded_classifier_zoo(folder), made_by)
    return sources


def choose_on_validation(candidates: list, x: torch.Tensor, y: torch.Tensor, splits: dict) -> tuple[object, float]:
    """Fit every sklearn candidate on the ``train`` rows of ``x [M, F]``, ``y [M]``; the one with the best score
    (``model.score``: R^2 for a regressor, accuracy for a classifier) on the ``val`` rows, and that score."""
    best, best_score = None, -math.inf
    for model in candidates:
        model.fit(x[splits["train"]].numpy(), y[splits["train"]].numpy())
        score = model.score(x[splits["val"]].numpy(), y[splits["val"]].numpy())
        if score > best_score:
            best, best_score = model, score
    return best, float(best_score)


def _classical(name: str, zoo: ClassifierZoo, config: GeneralisationConfig, seed: int) -> tuple[torch.Tensor, dict]:
    """Test predictions ``[n_test]`` of StatNN or the loss probe, and what validation chose."""
    y = zoo.accuracy.double()
    if name == "statnn":
        x = weight_statistics(zoo.params)
        candidates = [GradientBoostingRegressor(n_estimators=n, max_depth=d, learning_rate=0.05, subsample=0.8,
                                                random_state=seed) for n in (200, 500) for d in (2, 3)]
    else:
        x = probe_features(zoo, config.probe_images)
        candidates = [Ridge(alpha=a) for a in (1e-4, 1e-2, 1.0)]
    model, r2 = choose_on_validation(candidates, x, y, zoo.networks)
    return torch.as_tensor(model.predict(x[zoo.networks["test"]].numpy())), {"val_r2": r2, "chosen": repr(model)}


def _network_model(name: str, zoo: ClassifierZoo, config: GeneralisationConfig) -> nn.Module:
    spec = spec_of(zoo.template(), zoo.data()[0][:2])
    if name == "flat_mlp":
        n_inputs = sum(v[0].numel() for v in zoo.params.values())
        return FlatWeightMLP(n_inputs, 4 * config.hidden, config.layers)
    kinds = {"dws": DWSNet, "gmn": GMN, "scalegmn": ScaleGMN}
    options = {} if name == "dws" else {"bidirectional": True}
    return kinds[name](spec, 1, 1, hidden=config.hidden, layers=config.layers, readout="invariant", **options)


def _trained(name: str, zoo: ClassifierZoo, config: GeneralisationConfig, seed: int, checkpoint: Path,
             on_epoch: Callable[[int, float], None] | None = None) -> tuple[torch.Tensor, dict]:
    """Test predictions ``[n_test]`` of a network trained by MSE on the standardised accuracies."""
    splits = zoo.networks
    rms = {n: v[splits["train"]].square().mean().sqrt() for n, v in zoo.params.items()}
    x = {n: (v / rms[n]).unsqueeze(-1) for n, v in zoo.params.items()}
    torch.manual_seed(seed)
    model = _network_model(name, zoo, config)

    def predict(m: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        return m({n: v[idx] for n, v in x.items()})

    return _fit_and_predict(model, predict, zoo, config, seed, checkpoint, on_epoch)


def gradient_sets(zoo: ClassifierZoo, images: int, chunk: int = 50) -> tuple[NetworkSpec, torch.Tensor]:
    """The zoo's spec and ``[M, images, N, 2]``: each network's decomposed per-example gradients of its own
    cross-entropy on the first ``images`` training images (activation and output-gradient channels)."""
    template, (x, y) = zoo.template(), zoo.data()
    idx = zoo.images["train"][:images]
    spec = spec_of(template, x[:2])

    def one(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_features(template, spec, p, (x[idx],), lambda out: F.cross_entropy(out, y[idx]))[2]

    parts = [vmap(one)({k: v[i:i + chunk] for k, v in zoo.params.items()}) for i in range(0, len(zoo), chunk)]
    return spec, torch.cat(parts).detach()


def per_network_scaled(features: torch.Tensor, spec: NetworkSpec, eps: float = 1e-20) -> torch.Tensor:
    """``[M, b, N, 2 f]``: each network's channels divided by their root mean square over the set and each space's
    neurons, and the logarithm of that scale (a constant over the space) as ``f`` more channels."""
    scale = space_rms(features, spec, eps)
    return torch.cat([features / scale, scale.log().expand_as(features)], -1)


def _gradient_model(name: str, zoo: ClassifierZoo, config: GeneralisationConfig, seed: int, checkpoint: Path,
                    on_epoch: Callable[[int, float], None] | None = None) -> tuple[torch.Tensor, dict]:
    """Test predictions ``[n_test]`` of GradMetaNet (invariant head) on the networks' gradient sets."""
    spec, feats = gradient_sets(zoo, config.probe_images)
    if name == "gradmetanet":
        feats = NeuronNormaliser(spec, per_fixed_neuron=True).fit(feats[zoo.networks["train"]])(feats)
    else:
        feats = per_network_scaled(feats, spec)
    torch.manual_seed(seed)
    fixed = sum(s.size for s in spec.spaces if not s.permutable)     # input pixels and classes keep their identity
    model = GradMetaNet(in_features=feats.shape[-1], hidden=config.hidden, set_layers=2, neuron_layers=1,
                        head="invariant", fixed_neurons=fixed)

    def predict(m: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        return m(GradientBatch(spec, feats[idx]))

    return _fit_and_predict(model, predict, zoo, config, seed, checkpoint, on_epoch)


def _fit_and_predict(model: nn.Module, predict: Callable, zoo: ClassifierZoo, config: GeneralisationConfig, seed: int,
                     checkpoint: Path, on_epoch: Callable[[int, float], None] | None = None
                     ) -> tuple[torch.Tensor, dict]:
    """Train ``model`` by MSE on the standardised accuracies (best validation epoch); predictions on the test
    networks in accuracy units."""
    splits = zoo.networks
    mean, std = zoo.accuracy[splits["train"]].mean(), zoo.accuracy[splits["train"]].std().clamp_min(1e-6)
    targets = ((zoo.accuracy - mean) / std).unsqueeze(1)
    fit = fit_regression(model, predict, targets, splits["train"], splits["val"], splits["test"], config.epochs,
                         config.batch_size, config.lr, seed, schedule="cosine", patience=config.patience,
                         checkpoint=checkpoint, on_epoch=on_epoch)
    model.eval()
    with torch.no_grad():
        predicted = predict(model, splits["test"])[:, 0] * std + mean
    return predicted.double(), {"best_epoch": fit.best_epoch, "epochs_run": fit.epochs_run,
                                "converged": fit.converged, "val_history": fit.val_history,
                                "train_history": fit.train_history}


def run(config: GeneralisationConfig, out_dir: str | os.PathLike, progress: bool = True,
        overwrite: bool = False) -> dict:
    """Every model on every zoo over ``seeds`` seeds: ``results.json``, ``table.md``, ``tau.png``; finished cells
    are kept (a rerun resumes, also mid-fit)."""
    folder = RunFolder(out_dir, "generalisation", settings_of(config), overwrite)
    store = folder.cells()
    results = {"experiment": "generalisation", "config": asdict(config), "published_tau": PUBLISHED, "zoos": {}}
    sources = zoo_sources(config, progress)
    bar = tqdm(total=len(sources) * len(config.models) * config.seeds, desc="generalisation", unit="fit",
               disable=not progress)
    for zoo_name, (load, made_by) in sources.items():
        zoo = load()
        settings = settings_of(config, ignore=("zoos", "models", "seeds", "networks", "zoo_steps", "small_cnn_zoo_dir",
                                               "small_cnn_activation", "sharded_zoos")) | made_by | {"zoo": zoo_name}
        true = zoo.accuracy[zoo.networks["test"]].double()
        for name in config.models:
            for seed in range(config.seeds):
                key = f"{zoo_name}/{name}/{seed}"
                if not_applicable(name, zoo):
                    bar.update()
                    continue
                if store.get(key, settings) is None:
                    start = time.perf_counter()
                    checkpoint = store.checkpoint(key, settings)

                    def on_epoch(epoch: int, val: float, key: str = key) -> None:
                        bar.set_postfix_str(f"{key} epoch {epoch + 1}/{config.epochs} val {val:.3f}")
                    predicted, info = (_classical(name, zoo, config, seed) if name in CLASSICAL else
                                       _gradient_model(name, zoo, config, seed, checkpoint, on_epoch)
                                       if name in GRADIENT_MODELS else
                                       _trained(name, zoo, config, seed, checkpoint, on_epoch))
                    store.put(key, settings, {**scores(predicted, true), **info,
                                              "seconds": time.perf_counter() - start})
                bar.update()
        results["zoos"][zoo_name] = {
            "networks": len(zoo), "test_networks": len(true),
            "test_accuracy": {"mean": float(true.mean()), "min": float(true.min()), "max": float(true.max())},
            "models": {name: {"not_applicable": not_applicable(name, zoo)} if not_applicable(name, zoo) else
                       _summary([store.get(f"{zoo_name}/{name}/{s}", settings) for s in range(config.seeds)])
                       for name in config.models}}
    bar.close()
    report(results, folder)
    return results


def _summary(runs: list[dict]) -> dict:
    out = {metric: dict(zip(("mean", "std"), mean_std(r[metric] for r in runs)))
           for metric in ("tau", "tau_top_half", "r2")}
    out["runs"] = runs
    if "converged" in runs[0]:
        out["converged"] = [r["converged"] for r in runs]
    return out


def report(results: dict, folder: RunFolder) -> str:
    """``results.json`` (with provenance), ``table.md`` and ``tau.png``."""
    out = folder.path
    folder.write_json("results.json", results)
    cfg = results["config"]
    lines = [f"Generalisation prediction: each network's test accuracy from its weights; test networks scored once, "
             f"models chosen on validation; mean ± std over {cfg['seeds']} seed(s).", ""]
    for zoo_name, zoo in results["zoos"].items():
        acc = zoo["test_accuracy"]
        lines += [f"**{zoo_name}** ({zoo['networks']} networks, {zoo['test_networks']} test; their accuracy "
                  f"{100 * acc['min']:.0f}-{100 * acc['max']:.0f}%, mean {100 * acc['mean']:.1f}%)", "",
                  "| model | Kendall tau | tau, better half | R^2 |", "|---|---:|---:|---:|"]
        for name, row in zoo["models"].items():
            if "not_applicable" in row:
                lines.append(f"| {LABELS[name]} | n/a | n/a | n/a |")
                continue
            n = len(row["runs"])
            cells = [format_mean_std(row[m]["mean"], row[m]["std"], n, 3) for m in ("tau", "tau_top_half", "r2")]
            lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
        reasons = [f"n/a: {r['not_applicable']}." for r in zoo["models"].values() if "not_applicable" in r]
        lines += [""] + reasons if reasons else []
        trained = {LABELS[n]: r["converged"] for n, r in zoo["models"].items() if "converged" in r}
        lines += ["", convergence_line(trained, cfg["patience"], "seeds") if trained else "", ""]
    lines.append("Published (Small CNN Zoo, CIFAR-10-GS / SVHN-GS, Kendall tau): NFN-HNP 0.934 / 0.931, StatNN "
                 "0.915 / 0.843. Our zoos are small networks on the digits: compare orderings, not values.")
    table = "\n".join(lines)
    atomic_write_text(out / "table.md", table + "\n")
    zoos = list(results["zoos"])
    with figure(out / "tau.png", "zoo", "Kendall tau (test networks)", "Generalisation prediction",
                size=(7.5, 4.2)) as ax:
        width = 0.8 / len(cfg["models"])
        for i, name in enumerate(cfg["models"]):
            ax.bar([j + i * width for j in range(len(zoos))],
                   [results["zoos"][z]["models"][name].get("tau", {}).get("mean", 0.0) for z in zoos], width,
                   label=LABELS[name])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(zoos))], zoos)
    curves = {f"{zoo_name}, {LABELS[name]}": (row["runs"][0].get("train_history", []), row["runs"][0]["val_history"])
              for zoo_name, zoo in results["zoos"].items() for name, row in zoo["models"].items()
              if "runs" in row and row["runs"][0].get("val_history")}
    if curves:
        learning_curves(out / "learning_curves.png", curves, "MSE (standardised accuracy)",
                        "Generalisation prediction: learning curves (seed 0)")
    return table
