"""One-shot fine-tuning of model zoos (Kuipers et al., "Symmetry-Aware Fully-Amortized Optimization with Scale
Equivariant Graph Metanetworks", Table 1).

For every zoo (:mod:`gradmetanet.zoos.classifier`) and every ``lambda``, a metanetwork is trained on the
training networks to minimise ``lambda ||theta'||_1 + CE(net_theta'(x), y)`` on training images, with
``theta' = theta + s * delta`` (:class:`~gradmetanet.zoos.OnePassFineTuner`); it keeps its
best-validation epoch (validation networks on validation images). Compared on held-out networks and
held-out images: the networks before fine-tuning, ScaleGMN-B (one pass), GMN-B with the symmetry broken
(the same network without canonicalisation, one pass), beyond the paper ScaleGMN-B reading each network's
gradient on one fixed batch of ``probe_images`` training images (``scalegmn_grad``: one backward pass more,
see :mod:`gradmetanet.metanets.finetuner`) and SGD on the same objective for 25 / 50 / 100 /
150 epochs (heavy-ball momentum 0.9, batch ``sgd_batch``; its learning rate chosen per epoch budget from
``sgd_lrs`` on ``sgd_tune_networks`` validation networks by their validation objective).

Seconds per network: the metanetwork's forward pass over the evaluated networks (batches of ``net_batch``;
with the gradient feature's backward pass included)
and SGD's vectorised run over them, both divided by the number of networks; SGD run one network at a
time costs more, so the ratio we report is the conservative one.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..metanets import OnePassFineTuner, gradient_features
from ..zoos import evaluate_networks, objective, sgd_finetune
from ..metanets.finetuner import MODELS
from ..atomic import atomic_write_text
from ..plots import learning_curves
from ..core.spec import NetworkSpec
from ..zoos.classifier import ClassifierZoo, ClassifierZooConfig, load_or_generate_classifier_zoo
from ..metanets.training import fit_regression
from . import apply_preset, best_on_grid, convergence_line, on_grid_edge
from .store import CellStore, RunFolder, settings_of
from ..capture import spec_of

__all__ = ["AmortizeConfig", "PRESETS", "config_from_preset", "run", "zoo_config"]

LABELS = {"before": "Before fine-tuning", "scalegmn": "ScaleGMN-B (1 pass)", "gmn_broken": "GMN-B, sym. broken (1 pass)",
          "gmn": "GMN-B (1 pass)", "scalegmn_grad": "ScaleGMN-B + gradient (1 pass)"}


@dataclass
class AmortizeConfig:
    zoos: tuple[str, ...] = ("cnn-tanh", "mlp-tanh")   # architecture-activation[-mnist1d][-long]
    networks: int = 1000                               # per zoo
    zoo_steps: tuple[int, int] = (20, 300)
    lambdas: tuple[float, ...] = (0.0, 1e-3)
    models: tuple[str, ...] = ("scalegmn", "gmn_broken")
    hidden: int = 32
    layers: int = 3
    out_scale: float = 1.0
    epochs: int = 20                                   # metanetwork epochs over the training networks (a cap
    patience: int | None = None                        # with patience: stop after that many epochs without gain)
    net_batch: int = 16
    image_batch: int = 128
    lr: float = 1e-2
    probe_images: int = 256                            # the fixed batch scalegmn_grad reads gradients on
    sgd_epochs: tuple[int, ...] = (25, 50, 100, 150)
    sgd_lrs: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)    # a log grid with room above the usual 0.1
    sgd_batch: int = 128
    sgd_tune_networks: int = 8
    eval_networks: int = 64                            # held-out networks every method is scored on
    seed: int = 0
    cache_dir: str | None = os.environ.get("GRADMETANET_CACHE", str(Path.home() / ".cache" / "gradmetanet"))

    def __post_init__(self) -> None:
        bad = [m for m in self.models if m not in MODELS]
        if bad:
            raise ValueError(f"unknown models {bad}; choose from {list(MODELS)}")
        for name in self.zoos:
            zoo_config(self, name)


#: zoo recipes other than the default (``zoo_steps`` SGD steps per network): ``long`` trains every network
#: 2,000-4,000 steps, towards its plateau (on MNIST-1D: over-fitted, where SGD fine-tuning moves slowly);
#: ``diverse`` draws every part of the recipe from a wide range, as the Small CNN Zoo does (50-4,000 steps, rates
#: 0.001-0.3, 2-60% of the training images), so the zoo's best networks lie far above its mean
RECIPES = {"long": {"steps": (2000, 4000)},
           "diverse": {"steps": (50, 4000), "lr": (1e-3, 3e-1), "subset": (0.02, 0.6)}}


def zoo_config(config: AmortizeConfig, name: str) -> ClassifierZooConfig:
    """``cnn-tanh``, ``mlp-relu``, ``mlp-tanh-mnist1d``, ``mlp-tanh-mnist1d-long`` (a :data:`RECIPES` suffix), ... as
    a zoo configuration."""
    parts = name.split("-")
    recipe = RECIPES[parts.pop()] if len(parts) > 2 and parts[-1] in RECIPES else {}
    if len(parts) not in (2, 3):
        raise ValueError(f"zoo {name!r} is not architecture-activation[-dataset][-recipe], e.g. cnn-tanh, "
                         f"mlp-relu-mnist1d or mlp-tanh-mnist1d-long (recipes: {list(RECIPES)})")
    return ClassifierZooConfig(architecture=parts[0], activation=parts[1],
                               dataset=parts[2] if len(parts) == 3 else "digits", networks=config.networks,
                               **({"steps": config.zoo_steps} | recipe))


PRESETS = {
    "paper": AmortizeConfig(zoos=("cnn-tanh", "mlp-tanh", "cnn-relu"), networks=5000, hidden=64, layers=4, epochs=100,
                            models=("scalegmn", "gmn_broken", "scalegmn_grad"), eval_networks=500,
                            sgd_tune_networks=32, sgd_lrs=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0)),
    "cpu": AmortizeConfig(zoos=("cnn-tanh", "mlp-tanh", "mlp-relu"), epochs=15,
                          models=("scalegmn", "gmn_broken", "scalegmn_grad"), eval_networks=32, sgd_tune_networks=4,
                          sgd_epochs=(1, 25, 50, 100, 150)),
    "quick": AmortizeConfig(zoos=("cnn-tanh", "mlp-tanh"), networks=300, epochs=10,
                            models=("scalegmn", "gmn_broken", "scalegmn_grad"), eval_networks=24, sgd_tune_networks=4,
                            sgd_epochs=(1, 5, 25)),
    "tiny": AmortizeConfig(zoos=("mlp-tanh",), networks=24, zoo_steps=(5, 20), epochs=1, hidden=8, layers=1,
                           net_batch=4, image_batch=32, probe_images=16, eval_networks=4, sgd_tune_networks=2,
                           sgd_epochs=(1, 2), sgd_lrs=(0.01, 0.1), models=("scalegmn", "gmn_broken", "scalegmn_grad"),
                           cache_dir=None),
}


def config_from_preset(preset: str, **overrides) -> AmortizeConfig:
    return apply_preset(PRESETS, preset, overrides)


def _take(params: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[idx] for k, v in params.items()}


class _Inputs:
    """What a fine-tuner reads of the zoo's networks: their parameters and, for ``scalegmn_grad``, their gradient
    features on the fixed probe batch (computed when first asked for, then kept)."""

    def __init__(self, zoo: ClassifierZoo, x: torch.Tensor, y: torch.Tensor, config: AmortizeConfig) -> None:
        self.zoo, self.template = zoo, zoo.template()
        probe = zoo.images["train"][torch.randperm(len(zoo.images["train"]),
                                                   generator=torch.Generator().manual_seed(config.seed))]
        self.probe = x[probe[:config.probe_images]], y[probe[:config.probe_images]]
        self.chunk, self._gradients = config.net_batch, None

    def features(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: [len(idx), *shape]}`` gradient features of the networks ``idx`` (computed now, uncached)."""
        parts = [gradient_features(self.template, _take(self.zoo.params, c), *self.probe) for c in idx.split(64)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def all_gradients(self) -> dict[str, torch.Tensor]:
        if self._gradients is None:
            self._gradients = self.features(torch.arange(len(self.zoo)))
        return self._gradients

    def apply(self, model: OnePassFineTuner, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The networks ``idx`` fine-tuned by ``model`` (gradient features from the cache)."""
        grads = _take(self.all_gradients(), idx) if model.reads_gradients else None
        return model(_take(self.zoo.params, idx), grads)


def _mean(values: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The loss of a fit on the zoo objective: ``values [n, 1]`` are the networks' objectives (``target`` zeros)."""
    return values.sum() if reduction == "sum" else values.mean()


def train_finetuner(zoo: ClassifierZoo, spec: NetworkSpec, x: torch.Tensor, y: torch.Tensor, model_name: str,
                    l1: float, config: AmortizeConfig, progress: bool = True, inputs: _Inputs | None = None,
                    checkpoint: str | os.PathLike | None = None) -> tuple[OnePassFineTuner, dict]:
    """A one-pass fine-tuner trained on the zoo's training networks (each step on a fresh draw of training images)
    by :func:`~gradmetanet.metanets.fit_regression` (AdamW, one-cycle schedule, clipped steps), kept at its best
    validation epoch (validation networks on validation images; the untrained fine-tuner is a candidate);
    ``{"val": [...], "train": [...], "before_val", "best_epoch": e (0: untrained), "converged"}`` alongside.
    ``checkpoint``: where the fit keeps its state between epochs (a stopped run resumes mid-fit)."""
    torch.manual_seed(config.seed)
    inputs = inputs or _Inputs(zoo, x, y, config)
    train, val = zoo.networks["train"], zoo.networks["val"]
    rms = {k: v[train].square().mean().sqrt() for k, v in zoo.params.items()}
    gradient_rms = None
    if model_name.endswith("_grad"):
        gradient_rms = {k: v[train].square().mean().sqrt().clamp_min(1e-12) for k, v in inputs.all_gradients().items()}
    model = OnePassFineTuner(spec, rms, model_name, config.hidden, config.layers, config.out_scale, gradient_rms)
    template = zoo.template()
    xi, yi = x[zoo.images["train"]], y[zoo.images["train"]]
    xv, yv = x[zoo.images["val"]], y[zoo.images["val"]]

    def on_training_images(net: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        images = torch.randint(len(xi), (config.image_batch,))
        return objective(template, inputs.apply(net, idx), xi[images], yi[images], l1)[:, None]

    def on_validation_images(net: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        return objective(template, inputs.apply(net, idx), xv, yv, l1)[:, None]

    with torch.no_grad():
        before = sum(objective(template, _take(zoo.params, c), xv, yv, l1).sum().item()
                     for c in val.split(config.net_batch)) / len(val)
    bar = tqdm(total=config.epochs, desc=f"{model_name} lambda={l1:g}", unit="epoch", disable=not progress,
               leave=False)
    fit = fit_regression(model, on_validation_images, torch.zeros(len(zoo), 1), train, val, None, config.epochs,
                         config.net_batch, config.lr, config.seed, loss=_mean, train_predict=on_training_images,
                         schedule="one_cycle", patience=config.patience, checkpoint=checkpoint,
                         optimizer=lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=1e-4), clip_norm=10.0,
                         keep_initial=True,
                         on_epoch=lambda epoch, value: (bar.update(), bar.set_postfix(val=f"{value:.3f}")))
    bar.close()
    return model, {"val": fit.val_history, "train": fit.train_history, "before_val": before,
                   "best_epoch": fit.best_epoch + 1, "epochs_run": fit.epochs_run, "converged": fit.converged}


def _one_pass(model: OnePassFineTuner, inputs: _Inputs, idx: torch.Tensor, batch: int
              ) -> tuple[dict[str, torch.Tensor], float]:
    """The networks ``idx`` fine-tuned, and the seconds per network of the passes (gradient features computed
    inside the timing)."""
    with torch.no_grad():
        start = time.perf_counter()
        parts = [model(_take(inputs.zoo.params, c), inputs.features(c) if model.reads_gradients else None)
                 for c in idx.split(batch)]
        seconds = time.perf_counter() - start
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}, seconds / len(idx)


def _tune_sgd_lr(zoo: ClassifierZoo, x, y, l1: float, config: AmortizeConfig) -> dict[int, float]:
    """Per epoch budget, the learning rate of ``sgd_lrs`` with the lowest validation objective on the first
    ``sgd_tune_networks`` validation networks."""
    template = zoo.template()
    nets = _take(zoo.params, zoo.networks["val"][:config.sgd_tune_networks])
    xv, yv = x[zoo.images["val"]], y[zoo.images["val"]]
    scores = {e: {} for e in config.sgd_epochs}
    for lr in config.sgd_lrs:
        runs = sgd_finetune(template, nets, x[zoo.images["train"]], y[zoo.images["train"]], l1, lr, config.sgd_epochs,
                            config.sgd_batch, seed=config.seed)
        for epoch, (p, _) in runs.items():
            with torch.no_grad():
                value = objective(template, p, xv, yv, l1).mean().item()
            scores[epoch][lr] = value
    return {e: best_on_grid(s) for e, s in scores.items()}


# The settings each kind of cell depends on; the cell's key names its zoo, lambda, method and epoch budget.
_ZOO_FIELDS = ("networks", "zoo_steps", "seed", "eval_networks")
_CELL_FIELDS = {
    "before": _ZOO_FIELDS,
    "model": _ZOO_FIELDS + ("hidden", "layers", "out_scale", "epochs", "patience", "net_batch", "image_batch",
                            "lr", "probe_images"),
    "sgd": _ZOO_FIELDS + ("sgd_lrs", "sgd_batch", "sgd_tune_networks"),  # budgets are snapshots of one run
}


class _Cells:
    """The run's cells in the one result store, each kind keyed by the settings it depends on (so a wider
    ``sgd_lrs`` recomputes the SGD cells alone); reads like a dict of the cells valid for ``config``."""

    def __init__(self, store: CellStore, config: AmortizeConfig) -> None:
        self.store = store
        settings = json.loads(json.dumps(asdict(config)))
        self.wanted = {kind: {f: settings[f] for f in fields} for kind, fields in _CELL_FIELDS.items()}

    @staticmethod
    def kind(key: str) -> str:
        """``before``, ``sgd`` or ``model`` for ``zoo/lambda=v/<method>[/<epochs>]``."""
        method = key.split("/")[2]
        return method if method in ("before", "sgd") else "model"

    def checkpoint(self, key: str) -> Path:
        """Where the fit computing cell ``key`` keeps its state between epochs."""
        return self.store.checkpoint(key, self.wanted[self.kind(key)])

    def __contains__(self, key: str) -> bool:
        return self.store.get(key, self.wanted[self.kind(key)]) is not None

    def __getitem__(self, key: str) -> dict:
        value = self.store.get(key, self.wanted[self.kind(key)])
        if value is None:
            raise KeyError(key)
        return value

    def save(self, key: str, value: dict) -> None:
        self.store.put(key, self.wanted[self.kind(key)], value)


def run(config: AmortizeConfig, out_dir: str | os.PathLike, progress: bool = True, overwrite: bool = False) -> dict:
    """Every zoo x lambda x method; ``results.json``, ``table.md``, ``accuracies.png``. The run folder is checked
    before any compute; finished cells are kept in ``cells.json`` with the settings each depends on and the code
    version (:class:`_Cells`): a rerun resumes, and one with other settings (``overwrite``) recomputes only the
    cells whose settings changed (a wider ``sgd_lrs`` reruns SGD alone)."""
    folder = RunFolder(out_dir, "amortize", settings_of(config), overwrite)
    out = folder.path
    cells = _Cells(folder.cells(), config)
    save = cells.save
    zoos_info = {}

    for name in config.zoos:
        zoo = load_or_generate_classifier_zoo(zoo_config(config, name), config.cache_dir, progress)
        x, y = zoo.data()
        template = zoo.template()
        spec = spec_of(template, x[:2])
        test = zoo.networks["test"][:config.eval_networks]
        inputs = _Inputs(zoo, x, y, config)
        nets = _take(zoo.params, test)
        xt, yt = x[zoo.images["test"]], y[zoo.images["test"]]
        zoos_info[name] = {"networks": len(zoo), "parameters": sum(v[0].numel() for v in zoo.params.values()),
                           "zoo_test_accuracy": zoo.accuracy.mean().item(), "evaluated_networks": len(test),
                           "images": {k: len(v) for k, v in zoo.images.items()},
                           "groups": [s.group.name for s in spec.spaces]}
        for l1 in config.lambdas:
            prefix = f"{name}/lambda={l1:g}"
            if f"{prefix}/before" not in cells:
                save(f"{prefix}/before", evaluate_networks(template, nets, nets, xt, yt, l1, None).as_dict())
            for model_name in config.models:
                if f"{prefix}/{model_name}" in cells:
                    continue
                start = time.perf_counter()
                model, history = train_finetuner(zoo, spec, x, y, model_name, l1, config, progress, inputs,
                                                 cells.checkpoint(f"{prefix}/{model_name}"))
                tuned, seconds = _one_pass(model, inputs, test, config.net_batch)
                metrics = evaluate_networks(template, tuned, nets, xt, yt, l1, seconds).as_dict()
                save(f"{prefix}/{model_name}", metrics | {"training_seconds": time.perf_counter() - start,
                                                          "history": history})
            if all(f"{prefix}/sgd/{e}" in cells for e in config.sgd_epochs):
                continue
            chosen = _tune_sgd_lr(zoo, x, y, l1, config)
            budgets = {lr: tuple(e for e, c in chosen.items() if c == lr) for lr in sorted(set(chosen.values()))}
            bar = tqdm(total=sum(max(b) for b in budgets.values()), desc=f"SGD {prefix}", disable=not progress,
                       leave=False)
            for lr, epochs in budgets.items():           # each chosen rate runs as long as its longest budget
                runs = sgd_finetune(template, nets, x[zoo.images["train"]], y[zoo.images["train"]], l1, lr, epochs,
                                    config.sgd_batch, seed=config.seed, progress=bar)
                for epoch, (p, seconds) in runs.items():
                    metrics = evaluate_networks(template, p, nets, xt, yt, l1, seconds / len(test)).as_dict()
                    save(f"{prefix}/sgd/{epoch}", metrics | {"lr": lr})
            bar.close()
    results = _assemble(config, cells)
    folder.write_json("results.json", results)
    atomic_write_text(out / "zoos.json", json.dumps({"config": asdict(config), "zoos": zoos_info}, indent=2))
    atomic_write_text(out / "table.md", report(results, config, zoos_info) + "\n")
    plot_accuracies(results, out / "accuracies.png")
    curves = {f"{name} {lam} {LABELS[m]}": (cell["history"]["train"], cell["history"]["val"])
              for name, by_lambda in results.items() for lam, entry in by_lambda.items()
              for m, cell in entry.items() if isinstance(cell, dict) and cell.get("history", {}).get("val")}
    if curves:
        learning_curves(out / "learning_curves.png", curves, "objective (validation networks and images)",
                        "One-pass fine-tuners: learning curves")
    return results


def _assemble(config: AmortizeConfig, cells: dict) -> dict:
    """``{zoo: {"lambda=v": {"before", <model>..., "sgd": {"25": ...}}}}`` (accuracy lists kept for the plot)."""
    results = {}
    for name in config.zoos:
        for l1 in config.lambdas:
            prefix = f"{name}/lambda={l1:g}"
            entry = {"before": cells[f"{prefix}/before"]}
            entry |= {m: cells[f"{prefix}/{m}"] for m in config.models}
            entry["sgd"] = {str(e): cells[f"{prefix}/sgd/{e}"] for e in config.sgd_epochs}
            results.setdefault(name, {})[f"lambda={l1:g}"] = entry
    return results


def _rows(entry: dict, sgd_lrs: tuple[float, ...]) -> list[tuple[str, dict]]:
    """Table rows; an SGD learning rate at either end of its grid is flagged (the grid may be too narrow)."""
    rows = [(LABELS[k], v) for k, v in entry.items() if k != "sgd"]
    for epochs, cell in entry["sgd"].items():
        flag = ", grid edge" if on_grid_edge(cell["lr"], sgd_lrs) else ""
        rows.append((f"SGD {epochs} ep (lr {cell['lr']:g}{flag})", cell))
    return rows


def report(results: dict, config: AmortizeConfig, zoos: dict) -> str:
    """A Markdown table like the paper's Table 1, one block per zoo and lambda."""
    lines = ["One-shot fine-tuning of zoos: held-out networks on held-out images (accuracy in %, seconds per "
             "network on this machine's CPU; SGD's seconds are its vectorised run divided by the networks).", ""]
    for name, by_lambda in results.items():
        info = zoos.get(name, {})
        lines.append(f"### {name}: {info.get('evaluated_networks', '?')} test networks of {info.get('networks', '?')}, "
                     f"{info.get('parameters', '?')} parameters each")
        lines += ["", "| lambda | method | mean acc | max acc | test loss | sparsity % | s / network |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for lam, entry in by_lambda.items():
            for label, cell in _rows(entry, config.sgd_lrs):
                secs = "–" if cell["seconds_per_net"] is None else f"{cell['seconds_per_net']:.4f}"
                lines.append(f"| {lam.split('=')[1]} | {label} | {100 * cell['mean_acc']:.1f} | "
                             f"{100 * cell['max_acc']:.1f} | {cell['test_loss']:.3f} | {cell['sparsity']:.1f} | {secs} |")
        lines.append("")
    converged = {f"{name} {lam} {LABELS[m]}": [cell["history"]["converged"]]
                 for name, by_lambda in results.items() for lam, entry in by_lambda.items()
                 for m, cell in entry.items() if isinstance(cell, dict) and "converged" in cell.get("history", {})}
    if converged:
        lines.append(convergence_line(converged, None))
    return "\n".join(lines).rstrip()


def plot_accuracies(results: dict, path: Path) -> None:
    """Test-accuracy distributions before, after one pass and after the longest SGD run (the paper's Figure 5), for
    ``lambda = 0`` of every zoo."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    zoos = list(results)
    fig, axes = plt.subplots(1, len(zoos), figsize=(4.2 * len(zoos), 3.2), dpi=130, squeeze=False)
    for ax, name in zip(axes[0], zoos):
        entry = results[name].get("lambda=0") or next(iter(results[name].values()))
        last = max(entry["sgd"], key=int)
        series = [(LABELS["before"], entry["before"])] + [(LABELS[m], entry[m]) for m in entry if m not in
                                                           ("before", "sgd")] + [(f"SGD {last} ep", entry["sgd"][last])]
        bins = torch.linspace(0, 100, 41).tolist()
        for label, cell in series:
            ax.hist([100 * a for a in cell["accuracies"]], bins=bins, alpha=0.45, label=label)
        ax.set_title(name)
        ax.set_xlabel("test accuracy (%)")
        ax.set_ylabel("networks")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
