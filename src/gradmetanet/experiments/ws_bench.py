"""The field's standard weight-space benchmark, INR classification, with a robustness test beside it.

Every backbone (DWSNet, GMN, ScaleGMN; invariant readout) learns the class of the digit an INR of the INR zoo
represents from the INR's weights (each tensor divided by its root mean square over the training INRs), by
cross-entropy, keeping its best-validation epoch. Its test accuracy is then read on the test INRs as they are
and on three function-preserving changes of them (:mod:`gradmetanet.features.transforms`):

- **symmetry**: a random element of the spec's groups (permutations and sign flips of the sine neurons); an
  equivariant backbone must score exactly as on the originals;
- **widened, zero**: ``widen_by`` neurons added to each hidden space with zero outgoing weights;
- **widened, split**: ``widen_by`` neurons of each hidden space duplicated, outgoing weights split.

Widened INRs compute the same image but have more neurons than any training INR: a backbone that aggregates
by means over neurons sees them diluted.

Two classical baselines head the table (the issue's "hard to beat" pair): **StatNN**, boosted trees on 8
statistics of every parameter tensor (mean, std, mean |w|, five quantiles), and a **probe**, a logistic regression on
what each INR computes at the ``grad_points`` pixels GradMetaNet reads (a function of the INR: every
function-preserving change keeps it). Each chooses its setting on the validation INRs.

Beside the backbones, **GradMetaNet** (invariant head) classifies each INR from its decomposed gradients at
``grad_points`` fixed pixels (each channel scaled by its root mean square per INR and space, as INR editing
feeds them), so the table says whether gradients carry the class where weights do not; and each backbone runs
again **with gradient features** (``dws+grad``, ...: a GradMetaNet with a weight-space head adds
``gradient_features`` channels per parameter to the weights, the input of INR editing's "backbone + GradMetaNet"
variants), the paper's claim that gradients help every backbone. Models that read gradients are scored on the
test INRs and their random symmetries (features recomputed from the moved weights); widened INRs are another
architecture than the SIRENs whose gradients they read, so those cells are n/a.

Published figures (ScaleGMN paper, MNIST INRs, 70,000 images of
28 x 28): ScaleGMN-B 96.59%, DWSNets 85.71%, NFN-NP 78.50%. Our default zoo holds the 1,797 scikit-learn digits
upsampled to 28 x 28 (``data_dir`` fits INRs to MNIST IDX files instead): fewer and easier images, so the numbers
are a check of the pipeline and of the ordering, not comparable to the published ones. ``inr_dir`` reads the
published INRs themselves (:func:`~gradmetanet.zoos.load_public_inr_zoo`: the unpacked DWSNets archive or a
sharded folder made of it), the benchmark's own data and splits.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from tqdm.auto import tqdm

from ..atomic import atomic_write_text
from ..core.spec import NetworkSpec
from ..features.neurons import GradientBatch
from ..zoos.inr import InrZooConfig, grid_coordinates, load_or_generate_inr_zoo
from ..zoos.public_inrs import load_inr_folder
from ..plots import figure, learning_curves
from ..metanets.training import fit_regression
from ..features import random_symmetry, widen
from ..metanets import GMN, DWSNet, GradMetaNet, ScaleGMN, WithGradientFeatures
from . import apply_preset, convergence_line, format_mean_std, mean_std
from .generalisation import choose_on_validation, weight_statistics
from .inr_edit import inr_gradient_sets, inr_spec, preactivations
from .store import RunFolder, require_finite, settings_of

__all__ = ["WsBenchConfig", "PRESETS", "run", "config_from_preset", "BACKBONES", "VARIANTS"]

WEIGHT_BACKBONES = ("dws", "gmn", "scalegmn")
CLASSICAL = ("statnn", "probe")
BACKBONES = (*CLASSICAL, *WEIGHT_BACKBONES, "gradmetanet", *(f"{b}+grad" for b in WEIGHT_BACKBONES))
VARIANTS = ("original", "permutation", "symmetry", "widened_zero", "widened_split")
LABELS = {"statnn": "StatNN (boosted trees)", "probe": "probe (INR values, logistic)", "dws": "DWSNet", "gmn": "GMN", "scalegmn": "ScaleGMN", "gradmetanet": "GradMetaNet (gradients)",
          "dws+grad": "DWSNet + gradient features", "gmn+grad": "GMN + gradient features",
          "scalegmn+grad": "ScaleGMN + gradient features",
          "original": "test INRs",
          "permutation": "random permutation", "symmetry": "random symmetry", "widened_zero": "widened (zero)", "widened_split": "widened (split)"}
PUBLISHED_MNIST = {"scalegmn": 96.59, "dws": 85.71}      # ScaleGMN paper, MNIST INRs (ScaleGMN-B, DWSNets)
CLASSES = 10


@dataclass
class WsBenchConfig:
    n_images: int | None = None           # INRs of the zoo (all 1,797 digits by default)
    data_dir: str | None = None           # MNIST-style IDX files instead of the digits
    inr_dir: str | None = None            # an INR folder instead: the published INRs (archive or sharded), or a
                                          # sharded zoo made by `zoo make inr`
    fit_steps: int = 300                  # steps fitting each INR (the INR zoo's setting)
    shared_init: bool = False             # INRs fitted from one shared initialisation (InrZooConfig.shared_init)
    backbones: tuple[str, ...] = BACKBONES
    hidden: int = 32
    layers: int = 3
    epochs: int = 60
    patience: int | None = 10
    batch_size: int = 32
    lr: float = 1e-3
    widen_by: int = 8                     # neurons added to each hidden space in the widened variants
    grad_points: int = 64                 # pixels at which GradMetaNet reads each INR's gradients
    gradient_features: int = 8            # channels per parameter a "+grad" backbone gets from its GradMetaNet
    seeds: int = 3
    cache_dir: str | None = os.environ.get("GRADMETANET_CACHE", str(Path.home() / ".cache" / "gradmetanet"))

    def __post_init__(self) -> None:
        bad = [b for b in self.backbones if b not in BACKBONES]
        if bad:
            raise ValueError(f"unknown backbones {bad}; choose from {list(BACKBONES)}")


PRESETS = {
    "paper": WsBenchConfig(hidden=64, layers=4, epochs=150, patience=20),
    "cpu": WsBenchConfig(),
    "quick": WsBenchConfig(n_images=600, epochs=20, patience=5, seeds=1, layers=2),
    "tiny": WsBenchConfig(n_images=40, fit_steps=30, epochs=2, patience=None, seeds=1, hidden=8, layers=1,
                          widen_by=2, grad_points=8, cache_dir=None),
}


def config_from_preset(preset: str, **overrides) -> WsBenchConfig:
    return apply_preset(PRESETS, preset, overrides)


def classical_features(name: str, params: dict[str, torch.Tensor], spec: NetworkSpec, pixels: torch.Tensor
                       ) -> np.ndarray:
    """``[M, features]``: StatNN's per-tensor statistics of the INRs ``params {name: [M, *shape]}``, or (probe)
    their outputs at ``pixels [K, 2]``."""
    if name == "statnn":
        return weight_statistics(params).numpy()
    with torch.no_grad():
        return preactivations(params, pixels, spec)[spec.sites[-1].bias][:, 0].double().numpy()


def classical_cell(name: str, features: np.ndarray, labels: np.ndarray, splits: dict[str, torch.Tensor],
                   seed: int) -> tuple[object, dict]:
    """The candidate of baseline ``name`` with the best validation accuracy, fitted on the training INRs."""
    if name == "statnn":
        candidates = [GradientBoostingClassifier(n_estimators=n, max_depth=d, learning_rate=0.1, subsample=0.8,
                                                 random_state=seed) for n in (100, 300) for d in (2, 3)]
    else:
        candidates = [make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
                      for c in (0.01, 0.1, 1.0, 10.0)]
    model, accuracy = choose_on_validation(candidates, torch.from_numpy(features), torch.from_numpy(labels), splits)
    return model, {"val_accuracy": accuracy, "chosen": repr(model)}


def reads_gradients(name: str) -> bool:
    return name == "gradmetanet" or name.endswith("+grad")


def _backbone(name: str, spec: NetworkSpec, config: WsBenchConfig) -> nn.Module:
    fixed = sum(s.size for s in spec.spaces if not s.permutable)   # the pixel's x and y, the output: kept apart
    if name == "gradmetanet":
        return GradMetaNet(hidden=config.hidden, set_layers=2, neuron_layers=1, out_features=CLASSES, head="invariant",
                           fixed_neurons=fixed)
    base = name.removesuffix("+grad")
    extra = config.gradient_features if base != name else 0
    kinds = {"dws": DWSNet, "gmn": GMN, "scalegmn": ScaleGMN}
    options = {} if base == "dws" else {"bidirectional": True}
    backbone = kinds[base](spec, 1 + extra, CLASSES, hidden=config.hidden, layers=config.layers, readout="invariant",
                           **options)
    if not extra:
        return backbone
    return WithGradientFeatures(spec, backbone, GradMetaNet(hidden=config.hidden, set_layers=2, neuron_layers=1,
                                                            out_features=extra, fixed_neurons=fixed))


def cell_settings(name: str, config: WsBenchConfig) -> dict:
    """What a cell of model ``name`` depends on (a model without gradient features ignores their width)."""
    ignore = ("backbones", "seeds") + (() if name.endswith("+grad") else ("gradient_features",)) + \
        (("inr_dir",) if config.inr_dir is None else ())
    return settings_of(config, ignore=ignore)


def changed_test_networks(params: dict[str, torch.Tensor], spec: NetworkSpec, widen_by: int, seed: int
                  ) -> dict[str, tuple[dict[str, torch.Tensor], NetworkSpec]]:
    """The test INRs ``{name: [M, *shape]}`` as they are and changed in each function-preserving way, with the
    spec each is read with."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    hidden = [s.name for s in spec.spaces if s.permutable]
    out = {"original": (params, spec), "symmetry": (random_symmetry(params, spec, gen, leading=1), spec)}
    for how in ("zero", "split"):
        wide, wide_spec = params, spec
        for space in hidden:
            wide, wide_spec = widen(wide, wide_spec, space, widen_by, how, gen, leading=1)
        out[f"widened_{how}"] = (wide, wide_spec)
    element = spec.sample(torch.Generator().manual_seed(20_000 + seed))     # its own draw: the others stay as before
    out["permutation"] = (spec.transform_parameters(params, spec.permutation_part(element), leading=1), spec)
    return out


