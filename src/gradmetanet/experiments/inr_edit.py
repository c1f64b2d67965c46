"""INR editing (paper 7.3): map a SIREN's weights to the weights of its dilated image in one forward pass.

For every backbone WS in {DWSNet, GMN, ScaleGMN} four editors are trained on the INR zoo
(:mod:`gradmetanet.zoos.inr`): WS alone on the weights; WS + probing (the INR's pre-activations
at ``probe_points`` fixed random coordinates, as extra channels of the biases, i.e. extra vertex
features); WS + GradMetaNet and WS + GradMetaNet++ (decomposed gradients of the INR's *output* at
``grad_points`` fixed random grid pixels, the same for all INRs, mapped to ``gradmetanet_features``
per-parameter features and concatenated to the weights). The output is ``theta' = theta + s * delta``
with one learnable scale per layer for weights and one for biases, starting at 0.01.

Why the output gradient: the INRs fit their images almost exactly (PSNR above 40 dB), so the
gradient of their own fitting residual ``(f(x) - I(x))^2`` is close to zero; the gradient of the edited
target would hand the model the answer. ``df/du`` at the points carries what the network computes there.

Objective and metric: per image, the MSE between the edited INR rendered on the full 28 x 28 grid
and the dilated image (:func:`~gradmetanet.data.image_edits.dilate`, 3 x 3, once, on the 0..255
image), averaged; reported x 1e-2 as in the paper. Each model keeps its best-validation epoch; mean
and std over seeds.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.func import vmap
from tqdm.auto import tqdm

from ..atomic import atomic_write_text
from ..capture.functional import functional_features
from ..core.spec import NetworkSpec
from ..data.image_edits import dilate
from ..features import space_rms
from ..zoos.inr import INR_WIDTHS, OMEGA_0, InrZoo, InrZooConfig, grid_coordinates, load_or_generate_inr_zoo, render
from ..models.siren import siren_template
from ..metanets import GMN, DWSNet, GradMetaNet, GradMetaNetPlusPlus, ScaleGMN, WeightEditor
from ..plots import learning_curves
from ..metanets.training import fit_regression
from . import apply_preset, convergence_line, format_mean_std, mean_std
from .store import RunFolder, require_finite, settings_of
from ..capture import spec_of

__all__ = ["InrEditConfig", "PRESETS", "run", "config_from_preset", "inr_editor", "edit", "BACKBONES", "VARIANTS"]

BACKBONES = ("dws", "gmn", "scalegmn")
VARIANTS = ("ws", "probing", "gradmetanet", "gradmetanet++")
LABELS = {"dws": "DWSNet", "gmn": "GMN", "scalegmn": "ScaleGMN", "ws": "WS", "probing": "WS + probing",
          "gradmetanet": "WS + GradMetaNet", "gradmetanet++": "WS + GradMetaNet++"}


@dataclass
class InrEditConfig:
    n_images: int | None = None           # INRs in the zoo (all 1,797 digits by default)
    data_dir: str | None = None           # MNIST-style IDX files instead of the digits
    fit_steps: int = 300
    backbones: tuple[str, ...] = BACKBONES
    variants: tuple[str, ...] = VARIANTS
    hidden: int = 32
    layers: int = 3
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    patience: int | None = None           # stop a fit after this many epochs without a better validation MSE
    grad_points: int = 64
    probe_points: int = 16
    gradmetanet_features: int = 8
    gradmetanet_pp_hidden: int = 16                # GradMetaNet++ width and depth (the paper's: 64, 3 blocks, 8 heads;
    gradmetanet_pp_blocks: int = 1                 # on CPU its attention over 64 x 67 sets dominates the run)
    gradmetanet_pp_heads: int = 4
    seeds: int = 3
    examples: int = 6                     # test INRs in the PNG grid
    cache_dir: str | None = os.environ.get("GRADMETANET_CACHE", str(Path.home() / ".cache" / "gradmetanet"))

    def __post_init__(self) -> None:
        bad = [b for b in self.backbones if b not in BACKBONES] + [v for v in self.variants if v not in VARIANTS]
        if bad:
            raise ValueError(f"unknown backbones or variants {bad}; backbones {list(BACKBONES)}, variants "
                             f"{list(VARIANTS)}")


PRESETS = {
    "paper": InrEditConfig(hidden=128, layers=6, epochs=150, patience=20, gradmetanet_pp_hidden=64, gradmetanet_pp_blocks=3, gradmetanet_pp_heads=8),
    # to convergence (0.8 and earlier: 10 epochs, no patience, every best epoch the last; results/inr-edit-cpu)
    "cpu": InrEditConfig(epochs=150, patience=10, seeds=3, lr=2e-3),
    "quick": InrEditConfig(n_images=600, epochs=8, seeds=1, layers=2, lr=3e-3),
    "tiny": InrEditConfig(n_images=24, fit_steps=30, epochs=1, seeds=1, hidden=8, layers=1, grad_points=8,
                          probe_points=4, gradmetanet_features=4, gradmetanet_pp_hidden=8, gradmetanet_pp_heads=2, examples=2, cache_dir=None),
}


def config_from_preset(preset: str, **overrides) -> InrEditConfig:
    return apply_preset(PRESETS, preset, overrides)


def inr_spec() -> NetworkSpec:
    """The SIRENs' spec: inputs and output fixed, both hidden spaces ``SignPerm`` (sine is odd)."""
    return spec_of(siren_template(INR_WIDTHS, OMEGA_0), grid_coordinates()[:4])


