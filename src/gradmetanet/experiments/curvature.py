"""Curvature estimation (paper section 7.1): predict a SIREN's Fisher diagonal from 128 gradients.

Every learned model reads the decomposed output gradients of a network at ``set_size`` points
and predicts ``diag F`` computed from ``target_points`` independent points; the standard
estimator is the empirical diagonal of the input gradients themselves. The metric is the test
MSE divided by the variance of the test targets (so 1.0 is the error of predicting the mean),
at the epoch of best validation error.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ..atomic import atomic_write_text
from ..plots import figure, learning_curves
from ..features.neurons import GradientBatch
from ..zoos.siren import SirenZoo, SirenZooConfig, load_or_generate_siren_zoo
from ..metanets import BatchAsymmetric, GradMetaNet, GradMetaNetPlusPlus, MLPConcat, NeuronAsymmetric, WeightSpaceNet
from ..core.spec import NetworkSpec
from ..metanets.baselines import weight_space_inputs
from ..features.normalise import GradientScale, NeuronNormaliser, WeightSpaceNormaliser
from ..metanets.training import Predictor, fit_regression, has_converged
from ..features.weightspace import flatten_weights
from . import apply_preset, convergence_line, format_mean_std, mean_std
from .store import RunFolder, require_finite, settings_of
from .curvature_reference import per_layer_shares, product_of_means, quadrature, target_noise

__all__ = ["CurvatureConfig", "PRESETS", "MODEL_KEYS", "INPUT_MODES", "run", "report", "build_model", "Prepared",
           "prepare", "gradient_predictor", "input_channels"]

MODEL_KEYS = ("gradmetanet", "gradmetanet_set", "gradmetanet++", "mlp_concat", "neuron_asym", "batch_asym",
              "ws_concat", "ws_average")
#: closed-form rows that explain the table (:mod:`.curvature_reference`); not baselines of the paper
REFERENCE_KEYS = ("product_of_means", "quadrature", "target_noise")
LABELS = {"standard": "Standard estimator", "gradmetanet": "GradMetaNet",
          "gradmetanet_set": "GradMetaNet, same-example head", "gradmetanet++": "GradMetaNet++",
          "mlp_concat": "MLP + Concat", "neuron_asym": "Neuron-Asymmetric", "batch_asym": "Batch-Asymmetric",
          "ws_concat": "Weight-space + Concat", "ws_average": "Weight-space + Average",
          "product_of_means": "Reference: product of means", "quadrature": "Reference: quadrature",
          "target_noise": "Reference: target noise (floor)"}
InputMode = Literal["raw", "squares", "scale_free"]
#: what each gradient-set model reads (:meth:`Prepared.inputs`; default ``"raw"``): the GradMetaNets read
#: each network's ``g`` divided by its per-space scale, with ``a^2, g^2`` channels beside ``a, g``, and
#: their outputs are multiplied back by the scale (:func:`gradient_predictor`)
INPUT_MODES: dict[str, InputMode] = {"gradmetanet": "scale_free", "gradmetanet_set": "scale_free",
                                     "gradmetanet++": "scale_free"}
METRIC = "test MSE of diag(F) / variance of the test targets (best-validation epoch)"


@dataclass
class CurvatureConfig:
    """Everything a curvature run depends on (the same config and seed give the same table)."""

    train_sizes: tuple[int, ...] = (10, 30, 100, 300, 1000, 2000)
    n_val: int = 500
    n_test: int = 500
    set_size: int = 128
    target_points: int = 1024
    omega_0: float = 1.0
    epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    schedule: str = "cosine"
    patience: int | None = None             # stop a fit after this many epochs without a better validation error
    seeds: int = 5
    models: tuple[str, ...] = MODEL_KEYS
    zoo_seed: int = 0
    device: str = "cpu"
    cache_dir: str | None = field(default_factory=lambda: os.environ.get(
        "GRADMETANET_CACHE", str(Path.home() / ".cache" / "gradmetanet")))

    def __post_init__(self) -> None:
        unknown = [m for m in self.models if m not in MODEL_KEYS]
        if unknown:
            raise ValueError(f"unknown curvature models {unknown}; choose from {list(MODEL_KEYS)}")
        if not self.train_sizes or min(self.train_sizes) < 1:
            raise ValueError(f"train_sizes must be positive, got {self.train_sizes}")

    def zoo(self) -> SirenZooConfig:
        return SirenZooConfig(n_networks=self.n_test + self.n_val + max(self.train_sizes), set_size=self.set_size,
                              target_points=self.target_points, omega_0=self.omega_0, seed=self.zoo_seed)

    def key(self) -> str:
        data = {k: v for k, v in asdict(self).items() if k not in ("device", "cache_dir", "seeds", "models")}
        return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


PRESETS: dict[str, CurvatureConfig] = {
    "paper": CurvatureConfig(patience=15),
    "cpu": CurvatureConfig(train_sizes=(500, 2000), n_val=250, epochs=100, patience=15, seeds=1,
                           models=("gradmetanet", "gradmetanet_set")),
    # make demo: about 6 minutes on one CPU thread; GradMetaNet++ (attention over the set) would take 17 more
    "quick": CurvatureConfig(train_sizes=(100, 1000), n_val=200, n_test=300, set_size=32, epochs=25, seeds=1,
                             models=tuple(k for k in MODEL_KEYS if k != "gradmetanet++")),
    "tiny": CurvatureConfig(train_sizes=(8,), n_val=8, n_test=8, set_size=8, target_points=32, epochs=2, seeds=1),
}


# ---------------------------------------------------------------------------------------------- models
def build_model(key: str, spec: NetworkSpec, set_size: int) -> nn.Module:
    """The model ``key`` at the size used here (about 15K parameters where the input allows)."""
    channels = 2 if INPUT_MODES.get(key, "raw") == "raw" else 4
    fixed = len(spec.fixed_neurons())
    if key == "gradmetanet":
        return GradMetaNet(channels, hidden=32, set_layers=2, neuron_layers=2, head_hidden=32, fixed_neurons=fixed)
    if key == "gradmetanet_set":
        return GradMetaNet(channels, hidden=32, set_layers=2, neuron_layers=1, head_hidden=32, fixed_neurons=fixed,
                           head="set_product", head_rank=32, head_layers=1, bias_product=True)
    if key == "gradmetanet++":
        return GradMetaNetPlusPlus(channels, hidden=24, heads=4, blocks=2, ffn_mult=1, head_hidden=24, pe_dim=8)
    if key == "mlp_concat":
        return MLPConcat(spec, set_size, hidden=16, layers=3)
    if key == "neuron_asym":
        return NeuronAsymmetric(spec, hidden=12, phi_layers=2, rho_layers=1)
    if key == "batch_asym":
        return BatchAsymmetric(set_size, hidden=16, set_layers=2, neuron_layers=2, pe_dim=8)
    if key == "ws_concat":
        return WeightSpaceNet(spec, in_channels=set_size, hidden=16, layers=3, mode="concat")
    if key == "ws_average":
        return WeightSpaceNet(spec, in_channels=1, hidden=32, layers=3, mode="average")
    raise ValueError(f"unknown model {key!r}; choose from {list(MODEL_KEYS)}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- data
def input_channels(features: torch.Tensor, squared: bool) -> torch.Tensor:
    """``[..., 2] -> [..., 4]`` with ``a^2, g^2`` appended when ``squared`` (the Fisher is built of them;
    a normaliser then scales each channel per space, which a model could not do on ``a, g`` alone)."""
    return torch.cat([features, features.square()], -1) if squared else features


@dataclass
class Prepared:
    """Normalised inputs and targets for one train/val/test split of the zoo (statistics from the training
    networks). Every model is trained on the same targets, so on the same loss."""

    spec: NetworkSpec
    raw: torch.Tensor                 # [M, b, N, 2] as generated
    train_idx: torch.Tensor
    targets: torch.Tensor             # [M, P] normalised by one scalar mean and std
    target_mean: float
    target_std: float
    output_scale: torch.Tensor        # [M, P] each parameter's gradient scale squared (GradientScale)
    ws_normalisers: dict[str, WeightSpaceNormaliser]
    _inputs: dict[str, torch.Tensor] = field(default_factory=dict)

    def inputs(self, mode: InputMode) -> torch.Tensor:
        """``[M, b, N, 2 or 4]`` neuron features normalised per space and channel: ``"raw"`` ``(a, g)``,
        ``"squares"`` ``(a, g, a^2, g^2)``, ``"scale_free"`` the same after dividing each network's ``g``
        by its per-space scale (:class:`~gradmetanet.features.GradientScale`)."""
        if mode not in self._inputs:
            if mode == "scale_free":
                x = input_channels(GradientScale(self.spec)(self.raw)[0], squared=True)
            elif mode in ("raw", "squares"):
                x = input_channels(self.raw, squared=mode == "squares")
            else:
                raise ValueError(f"unknown input mode {mode!r}; choose raw, squares or scale_free")
            self._inputs[mode] = NeuronNormaliser(self.spec, x.shape[-1]).fit(x[self.train_idx])(x)
        return self._inputs[mode]


def prepare(zoo: SirenZoo, train_idx: torch.Tensor) -> Prepared:
    """:class:`Prepared` data of ``zoo`` with statistics from the networks ``train_idx``."""
    spec = zoo.spec
    t_train = zoo.target[train_idx]
    t_mean, t_std = t_train.mean().item(), t_train.std().item()
    scale = GradientScale(spec)
    output_scale = scale.output_scale(scale.scales(zoo.features))
    sample = zoo.features[train_idx[:256]]
    ws = {mode: WeightSpaceNormaliser(spec).fit(weight_space_inputs(GradientBatch(spec, sample), mode))
          for mode in ("concat", "average")}
    return Prepared(spec, zoo.features, train_idx, (zoo.target - t_mean) / t_std, t_mean, t_std, output_scale, ws)


def _flatten(spec: NetworkSpec, out: dict[str, torch.Tensor]) -> torch.Tensor:
    return flatten_weights(out, spec).cpu()


def gradient_predictor(data: Prepared, mode: InputMode, device: str = "cpu") -> Predictor:
    """``predict(model, idx) -> [len(idx), P]`` normalised targets from a model on gradient sets.

    With ``"scale_free"`` inputs the model's outputs are standardised ``F / output_scale`` (statistics of
    the training networks) and are multiplied back by each network's scale: its output is in the
    units of a problem of one scale, while its error is measured, as every model's, on the targets.
    """
    features = data.inputs(mode)
    if mode != "scale_free":
        return lambda model, idx: _flatten(data.spec, model(GradientBatch(data.spec, features[idx].to(device))))
    fisher_train = data.targets[data.train_idx] * data.target_std + data.target_mean
    scaled = fisher_train / data.output_scale[data.train_idx]
    mean, std = scaled.mean().item(), scaled.std().item()

    def predict(model, idx):
        out = _flatten(data.spec, model(GradientBatch(data.spec, features[idx].to(device))))
        fisher = (out * std + mean) * data.output_scale[idx]
        return (fisher - data.target_mean) / data.target_std
    return predict


def _predictor(key: str, data: Prepared, device: str) -> Predictor:
    if key.startswith("ws_"):
        mode = key.split("_")[1]
        normalise = data.ws_normalisers[mode].to(device)

        def predict(model, idx):
            out = model(normalise(weight_space_inputs(GradientBatch(data.spec, data.raw[idx].to(device)), mode)))
            return _flatten(data.spec, out)
        return predict
    return gradient_predictor(data, INPUT_MODES.get(key, "raw"), device)


@torch.no_grad()
def _predict_all(model: nn.Module, predict, index: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    model.eval()
    return torch.cat([predict(model, index[i:i + batch_size]) for i in range(0, len(index), batch_size)])


# ---------------------------------------------------------------------------------------------- run
def _cell_key(model: str, size: int, seed: int) -> str:
    return f"{model}/{size}/{seed}"


def run(config: CurvatureConfig, out_dir: str | os.PathLike, progress: bool = True, overwrite: bool = False) -> dict:
    """Train every model at every training size and seed; write results into ``out_dir``.

    The run folder is checked before any compute (:class:`~gradmetanet.experiments.store.RunFolder`; ``overwrite``
    lets a run of other settings write its table there). Finished cells are kept in ``cells.json`` with their
    settings and code version and skipped when found again, so a killed run resumes at the cell where it
    stopped. Processes that run other ``models`` (or more seeds) of the same settings may share the folder (one
    thread each on a small machine); the report covers every model whose cells are all there.
    """
    folder = RunFolder(out_dir, "curvature", settings_of(config, ignore=("models", "seeds")), overwrite)
    settings = settings_of(config, ignore=("models", "seeds", "train_sizes"))     # a cell's key names its size
    zoo = load_or_generate_siren_zoo(config.zoo(), config.cache_dir, progress=progress)
    n_test, n_val = config.n_test, config.n_val
    test_idx = torch.arange(n_test)
    val_idx = torch.arange(n_test, n_test + n_val)
    pool = torch.arange(n_test + n_val, len(zoo))
    test_var = require_finite("the variance of the test networks' Fisher diagonals", zoo.target[test_idx].var().item())
    references = _references(zoo, test_idx, test_var)
    store = folder.cells()
    grid = [(seed, size, m) for seed in range(config.seeds) for size in config.train_sizes for m in config.models]
    todo = [(seed, size, m) for seed, size, m in grid if store.get(_cell_key(m, size, seed), settings) is None]
    bar = tqdm(total=len(todo), desc="curvature", unit="fit", disable=not progress)
    prepared: dict[tuple[int, int], Prepared] = {}
    for seed, size, key in todo:
        train_idx = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:size]]
        if (seed, size) not in prepared:
            prepared = {(seed, size): prepare(zoo, train_idx)}
        data = prepared[(seed, size)]
        torch.manual_seed(seed)
        model = build_model(key, zoo.spec, config.set_size).to(config.device)
        bar.set_postfix_str(f"{key} n={size} seed={seed}")
        start = time.perf_counter()
        predict = _predictor(key, data, config.device)
        scale = data.target_std ** 2 / test_var            # normalised-target MSE -> metric

        def show(epoch: int, val: float) -> None:
            bar.set_postfix_str(f"{key} n={size} seed={seed} epoch {epoch + 1}/{config.epochs} val {val * scale:.4f}")
        fit = fit_regression(model, predict, data.targets, train_idx, val_idx, test_idx, config.epochs,
                             config.batch_size, config.lr, seed, on_epoch=show, schedule=config.schedule,
                             patience=config.patience,
                             checkpoint=store.checkpoint(_cell_key(key, size, seed), settings))
        prediction = _predict_all(model, predict, test_idx) * data.target_std + data.target_mean
        cell = {"test": require_finite(f"the test error of {key} (n={size}, seed {seed})", fit.test * scale),
                "val": fit.best_val * scale, "best_epoch": fit.best_epoch, "epochs": config.epochs,
                "epochs_run": fit.epochs_run, "converged": fit.converged,
                "val_history": [v * scale for v in fit.val_history],
                "train_history": [v * scale for v in fit.train_history], "seconds": time.perf_counter() - start,
                "parameters": count_parameters(model),
                "per_layer": per_layer_shares(zoo.spec, prediction, zoo.target[test_idx])}
        store.put(_cell_key(key, size, seed), settings, cell)
        bar.update()
    bar.close()
    cells = {}
    for key in MODEL_KEYS:
        for size in config.train_sizes:
            for seed in range(config.seeds):
                found = store.get(_cell_key(key, size, seed), settings)
                if found is not None:
                    cells[_cell_key(key, size, seed)] = found
    results = _summarise(config, cells, references)
    target = zoo.target[test_idx]
    results["target_variance_share"] = per_layer_shares(zoo.spec, torch.full_like(target, target.mean().item()), target)
    report(results, folder)
    return results


def _references(zoo: SirenZoo, test_idx: torch.Tensor, test_var: float) -> dict[str, dict]:
    """Error and per-layer error shares of the standard estimator and the reference rows on the test networks."""
    target = zoo.target[test_idx]
    features = zoo.features[test_idx]
    estimates = {"standard": zoo.standard[test_idx],
                 "product_of_means": product_of_means(zoo.spec, features),
                 "quadrature": quadrature(zoo.spec, features, zoo.points[test_idx])}
    rows = {key: {"error": require_finite(f"the error of the {LABELS[key].lower()} on the test networks",
                                          ((est - target).square().mean() / test_var).item()),
                  "per_layer": per_layer_shares(zoo.spec, est, target)} for key, est in estimates.items()}
    noise = target_noise(zoo, test_idx)
    rows["target_noise"] = {"error": noise.double().mean().item() / test_var,
                            "per_layer": per_layer_shares(zoo.spec, noise.sqrt(), torch.zeros_like(noise))}
    return rows


def _summarise(config: CurvatureConfig, cells: dict[str, dict], references: dict[str, dict]) -> dict:
    sizes = [str(n) for n in config.train_sizes]
    models: dict[str, dict] = {key: {n: {"mean": row["error"], "std": 0.0, "runs": [row["error"]],
                                         "per_layer": row["per_layer"]} for n in sizes}
                               for key, row in references.items()}
    standard = references["standard"]["error"]
    improvement = {key: {n: 1.0 - row["error"] / standard for n in sizes}
                   for key, row in references.items() if key != "standard"}
    params, best_epochs, converged, curves = {}, {}, {}, {}
    finished = [key for key in MODEL_KEYS if all(_cell_key(key, n, s) in cells
                                                 for n in config.train_sizes for s in range(config.seeds))]
    for key in finished:
        models[key], improvement[key], best_epochs[key], converged[key] = {}, {}, {}, {}
        for n in sizes:
            runs = [cells[_cell_key(key, int(n), s)] for s in range(config.seeds)]
            mean, std = mean_std(run["test"] for run in runs)
            per_layer = {name: sum(run["per_layer"][name] for run in runs) / len(runs) for name in runs[0]["per_layer"]}
            models[key][n] = {"mean": mean, "std": std, "runs": [run["test"] for run in runs], "per_layer": per_layer}
            improvement[key][n] = 1.0 - mean / standard
            best_epochs[key][n] = [run["best_epoch"] for run in runs]
            converged[key][n] = [has_converged(run["val_history"], config.patience or max(1, config.epochs // 5))
                                 if "val_history" in run else False for run in runs]
        last = cells[_cell_key(key, config.train_sizes[-1], 0)]
        if "val_history" in last:
            curves[key] = {"train": last["train_history"], "val": last["val_history"]}
        params[key] = cells[_cell_key(key, config.train_sizes[0], 0)]["parameters"]
    return {"experiment": "curvature", "metric": METRIC,
            "config": {**asdict(config), "cache_dir": None, "models": tuple(finished)},
            "models": models, "relative_improvement_over_standard": improvement, "parameters": params,
            "best_epochs": best_epochs, "converged": converged, "learning_curves": curves, "reference_models": list(REFERENCE_KEYS),
            "torch": torch.__version__, "device": config.device}


# ---------------------------------------------------------------------------------------------- report
def report(results: dict, folder: RunFolder) -> str:
    """Write ``results.json`` (with provenance), ``table.md`` and ``curvature.png`` into the run folder; return
    the table."""
    out = folder.path
    folder.write_json("results.json", results, results["config"].get("device", "cpu"))
    table = render_table(results)
    atomic_write_text(out / "table.md", table + "\n")
    plot(results, out / "curvature.png")
    if results.get("learning_curves"):
        largest = results["config"]["train_sizes"][-1]
        learning_curves(out / "learning_curves.png",
                        {LABELS[k]: (c["train"], c["val"]) for k, c in results["learning_curves"].items()},
                        "error (MSE / target variance)", f"Learning curves, n={largest}, seed 0")
    return table


def render_table(results: dict) -> str:
    """The error table (learned models, then the reference rows) and the per-layer error shares."""
    sizes = [str(n) for n in results["config"]["train_sizes"]]
    largest = sizes[-1]
    lines = [f"Metric: {results['metric']}; mean ± std over {results['config']['seeds']} seed(s); "
             f"set size {results['config']['set_size']}.", "",
             "| model | params | " + " | ".join(f"n={n}" for n in sizes) + f" | vs standard at n={largest} |",
             "|---|---:|" + "---:|" * len(sizes) + "---:|"]
    keys = [k for k in results["models"] if k not in REFERENCE_KEYS] + [
        k for k in REFERENCE_KEYS if k in results["models"]]
    for key in keys:
        per_size = results["models"][key]
        if key == "standard" or key in REFERENCE_KEYS:
            value = per_size[largest]["mean"]
            gain = "-" if key == "standard" else f"{100 * results['relative_improvement_over_standard'][key][largest]:+.1f}%"
            lines.append(f"| {LABELS[key]} | - | " + " | ".join(f"{value:.4f}" for _ in sizes) + f" | {gain} |")
            continue
        cells = " | ".join(format_mean_std(per_size[n]["mean"], per_size[n]["std"], len(per_size[n]["runs"]))
                           for n in sizes)
        gain = results["relative_improvement_over_standard"][key][largest]
        lines.append(f"| {LABELS[key]} | {results['parameters'][key]:,} | {cells} | {100 * gain:+.1f}% |")
    lines += ["", convergence_line({LABELS[k]: [f for runs in per_size.values() for f in runs]
                                    for k, per_size in results.get("converged", {}).items()},
                                   results["config"].get("patience"))]
    learned = [k for k in keys if k != "standard" and k not in REFERENCE_KEYS]
    if learned and all(results["relative_improvement_over_standard"][k][largest] <= 0 for k in learned):
        lines += ["", f"No learned model beats the standard estimator at n={largest} in this run. Small presets check "
                  "the pipeline; docs/curvature.md reports the `cpu` and `paper` presets."]
    names = list(results["models"]["standard"][largest]["per_layer"])
    lines += ["", f"Where the error lies: each parameter tensor's share of the squared test error at n={largest} "
              "(a row sums to 100%), beside the model's error.", "",
              "| model | error | " + " | ".join(f"`{n}`" for n in names) + " |",
              "|---|---:|" + "---:|" * len(names)]
    if "target_variance_share" in results:
        lines.append("| *share of the target variance* | - | "
                     + " | ".join(f"{100 * results['target_variance_share'][n]:.1f}%" for n in names) + " |")
    for key in keys:
        cell = results["models"][key][largest]
        lines.append(f"| {LABELS[key]} | {cell['mean']:.4f} | "
                     + " | ".join(f"{100 * cell['per_layer'][n]:.1f}%" for n in names) + " |")
    return "\n".join(lines)


_LINE_STYLES = {"standard": ("black", "--"), "product_of_means": ("grey", ":"), "quadrature": ("grey", "-."),
                "target_noise": ("silver", ":")}


def plot(results: dict, path: Path) -> None:
    sizes = results["config"]["train_sizes"]
    with figure(path, "number of training networks", "test error (MSE / target variance)",
                "Fisher diagonal estimation from decomposed gradients", size=(8.6, 4.2), xlog=True, ylog=True,
                legend_outside=True) as ax:
        for key, per_size in results["models"].items():
            mean = [per_size[str(n)]["mean"] for n in sizes]
            std = [per_size[str(n)]["std"] for n in sizes]
            if key in _LINE_STYLES:
                color, style = _LINE_STYLES[key]
                ax.axhline(mean[0], color=color, linestyle=style, linewidth=1.2, label=LABELS[key])
                continue
            line, = ax.plot(sizes, mean, marker="o", markersize=3, label=LABELS[key])
            ax.fill_between(sizes, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=line.get_color(), alpha=0.2)


def config_from_preset(preset: str, **overrides) -> CurvatureConfig:
    """A preset with overrides applied (``train_sizes`` and ``models`` accept sequences)."""
    return apply_preset(PRESETS, preset, overrides)