def model_inputs(name: str, spec: NetworkSpec, x: dict[str, torch.Tensor], features: torch.Tensor | None,
                 idx: torch.Tensor | slice) -> tuple:
    """The arguments model ``name`` reads for the INRs ``idx``: weight features ``x {name: [M, *shape, 1]}``,
    gradient features ``[M, K, N, 2]`` or both."""
    if name == "gradmetanet":
        return (GradientBatch(spec, features[idx]),)
    weights = {n: v[idx] for n, v in x.items()}
    return (weights, features[idx]) if reads_gradients(name) else (weights,)


@torch.no_grad()
def model_logits(model: nn.Module, name: str, spec: NetworkSpec, params: dict[str, torch.Tensor],
                 rms: dict[str, torch.Tensor], features: torch.Tensor | None, batch: int = 128) -> torch.Tensor:
    """``[M, classes]``: the logits of model ``name`` for the INRs ``params {name: [M, *shape]}`` (each tensor
    divided by ``rms``) with their gradient features ``[M, K, N, 2]`` (for the models that read them)."""
    model.eval()
    x = {n: (v / rms[n]).unsqueeze(-1) for n, v in params.items()}
    m = len(next(iter(params.values())))
    return torch.cat([model(*model_inputs(name, spec, x, features, slice(i, i + batch))) for i in range(0, m, batch)])


