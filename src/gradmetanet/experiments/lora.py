"""Learning on LoRAs: predict properties of a fine-tune from its adapter alone (LoL, Putterman et al.).

Two zoos: rank-4 LoRA fine-tunes of a digits classifier (:mod:`gradmetanet.zoos.lora`, ``zoo="digits"``)
and of a small character-level language model on the sections of the built-in corpus
(:mod:`gradmetanet.zoos.lora_lm`, ``zoo="lm"``). Every model reads only the adapters and
predicts three targets:

- ``membership``: which classes (sections) were in the fine-tuning data (one logit each, binary
  cross-entropy; metric: the accuracy over the bits);
- the quality: ``accuracy``, the fine-tuned classifier's test accuracy, or ``loss``, the fine-tuned
  language model's held-out loss (MSE on the standardised target; metrics R² and Kendall's tau);
- ``data_size``: the log number of fine-tuning examples (same metrics).

Models: GL-net, an MLP on raw factors, the same trained with random GL(r) elements per layer as
augmentation, an MLP on factors aligned to a template by orthogonal Procrustes, an MLP on the dense
``dW``, an MLP on singular values. Splits 70/15/15; every model
keeps its best-validation epoch. A second, smaller zoo of rank-8 fine-tunes of the same base
tests the models that accept another rank, without retraining. The speed-up is the time to
predict a fine-tune's accuracy with GL-net against evaluating the merged network on the test split.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..atomic import atomic_write_text
from ..plots import figure, learning_curves
from ..zoos.lora_lm import LmLoraZooConfig, load_or_generate_lm_lora_zoo
from ..zoos.lora import AdapterZoo, LoraZooConfig, load_or_generate_lora_zoo
from ..data.text import corpus_version
from ..lora.models import AlignMLP, DenseMLP, GLNet, RawMLP, SpectrumMLP
from ..metanets.training import fit_regression
from . import apply_preset, convergence_line
from .store import RunFolder, settings_of, write_results

__all__ = ["LoraConfig", "PRESETS", "run", "config_from_preset", "MODELS", "TARGETS"]

MODELS = ("glnet", "raw_mlp", "raw_mlp_gl_aug", "align_mlp", "dense_mlp", "spectrum_mlp")
LABELS = {"glnet": "GL-net", "raw_mlp": "MLP (raw factors)", "raw_mlp_gl_aug": "MLP (raw, GL augmentation)",
          "align_mlp": "MLP (O(r)-aligned factors)", "dense_mlp": "MLP (dense dW)",
          "spectrum_mlp": "MLP (singular values)"}
TARGETS = ("membership", "accuracy", "loss", "data_size")
ZOOS = ("digits", "lm")
#: models whose input size does not depend on the rank (they run on the unseen-rank zoo)
RANK_FREE = ("glnet", "dense_mlp")


@dataclass
class LoraConfig:
    zoo_kind: str = "digits"              # digits | lm
    n_loras: int = 2000
    rank: int = 4
    unseen_rank: int = 8
    n_unseen: int = 200
    steps: tuple[int, int] = (30, 300)
    models: tuple[str, ...] = MODELS
    targets: tuple[str, ...] = ()         # default: the zoo's (membership, accuracy or loss, data_size)
    epochs: int = 40
    patience: int | None = None           # stop a fit after this many epochs without a better validation loss
    batch_size: int = 32
    lr: float = 1e-3
    hidden: int = 64
    base_steps: int | None = None         # the base network's training steps (default: the zoo's)
    seed: int = 0
    cache_dir: str | None = os.environ.get("GRADMETANET_CACHE", str(Path.home() / ".cache" / "gradmetanet"))

    def __post_init__(self) -> None:
        unknown = [m for m in self.models if m not in MODELS] + [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise ValueError(f"unknown models or targets {unknown}; models: {list(MODELS)}, targets: {list(TARGETS)}")
        if self.zoo_kind not in ZOOS:
            raise ValueError(f"unknown zoo {self.zoo_kind!r}; choose from {list(ZOOS)}")

    def zoo(self, rank: int | None = None, n: int | None = None) -> LoraZooConfig | LmLoraZooConfig:
        kind = LmLoraZooConfig if self.zoo_kind == "lm" else LoraZooConfig
        extra = {"base_steps": self.base_steps} if self.base_steps else {}
        return kind(n_loras=n or self.n_loras, rank=rank or self.rank, steps=self.steps, seed=self.seed, **extra)

    def load_zoo(self, rank: int | None = None, n: int | None = None, progress: bool = True) -> AdapterZoo:
        """The zoo of this configuration (cached in ``cache_dir``)."""
        load = load_or_generate_lm_lora_zoo if self.zoo_kind == "lm" else load_or_generate_lora_zoo
        return load(self.zoo(rank, n), self.cache_dir, progress)


PRESETS = {
    "paper": LoraConfig(n_loras=5000, epochs=200, patience=20),
    # a cap, not a length: the rate is constant, so a fit that stops by patience ends where it would under any cap
    "cpu": LoraConfig(epochs=300, patience=10),
    "quick": LoraConfig(n_loras=600, n_unseen=100, epochs=25),
    "tiny": LoraConfig(n_loras=40, n_unseen=8, steps=(5, 15), epochs=2, hidden=8, cache_dir=None),
    "lm-tiny": LoraConfig(zoo_kind="lm", n_loras=40, n_unseen=8, steps=(5, 15), epochs=2, hidden=8, base_steps=50,
                          cache_dir=None),
    "lm-quick": LoraConfig(zoo_kind="lm", n_loras=600, n_unseen=100, epochs=25),
    "lm-cpu": LoraConfig(zoo_kind="lm", n_loras=2000, epochs=300, patience=10),
}


def config_from_preset(preset: str, **overrides) -> LoraConfig:
    return apply_preset(PRESETS, preset, overrides)


def build_model(name: str, zoo: AdapterZoo, out_features: int, config: LoraConfig,
                template: int = 0) -> nn.Module:
    """Model ``name`` for the zoo's layers (``template``: the training fine-tune the aligned MLP rotates to)."""
    shapes, h = zoo.layer_shapes, config.hidden
    if name == "glnet":      # d = 32: vec(U V^T) has about as many entries as these layers' dense dW; one
        return GLNet(shapes, out_features, hidden=32, layers=1, head_hidden=h)   # layer, as the released scripts
    if name in ("raw_mlp", "raw_mlp_gl_aug"):
        return RawMLP(shapes, out_features, rank=config.rank, hidden=h)
    if name == "align_mlp":
        return AlignMLP(shapes, out_features, rank=config.rank, template=zoo.batch(slice(template, template + 1)),
                        hidden=h)
    if name == "dense_mlp":
        return DenseMLP(shapes, out_features, hidden=h)
    if name == "spectrum_mlp":
        return SpectrumMLP(shapes, out_features, rank=config.rank, hidden=h)
    raise ValueError(f"unknown model {name!r}")