def preactivations(params: dict[str, torch.Tensor], coords: torch.Tensor, spec: NetworkSpec) -> dict[str, torch.Tensor]:
    """``{bias name: [M, d_out, K]}``: every site's pre-activation at ``coords [K, 2]``, for each INR (they move
    with the neurons exactly as the biases do: sign flips and permutations)."""
    x = coords.expand(next(iter(params.values())).shape[0], -1, -1)
    out = {}
    for i, site in enumerate(spec.sites):
        u = torch.einsum("mki,moi->mko", x, params[site.weight]) + params[site.bias].unsqueeze(1)
        out[site.bias] = u.transpose(1, 2)
        x = torch.sin(OMEGA_0 * u)
    return out


def inr_gradient_sets(params: dict[str, torch.Tensor], coords: torch.Tensor, spec: NetworkSpec) -> torch.Tensor:
    """``[M, K, N, 2]``: decomposed gradients of each INR's output at ``coords [K, 2]`` (one example per point),
    each channel divided by its root mean square per INR and neuron space (a statistic every permutation and
    sign flip leaves unchanged)."""
    template = siren_template(INR_WIDTHS, OMEGA_0)

    def one(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_features(template, spec, p, (coords,), lambda out: out.sum(), loss_reduction="sum")[2]

    feats = vmap(one)(params)
    return feats / space_rms(feats, spec)


def inr_editor(spec: NetworkSpec, backbone: str, variant: str, config: InrEditConfig,
               rms: dict[str, torch.Tensor]) -> WeightEditor:
    """The editor of one backbone and input variant: the weights alone (``ws``), with probe values on the biases
    (``probing``), or with the features of a GradMetaNet (``gradmetanet``) or GradMetaNet++ (``gradmetanet++``) on
    the INRs' decomposed gradients; ``s`` starts at 0.01 (a near-identity edit)."""
    extra = {"ws": 0, "probing": config.probe_points}.get(variant, config.gradmetanet_features)
    kinds = {"dws": DWSNet, "gmn": GMN, "scalegmn": ScaleGMN}
    options = {"bidirectional": True} if backbone != "dws" else {}
    net = kinds[backbone](spec, 1 + extra, 1, hidden=config.hidden, layers=config.layers, **options)
    gradient_net = None
    if variant == "gradmetanet":
        gradient_net = GradMetaNet(hidden=config.hidden, set_layers=2, neuron_layers=1, out_features=config.gradmetanet_features)
    elif variant == "gradmetanet++":
        gradient_net = GradMetaNetPlusPlus(hidden=config.gradmetanet_pp_hidden, blocks=config.gradmetanet_pp_blocks,
                                           heads=config.gradmetanet_pp_heads, out_features=config.gradmetanet_features)
    return WeightEditor(spec, net, rms, out_scale=0.01, gradient_net=gradient_net)


def edit(model: WeightEditor, variant: str, params: dict[str, torch.Tensor], probes: dict[str, torch.Tensor],
         gradients: torch.Tensor) -> dict[str, torch.Tensor]:
    """``model`` on INRs ``params {name: [M, *shape]}`` with the inputs its ``variant`` reads: probe values
    ``{bias name: [M, d_out, P]}`` on the biases (zeros on the weights), or decomposed gradients ``[M, K, N, 2]``."""
    extra = None
    if variant == "probing":
        extra = {n: probes[n] if n in probes else t.new_zeros(*t.shape, next(iter(probes.values())).shape[-1])
                 for n, t in params.items()}
    return model(params, extra, gradients if model.gradient_net is not None else None)


@dataclass
class _Data:
    zoo: InrZoo
    spec: NetworkSpec
    targets: torch.Tensor              # [M, 784] dilated images in [0, 1]
    probes: dict[str, torch.Tensor]
    gradients: torch.Tensor            # [M, K, N, 2]
    rms: dict[str, torch.Tensor]


def prepare(config: InrEditConfig, progress: bool = True) -> _Data:
    zoo = load_or_generate_inr_zoo(InrZooConfig(n_images=config.n_images, data_dir=config.data_dir,
                                                steps=config.fit_steps), config.cache_dir, progress)
    spec = inr_spec()
    gen = torch.Generator().manual_seed(1234)
    pixels = torch.randperm(28 * 28, generator=gen)[:config.grad_points]
    grad_coords = grid_coordinates()[pixels]
    probe_coords = torch.rand(config.probe_points, 2, generator=gen) * 2 - 1
    targets = dilate(zoo.images).reshape(len(zoo), -1).float() / 255.0
    with torch.no_grad():
        probes = preactivations(zoo.params, probe_coords, spec)
        probes = {k: v / v[zoo.splits["train"]].square().mean().sqrt() for k, v in probes.items()}
    gradients = inr_gradient_sets(zoo.params, grad_coords, spec)
    rms = {n: zoo.params[n][zoo.splits["train"]].square().mean().sqrt() for n in spec.param_shapes()}
    return _Data(zoo, spec, targets, probes, gradients, rms)


def _predict(model: WeightEditor, variant: str, data: _Data, idx: torch.Tensor) -> torch.Tensor:
    """``[n, 784]``: the edited INRs ``idx`` rendered on the full grid."""
    params = {k: v[idx] for k, v in data.zoo.params.items()}
    edited = edit(model, variant, params, {k: v[idx] for k, v in data.probes.items()}, data.gradients[idx])
    return vmap(render)(edited)


def run(config: InrEditConfig, out_dir: str | os.PathLike, progress: bool = True, overwrite: bool = False) -> dict:
    """Every backbone with every variant over ``seeds`` seeds; ``results.json``, ``table.md``, ``edits.png`` (the
    model trained by this call that is best on validation). The run folder is checked before any compute; finished cells are kept in
    ``cells.json`` with their settings and code version (:mod:`~gradmetanet.experiments.store`): a rerun of the
    same configuration resumes."""
    # a cell's key names its backbone, variant and seed: runs of other backbones or more seeds share the folder
    settings = settings_of(config, ignore=("examples", "backbones", "variants", "seeds"))
    folder = RunFolder(out_dir, "inr-edit", settings, overwrite)
    out = folder.path
    store = folder.cells()
    data = prepare(config, progress)
    splits = data.zoo.splits
    with torch.no_grad():
        unedited = (vmap(render)(data.zoo.params) - data.targets)[splits["test"]].square().mean().item()
    results = {"experiment": "inr-edit", "config": asdict(config), "zoo": {
        "inrs": len(data.zoo), "psnr_db": data.zoo.psnr.mean().item(),
        "splits": {k: len(v) for k, v in splits.items()}}, "unedited_mse": unedited, "models": {}}
    best, best_val = None, float("inf")
    bar = tqdm(total=len(config.backbones) * len(config.variants) * config.seeds, desc="INR editors",
               disable=not progress)
    for backbone in config.backbones:
        results["models"][backbone] = {}
        for variant in config.variants:
            for seed in range(config.seeds):
                key = f"{backbone}/{variant}/{seed}"
                if store.get(key, settings) is None:
                    torch.manual_seed(seed)
                    model = inr_editor(data.spec, backbone, variant, config, data.rms)
                    start = time.perf_counter()
                    fit = fit_regression(model, lambda m, idx: _predict(m, variant, data, idx), data.targets,
                                         splits["train"], splits["val"], splits["test"], config.epochs,
                                         config.batch_size, config.lr, seed, schedule="cosine",
                                         patience=config.patience, checkpoint=store.checkpoint(key, settings))
                    store.put(key, settings, {"test": require_finite(f"the test MSE of {backbone} {variant} seed {seed}",
                                                                     fit.test),
                                              "seconds": time.perf_counter() - start, "best_epoch": fit.best_epoch,
                                              "epochs_run": fit.epochs_run, "converged": fit.converged,
                                              "val_history": fit.val_history, "train_history": fit.train_history})
                    if fit.best_val < best_val:              # the picture shows the best model on validation
                        best, best_val = (model, variant), fit.best_val
                bar.update()
            runs = [store.get(f"{backbone}/{variant}/{seed}", settings) for seed in range(config.seeds)]
            mean, std = mean_std([r["test"] for r in runs])
            results["models"][backbone][variant] = {
                "mean": mean, "std": std, "runs": [r["test"] for r in runs],
                "seconds": sum(r["seconds"] for r in runs) / len(runs), "best_epochs": [r["best_epoch"] for r in runs],
                "converged": [r.get("converged", False) for r in runs],
                "curve": {k: runs[0][k] for k in ("train_history", "val_history") if k in runs[0]}}
    bar.close()
    report(results, folder)
    _plot_edits(best, data, config.examples, out / "edits.png")
    return results


def report(results: dict, folder: RunFolder) -> str:
    """Write ``results.json`` (with provenance) and ``table.md`` into the run folder; return the table."""
    out = folder.path
    folder.write_json("results.json", results, results["config"].get("device", "cpu"))
    cfg, z = results["config"], results["zoo"]
    variants = cfg["variants"]
    lines = [f"INR editing (3 x 3 dilation), {z['inrs']} SIRENs of the digits (fit PSNR {z['psnr_db']:.1f} dB), "
             f"test MSE x 1e-2, mean ± std over {cfg['seeds']} seed(s); unedited INRs: "
             f"{100 * results['unedited_mse']:.2f}.", "",
             "| backbone | " + " | ".join(LABELS[v] for v in variants) + " |", "|---|" + "---:|" * len(variants)]
    for backbone, row in results["models"].items():
        cells = [format_mean_std(100 * row[v]["mean"], 100 * row[v]["std"], len(row[v]["runs"]), 3) for v in variants]
        lines.append(f"| {LABELS[backbone]} | " + " | ".join(cells) + " |")
    lines += ["", convergence_line({f"{LABELS[b]} {LABELS[v]}": r["converged"] for b, row in results["models"].items()
                                    for v, r in row.items()}, cfg.get("patience"), "seeds")]
    table = "\n".join(lines)
    curves = {f"{LABELS[b]}, {LABELS[v]}": (r["curve"]["train_history"], r["curve"]["val_history"])
              for b, row in results["models"].items() for v, r in row.items() if r.get("curve")}
    if curves:
        learning_curves(out / "learning_curves.png", curves, "MSE", "INR editing: learning curves (seed 0)")
    atomic_write_text(out / "table.md", table + "\n")
    return table


def _plot_edits(best: tuple[WeightEditor, str] | None, data: _Data, n: int, path: Path) -> None:
    """Original, target and edited images of the first ``n`` test INRs (the run's best model on validation and its
    variant)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if best is None:
        return
    idx = data.zoo.splits["test"][:n]
    with torch.no_grad():
        edited = _predict(*best, data, idx).reshape(-1, 28, 28)
    rows = [("original INR", vmap(render)({k: v[idx] for k, v in data.zoo.params.items()}).reshape(-1, 28, 28)),
            ("dilated target", data.targets[idx].reshape(-1, 28, 28)), ("edited INR", edited)]
    fig, axes = plt.subplots(3, len(idx), figsize=(1.4 * len(idx), 4.4), dpi=130, squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(len(idx)):
            axes[r][c].imshow(images[c].clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
        axes[r][0].set_ylabel(label, fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