def variant_scores(logits: torch.Tensor, original: torch.Tensor, labels: torch.Tensor, what: str) -> dict:
    """Accuracy of ``logits`` and how far they moved from the originals' (the largest change over the spread of
    the originals' logits: 0 for a model that keeps its answers exactly, whatever its accuracy)."""
    change = ((logits - original).abs().max() / original.std().clamp_min(1e-12)).item()
    return {"accuracy": require_finite(what, (logits.argmax(-1) == labels).float().mean().item()),
            "logit_change": change}


def run(config: WsBenchConfig, out_dir: str | os.PathLike, progress: bool = True, overwrite: bool = False) -> dict:
    """Every backbone over ``seeds`` seeds: ``results.json``, ``table.md``, ``accuracy.png``, ``learning_curves.png``.
    Finished cells are kept (a rerun resumes, also mid-fit)."""
    folder = RunFolder(out_dir, "ws-bench", settings_of(config), overwrite)
    store = folder.cells()
    if config.inr_dir is not None:
        zoo = load_inr_folder(config.inr_dir, limit=config.n_images)
    else:
        zoo = load_or_generate_inr_zoo(InrZooConfig(n_images=config.n_images, data_dir=config.data_dir,
                                                    steps=config.fit_steps, shared_init=config.shared_init),
                                       config.cache_dir, progress)
    spec = inr_spec()
    train = zoo.splits["train"]
    rms = {n: zoo.params[n][train].square().mean().sqrt() for n in spec.param_shapes()}
    x = {n: (v / rms[n]).unsqueeze(-1) for n, v in zoo.params.items()}
    one_hot = F.one_hot(zoo.labels.long(), CLASSES).float()
    test = zoo.splits["test"]
    test_params = {n: v[test] for n, v in zoo.params.items()}
    pixels = grid_coordinates()[torch.randperm(28 * 28, generator=torch.Generator().manual_seed(1234))[:config.grad_points]]
    gradients = lambda params: inr_gradient_sets(params, pixels, spec)      
    features = gradients(zoo.params) if any(map(reads_gradients, config.backbones)) else None
    bar = tqdm(total=len(config.backbones) * config.seeds, desc="ws-bench", unit="fit", disable=not progress)
    for name in config.backbones:
        for seed in range(config.seeds):
            key, settings = f"{name}/{seed}", cell_settings(name, config)
            if name in CLASSICAL and store.get(key, settings) is None:
                start = time.perf_counter()
                model, info = classical_cell(name, classical_features(name, zoo.params, spec, pixels),
                                             zoo.labels.numpy(), zoo.splits, seed)
                scores, changes, original = {}, {}, None
                for variant, (params, _) in changed_test_networks(test_params, spec, config.widen_by, seed).items():
                    proba = model.predict_proba(classical_features(name, params, spec, pixels))
                    logits = torch.from_numpy(np.log(np.clip(proba, 1e-12, None)))
                    original = logits if original is None else original
                    score = variant_scores(logits, original, zoo.labels[test], f"{name} accuracy ({variant})")
                    scores[variant], changes[variant] = score["accuracy"], score["logit_change"]
                store.put(key, settings, {"accuracy": scores, "logit_change": changes, "chosen": info,
                                          "converged": True, "seconds": time.perf_counter() - start})
            elif store.get(key, settings) is None:
                torch.manual_seed(seed)
                model = _backbone(name, spec, config)
                start = time.perf_counter()
                predict = lambda m, idx: m(*model_inputs(name, spec, x, features, idx))
                fit = fit_regression(model, predict, one_hot, train,
                                     zoo.splits["val"], test, config.epochs, config.batch_size, config.lr, seed,
                                     loss=F.cross_entropy, schedule="cosine", patience=config.patience,
                                     checkpoint=store.checkpoint(key, settings))
                scores, changes, original = {}, {}, None
                for variant, (params, variant_spec) in changed_test_networks(test_params, spec, config.widen_by, seed).items():
                    if reads_gradients(name) and variant_spec != spec:
                        scores[variant] = changes[variant] = None   # gradient sets of another architecture
                        continue
                    reader = model
                    if variant_spec != spec:
                        reader = _backbone(name, variant_spec, config)
                        reader.load_state_dict(model.state_dict())
                    logits = model_logits(reader, name, spec, params, rms,
                                          gradients(params) if reads_gradients(name) else None)
                    original = logits if original is None else original
                    score = variant_scores(logits, original, zoo.labels[test], f"{name} accuracy ({variant})")
                    scores[variant], changes[variant] = score["accuracy"], score["logit_change"]
                store.put(key, settings, {"accuracy": scores, "logit_change": changes, "best_epoch": fit.best_epoch,
                                          "converged": fit.converged,
                                          "epochs_run": fit.epochs_run, "val_history": fit.val_history,
                                          "train_history": fit.train_history, "seconds": time.perf_counter() - start})
            bar.update()
    bar.close()
    results = {"experiment": "ws-bench", "config": asdict(config), "published_mnist": PUBLISHED_MNIST,
               "zoo": {"inrs": len(zoo), "source": "published INRs" if zoo.psnr.isnan().all() else "fitted here",
                       "psnr_db": None if zoo.psnr.isnan().all() else zoo.psnr.mean().item(),
                       "splits": {k: len(v) for k, v in zoo.splits.items()}}, "models": {}}
    for name in config.backbones:
        runs = [store.get(f"{name}/{seed}", cell_settings(name, config)) for seed in range(config.seeds)]
        results["models"][name] = {
            "accuracy": {v: dict(zip(("mean", "std"), mean_std(r["accuracy"][v] for r in runs))) for v in VARIANTS
                         if runs[0]["accuracy"].get(v) is not None},
            "runs": [r["accuracy"] for r in runs], "converged": [r["converged"] for r in runs],
            "largest_logit_change": {v: max(r["logit_change"][v] for r in runs) for v in VARIANTS
                                     if all(r.get("logit_change", {}).get(v) is not None for r in runs)},
            "best_epochs": [r.get("best_epoch") for r in runs],
            "curve": {"train": runs[0].get("train_history", []), "val": runs[0].get("val_history", [])}}
    report(results, folder)
    return results