def _metrics(target: str, prediction: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    if target == "membership":
        return {"bit_accuracy": ((prediction > 0).float() == truth).float().mean().item()}
    from scipy.stats import kendalltau

    p, t = prediction[:, 0], truth[:, 0]
    r2 = 1 - (p - t).square().sum() / (t - t.mean()).square().sum()
    return {"r2": r2.item(), "kendall_tau": float(kendalltau(p.numpy(), t.numpy()).statistic)}


def _train(name: str, target: str, zoo: AdapterZoo, split: dict[str, torch.Tensor], config: LoraConfig,
           ) -> tuple[nn.Module, dict, float, float]:
    y = zoo.target(target)
    mean = y[split["train"]].mean(0) if target != "membership" else torch.zeros(y.shape[1])
    std = y[split["train"]].std(0) if target != "membership" else torch.ones(y.shape[1])
    y_norm = (y - mean) / std
    torch.manual_seed(config.seed)
    model = build_model(name, zoo, y.shape[1], config, template=int(split["train"][0]))
    loss = F.binary_cross_entropy_with_logits if target == "membership" else F.mse_loss
    gen = torch.Generator().manual_seed(config.seed)

    def predict(m: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        return m(zoo.batch(idx))

    def augmented(m: nn.Module, idx: torch.Tensor) -> torch.Tensor:       # a fresh GL(r) element per layer
        batch = zoo.batch(idx)
        return m(batch.transform(batch.spec().sample(gen)))

    start = time.perf_counter()
    fit = fit_regression(model, predict, y_norm, split["train"], split["val"], split["test"], config.epochs,
                         config.batch_size, config.lr, config.seed, loss=loss,
                         train_predict=augmented if name == "raw_mlp_gl_aug" else None, patience=config.patience)
    model.eval()
    with torch.no_grad():
        pred = predict(model, split["test"]) * std + mean
    row = {"best_epoch": fit.best_epoch, "converged": fit.converged, "seconds": time.perf_counter() - start,
           "train_history": fit.train_history, "val_history": fit.val_history,
           "parameters": sum(p.numel() for p in model.parameters()),
           **_metrics(target, pred, y[split["test"]])}
    return model, row, mean, std


def _speedup(model: nn.Module, zoo: AdapterZoo, n: int = 256) -> dict[str, float]:
    """Seconds per fine-tune: GL-net's prediction of the quality against evaluating the merged network."""
    n = min(n, len(zoo))
    batch = zoo.batch(slice(0, n))
    net, data = zoo.evaluation_data()
    model.eval()
    with torch.no_grad():
        start = time.perf_counter()
        model(batch)
        predict = (time.perf_counter() - start) / n
        dws = batch.delta_weights()
        start = time.perf_counter()
        for i in range(n):
            zoo.evaluate(zoo.merged(dws, i), net, data)
        evaluate = (time.perf_counter() - start) / n
    return {"predict_seconds": predict, "evaluate_seconds": evaluate, "speedup": evaluate / predict,
            "test_examples": len(data[1])}


def run(config: LoraConfig, out_dir: str | os.PathLike, progress: bool = True, overwrite: bool = False) -> dict:
    """Every model on every target; the unseen-rank zoo; the speed-up; ``results.json``, ``table.md``, a PNG (the
    run folder is checked before any compute)."""
    out = RunFolder(out_dir, "lora", settings_of(config), overwrite).path
    zoo = config.load_zoo(progress=progress)
    unseen = config.load_zoo(config.unseen_rank, config.n_unseen, progress)
    quality = zoo.quality
    order = torch.randperm(len(zoo), generator=torch.Generator().manual_seed(config.seed))
    n_train, n_val = int(0.7 * len(zoo)), int(0.15 * len(zoo))
    split = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    targets = config.targets or zoo.targets
    results = {"experiment": "lora", "config": asdict(config), "zoo": {
        "kind": config.zoo_kind, "loras": len(zoo), "rank": config.rank, "quality": quality,
        f"base_{quality}": getattr(zoo, f"base_{quality}"),
        f"mean_finetuned_{quality}": getattr(zoo, quality).mean().item()}, "targets": {}, "unseen_rank": {}}
    if config.zoo_kind == "lm":
        results["corpus"] = corpus_version()
    scatter = {}
    bar = tqdm(total=len(config.models) * len(targets), desc="LoRA models", disable=not progress)
    for target in targets:
        rows = {}
        for name in config.models:
            model, rows[name], mean, std = _train(name, target, zoo, split, config)
            if target == quality:
                with torch.no_grad():
                    scatter[name] = ((model(zoo.batch(split["test"])) * std + mean)[:, 0].tolist(),
                                     zoo.target(quality)[split["test"], 0].tolist())
                if name in RANK_FREE:
                    with torch.no_grad():
                        pred = model(unseen.batch(slice(None))) * std + mean
                    results["unseen_rank"][name] = _metrics(target, pred, unseen.target(quality))
                if name == "glnet":
                    results["speed"] = _speedup(model, zoo)
            bar.update()
        results["targets"][target] = rows
    bar.close()
    report(results, scatter, out)
    return results


#: per zoo: what its fine-tunes are, what the quality is, what the speed-up evaluates on
_WORDS = {"digits": ("a digits MLP", "accuracy", "test images"),
          "lm": ("a character-level transformer (pydoc text)", "held-out loss", "held-out windows")}


def report(results: dict, scatter: dict, out: Path) -> str:
    write_results(out / "results.json", results, results["config"].get("device", "cpu"))
    z = results["zoo"]
    kind = z.get("kind", "digits")
    q = z.get("quality", "accuracy")
    base, words, evaluated = _WORDS[kind]
    lines = [f"{z['loras']} rank-{z['rank']} LoRA fine-tunes of {base} (base {words} {z[f'base_{q}']:.3f}, "
             f"fine-tuned mean {z[f'mean_finetuned_{q}']:.3f}); 70/15/15 split, best-validation epoch.", "",
             f"| model | params | membership: bit accuracy | {words}: R² | {words}: tau | data size: R² | "
             "data size: tau |", "|---|---:|---:|---:|---:|---:|---:|"]
    t = results["targets"]

    def cell(target: str, name: str, key: str) -> str:
        return f"{t[target][name][key]:.3f}" if target in t and name in t[target] else "-"

    for name in results["config"]["models"]:
        params = next(t[target][name]["parameters"] for target in t if name in t[target])
        lines.append(f"| {LABELS[name]} | {params:,} | {cell('membership', name, 'bit_accuracy')} | "
                     f"{cell(q, name, 'r2')} | {cell(q, name, 'kendall_tau')} | "
                     f"{cell('data_size', name, 'r2')} | {cell('data_size', name, 'kendall_tau')} |")
    if results["unseen_rank"]:
        rank = results["config"]["unseen_rank"]
        lines += ["", f"{words.capitalize()} predicted on rank-{rank} fine-tunes of the same base, without retraining "
                  "(the other models cannot read another rank):", "", "| model | R² | tau |", "|---|---:|---:|"]
        for name, m in results["unseen_rank"].items():
            lines.append(f"| {LABELS[name]} | {m['r2']:.3f} | {m['kendall_tau']:.3f} |")
    if "speed" in results:
        s = results["speed"]
        lines += ["", f"Predicting a fine-tune's {words} with GL-net takes {1e6 * s['predict_seconds']:.1f} µs; "
                  f"evaluating the merged network on the {s['test_examples']} {evaluated} takes "
                  f"{1e6 * s['evaluate_seconds']:.1f} µs: {s['speedup']:.0f}× faster."]
    lines += ["", convergence_line({LABELS[n]: [t[target][n].get("converged", False) for target in t if n in t[target]]
                                    for n in results["config"]["models"]}, results["config"].get("patience"),
                                   "targets")]
    table = "\n".join(lines)
    atomic_write_text(out / "table.md", table + "\n")
    if scatter:
        _plot(scatter, words, out / f"{q}.png")
    curves = {f"{target}: {LABELS[name]}": (row["train_history"], row["val_history"])
              for target, rows in t.items() for name, row in rows.items() if row.get("val_history")}
    if curves:
        learning_curves(out / "learning_curves.png", curves, "loss (standardised targets; membership: BCE)",
                        "LoRA fine-tunes: learning curves")
    return table


def _plot(scatter: dict, words: str, path: Path) -> None:
    with figure(path, f"true {words} of the fine-tune", "predicted from the adapter alone",
                f"LoRA fine-tunes: {words} from weights", size=(5.2, 5.0)) as ax:
        for name, (pred, true) in scatter.items():
            ax.scatter(true, pred, s=6, alpha=0.6, label=LABELS[name])
        lo, hi = ax.get_xlim()
        ax.plot([lo, hi], [lo, hi], color="black", lw=0.8)