def report(results: dict, folder: RunFolder) -> str:
    """``results.json`` (with provenance), ``table.md``, ``accuracy.png`` and ``learning_curves.png``."""
    out = folder.path
    folder.write_json("results.json", results)
    cfg, z = results["config"], results["zoo"]
    fit = "the published INRs" if z.get("source") == "published INRs" else f"fit PSNR {z['psnr_db']:.1f} dB"
    lines = [f"INR classification, {z['inrs']} INRs ({fit}; test {z['splits']['test']}), "
             f"test accuracy in %, mean ± std over {cfg['seeds']} seed(s); widened: +{cfg['widen_by']} neurons per "
             "hidden space.", "",
             "| backbone | " + " | ".join(LABELS[v] for v in VARIANTS) + " | published (MNIST INRs) |",
             "|---|" + "---:|" * (len(VARIANTS) + 1)]
    for name, row in results["models"].items():
        n = len(row["runs"])
        cells = [format_mean_std(100 * row["accuracy"][v]["mean"], 100 * row["accuracy"][v]["std"], n, 1)
                 if v in row["accuracy"] else "n/a" for v in VARIANTS]
        published = results["published_mnist"].get(name)
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " | " + (f"{published:.2f}" if published else "-")
                     + " |")
    lines += ["", convergence_line({LABELS[n]: r["converged"] for n, r in results["models"].items()
                                    if n not in CLASSICAL}, cfg["patience"], "seeds")]
    changes = {n: r.get("largest_logit_change", {}) for n, r in results["models"].items()}
    moved = [f"{LABELS[n]} {c['permutation']:.1e} / {c['symmetry']:.1e}" for n, c in changes.items()
             if "permutation" in c and "symmetry" in c]
    if moved:
        lines += ["", "Largest change of a test INR's logits under the random permutation / the random symmetry "
                  "(permutations and sign flips), over the spread of the logits (0: the same answers exactly, at any "
                  "accuracy): " + ", ".join(moved) + ". Only the models equivariant to sign flips keep their answers "
                  "under the second: ScaleGMN, and the probe (it reads what the INR computes); StatNN's statistics, "
                  "DWSNet, GMN and GradMetaNet respect permutations only, and a backbone with gradient features keeps "
                  "only what its GradMetaNet keeps."]
    lines += ["", "Published numbers are on the MNIST INRs (70,000 images); this run read the published INRs, so "
              "values compare (our models are smaller and trained shorter than the papers')." if z.get("source") ==
              "published INRs" else "Published numbers are on MNIST INRs (70,000 images); ours by default on the "
              "1,797 scikit-learn digits upsampled to 28 x 28: compare orderings, not values."]
    table = "\n".join(lines)
    atomic_write_text(out / "table.md", table + "\n")
    names = list(results["models"])
    with figure(out / "accuracy.png", "backbone", "test accuracy (%)", "INR classification and function-preserving "
                "changes", size=(7.5, 4.2)) as ax:
        width = 0.8 / len(VARIANTS)
        for i, v in enumerate(VARIANTS):
            ax.bar([j + i * width for j in range(len(names))],
                   [100 * results["models"][n]["accuracy"].get(v, {"mean": 0.0})["mean"] for n in names], width,
                   label=LABELS[v])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], [LABELS[n] for n in names])
    learning_curves(out / "learning_curves.png",
                    {LABELS[n]: (r["curve"]["train"], r["curve"]["val"]) for n, r in results["models"].items()
                     if n not in CLASSICAL},
                    "cross-entropy (per class)", "INR classification: learning curves (seed 0)")
    return table
