"""Learned optimizers (paper section 7.2): meta-train with PES, then race tuned Adam.

1. Meta-train every learned optimizer with PES on the task (checkpointed, resumable); the
   rule's weights are saved as safetensors.
2. Race on data and seeds meta-training never saw: a digits train/test split drawn with
   ``eval_split_seed`` (meta-training uses split 0), a tuning seed and evaluation seeds from 1000
   on. Tune Adam's learning rate on a log grid (default 1e-4 .. 1, four points a decade) by
   the best test loss within the horizon on the tuning seed; a best value at the grid's edge is
   flagged in the table (the grid is too narrow to call Adam tuned).
3. For every evaluation seed (same initialisation and batch order for every optimizer): record
   tuned Adam's best test loss ``L*`` and the first step ``N`` reaching it, then each
   optimizer's first step reaching ``L*``. The step-reduction factor is ``N / steps``; the
   wall-clock speed-up is the same ratio in seconds, all optimizers timed in this one process.
Reported: mean and std over seeds of the factor, the speed-up and the best test loss, on the
meta-training task and, without re-meta-training, on the same task with a wider MLP and on
other classification tasks (G.3).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..atomic import atomic_write_text
from ..plots import figure
from ..lopt.distributed import is_main_process
from ..lopt.rule_files import load_rule, read_metadata, save_rule, shipped_path
from ..lopt import DigitsMLPTask, MetaTrainer, NetworkOptimizer, PESConfig, UpdateRule, cifar_task, fashion_mnist_task
from ..lopt.optimizers import RULE_NAMES as OPTIMIZERS
from ..lopt.optimizers import make_rule, warm_start
from ..data.text import corpus_version, read_line_corpus
from ..lopt.lm_task import LanguageModelTask
from ..lopt.task_family import TaskFamily, task_family
from ..lopt.tasks import MLPClassificationTask, classification_task, tabular_task
from ..metanets import LINEAR_SIGNATURES, TRANSFORMER_SIGNATURES
from . import apply_preset, best_on_grid, mean_std, on_grid_edge
from .store import RunFolder, settings_of, write_results

__all__ = ["LoptConfig", "PRESETS", "OPTIMIZERS", "run", "meta_train", "config_from_preset"]

LABELS = {"adam": "Adam (tuned)", "sgdm": "Learnable SGDM", "ds": "DS", "unf": "UNF",
          "gradmetanet_ds": "GradMetaNet + DS", "gradmetanet_unf": "GradMetaNet + UNF"}


@dataclass
class LoptConfig:
    task: str = "digits"                  # digits | family | lm (pydoc text, the paper's transformer) | fashion_mnist | cifar10 | cifar100
    family: tuple[str, ...] = ()          # task "family": members "DATASET:WIDTHS:BATCH" meta-trained together
    held_out: tuple[str, ...] = ()        # task "family": members only raced (transfer), never meta-trained on
    data_root: str | None = None          # directory of the image files, or of LM1B-style text files (task lm)
    hidden: int | None = None             # inner MLP width (default: the paper's for the task)
    horizon: int = 2000
    eval_every: int = 10
    eval_seeds: int = 5
    adam_grid: tuple[float, ...] = tuple(float(f"{10 ** (-4 + j / 4):.3g}") for j in range(17))   # 1e-4 .. 1
    eval_split_seed: int = 1              # digits train/test split of the race (meta-training uses split 0)
    tuning_seed: int = 999                # init and batches of the Adam grid (evaluation seeds: 1000, 1001, ...)
    pretrained: tuple[str, ...] = ()      # shipped rules (lopt.available()) raced as they are, without meta-training
    optimizers: tuple[str, ...] = OPTIMIZERS
    meta_steps: int = 50_000
    pairs: int = 8
    truncation: int = 50
    sigma: float = 0.01
    meta_lr: float = 1e-4
    seed: int = 0
    meta_train_horizon: int | None = None  # inner horizon during meta-training (default: horizon)
    transfer_hidden: int | None = 64      # also race on the same task with this hidden width (paper G.3)
    transfer_tasks: tuple[str, ...] = ("wine",)   # and on other tasks (scikit-learn tabular sets, G.3)
    meta_objective: str = "train"         # PES objective: mean training loss, or "validation" (held-out batches)
    validation_fraction: float = 0.0      # part of the training data held out for the validation objective
    warm_start: str | None = None         # start the GradMetaNet rules from this rule meta-trained in the same run
    warm_start_steps: int | None = None   # meta-steps of the warm-started rules (default: meta_steps)
    learned_lr_grid: tuple[float, ...] = ()   # also race every rule with its lr multiplier tuned on this grid
    init_from: str | None = None          # start every rule from this shipped rule (its name) or rule file, same kind
    loss_clip: float | None = None        # PES: clip each inner step's loss (diverging runs)
    evaluate_every: int = 0               # PES: meta-validate every this many steps and keep the best rule

    def __post_init__(self) -> None:
        unknown = [o for o in self.optimizers if o not in OPTIMIZERS]
        if unknown:
            raise ValueError(f"unknown optimizers {unknown}; choose from {list(OPTIMIZERS)}")
        if (self.task == "family") != bool(self.family):
            raise ValueError("task 'family' needs its members in `family` (e.g. family=['digits:32:128', "
                             "'mnist1d:32:128']), and `family` needs task 'family'")
        seen = set(self.family) & set(self.held_out)
        if seen:
            raise ValueError(f"held-out members {sorted(seen)} are also meta-training members; a member is one or the other")


FAMILY = ("digits:32:128", "digits-std:32:128", "digits-std:64x64:32", "mnist1d:64:64")
LEARNED_LR_GRID = tuple(float(f"{10 ** (j / 4):.3g}") for j in range(-4, 3))     # 0.1 .. 3.16, the step multiplier
HELD_OUT = ("digits-std:48x48x48:128", "wine:32:128", "breast_cancer:32:128")

PRESETS = {
    "paper": LoptConfig(),
    # the shipped "mlp-small" optimizer: meta-trained on a family of MLPs (widths, depths, batch sizes, [0, 1] and
    # standardised digits, MNIST-1D), raced on unseen splits of every member and on held-out members
    "family-cpu": LoptConfig(task="family", family=FAMILY, held_out=HELD_OUT, horizon=1000, eval_seeds=5,
                             optimizers=("ds", "gradmetanet_ds"), pretrained=("digits-mlp-v0.2",), meta_steps=1000,
                             pairs=8, truncation=50, sigma=0.01, meta_lr=1e-3, transfer_hidden=None, transfer_tasks=(),
                             meta_objective="validation", validation_fraction=0.2, loss_clip=4.0, evaluate_every=100,
                             learned_lr_grid=LEARNED_LR_GRID),
    # the same, fine-tuned on the family from the digits-only rule of version 0.2 (GradMetaNet + DS)
    "family-ft-cpu": LoptConfig(task="family", family=FAMILY, held_out=HELD_OUT, horizon=1000, eval_seeds=5,
                                optimizers=("gradmetanet_ds",), init_from="digits-mlp-v0.2", meta_steps=500, pairs=8,
                                truncation=50, sigma=0.01, meta_lr=3e-4, transfer_hidden=None, transfer_tasks=(),
                                meta_objective="validation", validation_fraction=0.2, loss_clip=4.0, evaluate_every=50,
                                learned_lr_grid=LEARNED_LR_GRID),
    "family-tiny": LoptConfig(task="family", family=("digits:8:16", "mnist1d:8x8:16"), held_out=("wine:8:16",),
                              horizon=20, eval_every=5, eval_seeds=2, adam_grid=(0.001, 0.01), optimizers=("ds",),
                              meta_steps=2, pairs=2, truncation=5, meta_train_horizon=10, transfer_hidden=None,
                              transfer_tasks=(), meta_objective="validation", validation_fraction=0.2, loss_clip=4.0,
                              evaluate_every=1, learned_lr_grid=(0.5, 1.0)),
    # the CPU-scaled set-up of the shipped "digits-mlp-v0.2" optimizer (meta-training: 20-50 minutes per rule on one
    # core; run one process per rule with --meta-only, then the race)
    "digits": LoptConfig(horizon=1000, eval_seeds=5, optimizers=("sgdm", "ds", "unf", "gradmetanet_ds"),
                         meta_steps=1000, pairs=8, truncation=50, sigma=0.01, meta_lr=1e-3,
                         meta_objective="validation", validation_fraction=0.2, loss_clip=4.0, evaluate_every=50),
    "quick": LoptConfig(horizon=300, eval_seeds=3, optimizers=("sgdm", "ds", "gradmetanet_ds"), meta_steps=60,
                        pairs=4, truncation=25, sigma=0.01, meta_lr=3e-3, meta_train_horizon=300,
                        meta_objective="validation", validation_fraction=0.2),
    "tiny": LoptConfig(horizon=20, eval_every=5, eval_seeds=2, adam_grid=(0.001, 0.01), meta_steps=2, pairs=1,
                       truncation=5, meta_train_horizon=10, transfer_hidden=8, transfer_tasks=("iris",),
                       meta_objective="validation", validation_fraction=0.2, loss_clip=4.0, evaluate_every=1,
                       pretrained=("mlp-small",)),
    # the paper's language-model task (2 blocks, d = 32, 4 heads, batch 8, sequences of 8) on the pydoc text
    "lm-tiny": LoptConfig(task="lm", horizon=20, eval_every=5, eval_seeds=2, adam_grid=(0.001, 0.01), meta_steps=2,
                          pairs=1, truncation=5, meta_train_horizon=10, transfer_hidden=None, transfer_tasks=(),
                          meta_objective="validation", validation_fraction=0.1, loss_clip=8.0, evaluate_every=1),
    "lm-quick": LoptConfig(task="lm", horizon=300, eval_every=10, eval_seeds=3, optimizers=("sgdm", "ds", "unf",
                           "gradmetanet_unf"), meta_steps=40, pairs=2, truncation=20, sigma=0.01, meta_lr=3e-3,
                           meta_train_horizon=300, transfer_hidden=None, transfer_tasks=(), meta_objective="validation",
                           validation_fraction=0.1, loss_clip=8.0),
    "lm-cpu": LoptConfig(task="lm", horizon=1000, eval_every=20, eval_seeds=5, meta_steps=150, pairs=4, truncation=25,
                         sigma=0.01, meta_lr=3e-3, meta_train_horizon=1000, transfer_hidden=None, transfer_tasks=(),
                         meta_objective="validation", validation_fraction=0.1, loss_clip=8.0, evaluate_every=25),
    "lm-paper": LoptConfig(task="lm", horizon=5000, eval_every=50, transfer_hidden=None, transfer_tasks=()),
    # the fair race of the shipped optimizer (no meta-training): unseen split and seeds, Adam on a wide log grid
    "fair": LoptConfig(horizon=1000, eval_seeds=5, optimizers=(), pretrained=("digits-mlp-v0.2", "mlp-small"),
                       transfer_tasks=("wine", "breast_cancer")),
}


def config_from_preset(preset: str, **overrides) -> LoptConfig:
    """A preset with overrides applied."""
    return apply_preset(PRESETS, preset, overrides)


def make_task(config: LoptConfig, batch_size: int = 128, split_seed: int = 0
              ) -> MLPClassificationTask | LanguageModelTask | TaskFamily:
    """The meta-training task (``split_seed`` 0), or with another ``split_seed`` the race's unseen split."""
    if config.task == "family":
        return task_family(config.family, split_seed, config.validation_fraction)
    if config.task == "lm":
        text = None if config.data_root is None else "\n".join(read_line_corpus(config.data_root))
        return LanguageModelTask(text, hidden=config.hidden or 32, seed=split_seed,
                                 validation_fraction=config.validation_fraction)
    if config.task == "digits":
        return DigitsMLPTask(hidden=config.hidden or 32, batch_size=batch_size, seed=split_seed,
                             validation_fraction=config.validation_fraction)
    if config.data_root is None:
        raise ValueError(f"task {config.task!r} reads image files: pass data_root (a directory)")
    if config.task == "fashion_mnist":
        return fashion_mnist_task(config.data_root, hidden=config.hidden or 32, batch_size=batch_size,
                                  validation_fraction=config.validation_fraction)
    if config.task in ("cifar10", "cifar100"):
        return cifar_task(config.data_root, classes=int(config.task[5:]), hidden=config.hidden, batch_size=batch_size,
                          validation_fraction=config.validation_fraction)
    raise ValueError(f"unknown task {config.task!r}; choose digits, lm, fashion_mnist, cifar10 or cifar100")


@dataclass
class Curve:
    """Test losses at ``steps`` (``inf`` once the run diverged), the seconds spent in the ``trained`` training
    steps (evaluation excluded), and whether the run diverged (a non-finite loss or gradient)."""

    steps: list[int] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0
    trained: int = 0
    diverged: bool = False

    def first_step_reaching(self, target: float) -> int | None:
        for step, loss in zip(self.steps, self.test_loss):
            if loss <= target:
                return step
        return None


def train_curve(task: MLPClassificationTask | LanguageModelTask, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
                seed: int, horizon: int, eval_every: int) -> Curve:
    """Train a fresh model (init and batches from ``seed``) for ``horizon`` steps with an ordinary loop."""
    gen = torch.Generator().manual_seed(seed)
    model = task.make_model()
    model.load_state_dict({k: v[0] for k, v in task.init_params(1, gen).items()})
    opt = make_optimizer(model)
    curve = Curve()
    for step in range(1, horizon + 1):
        if not curve.diverged:
            batch = tuple(t[0] for t in task.sample_batch(1, gen))
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            try:
                task.batch_loss(model, batch).backward()
                opt.step()                  # learned rules refuse non-finite gradients (FloatingPointError)
                curve.trained += 1
            except FloatingPointError:
                curve.diverged = True
            curve.seconds += time.perf_counter() - start
        if step % eval_every == 0:
            loss = math.inf if curve.diverged else task.test_loss(model)
            curve.diverged |= not math.isfinite(loss)
            curve.steps.append(step)
            curve.test_loss.append(loss if math.isfinite(loss) else math.inf)
    if hasattr(opt, "close"):
        opt.close()
    return curve


def pes_config(config: LoptConfig, steps: int) -> PESConfig:
    """The PES settings of ``config`` for ``steps`` meta-steps (checkpoints every 50 steps or fewer)."""
    return PESConfig(pairs=config.pairs, sigma=config.sigma, truncation=config.truncation,
                     horizon=config.meta_train_horizon or config.horizon, meta_lr=config.meta_lr, meta_steps=steps,
                     checkpoint_every=max(1, min(50, steps)), seed=config.seed, objective=config.meta_objective,
                     loss_clip=config.loss_clip, evaluate_every=config.evaluate_every)


def meta_train(config: LoptConfig, out_dir: str | os.PathLike, progress: bool = True
               ) -> tuple[dict[str, UpdateRule], dict[str, dict]]:
    """Meta-train every optimizer of the config with PES (resuming from ``out_dir/meta/NAME.ckpt``)
    and save each rule's weights as ``out_dir/meta/NAME.safetensors``.

    Returns the rules and, per rule, its meta-training record: ``loss`` (PES meta-loss per step),
    ``validation`` (``[meta-step, loss]`` pairs), ``selected_step`` (the rule kept) and ``steps``.
    """
    meta_dir = Path(out_dir) / "meta"
    meta_dir.mkdir(parents=True, exist_ok=True)
    rules: dict[str, UpdateRule] = {}
    record: dict[str, dict] = {}
    for name in config.optimizers:
        torch.manual_seed(config.seed)
        rule = make_rule(name, TRANSFORMER_SIGNATURES if config.task == "lm" else LINEAR_SIGNATURES)
        if config.init_from is not None:
            path = config.init_from if Path(config.init_from).is_file() else shipped_path(config.init_from)
            if read_metadata(path).get("optimizer") != name:
                raise ValueError(f"init_from={config.init_from!r} is another kind of rule than {name!r}")
            rule.load_state_dict(load_rule(path).state_dict())
        if config.warm_start is not None and name.startswith("gradmetanet_"):
            if config.warm_start not in rules:
                raise ValueError(f"warm_start={config.warm_start!r} must be one of the optimizers meta-trained "
                                 f"before {name!r} in this run: {list(config.optimizers)}")
            warm_start(rule, rules[config.warm_start])
            steps = config.warm_start_steps or config.meta_steps
        else:
            steps = config.meta_steps
        finished = _finished_rule(meta_dir / f"{name}.safetensors", name, config, steps)
        if finished is not None:                  # meta-trained before under these settings (a later session)
            rules[name], record[name] = finished
            continue
        trainer = MetaTrainer(make_task(config), rule, pes_config(config, steps), meta_dir / f"{name}.ckpt")
        trainer.train(progress=progress)
        selected = trainer.best["step"] if trainer.best is not None else trainer.step
        record[name] = {"loss": trainer.history, "validation": trainer.validation, "selected_step": selected,
                        "steps": trainer.step}
        provenance = {"config": json.dumps(asdict(config)), "meta_steps_done": str(trainer.step),
                      "meta_validation": json.dumps(trainer.validation), "meta_loss": json.dumps(trainer.history)}
        provenance["selected_meta_step"] = str(selected)
        rule.load_state_dict(trainer.best_rule_state())          # the best meta-validated rule is the one raced
        if is_main_process():
            save_rule(rule, name, meta_dir / f"{name}.safetensors", provenance)
        rules[name] = rule
    return rules, record


# Settings only the race reads: a rule file meta-trained under other values of these is still the same rule.
RACE_ONLY = ("held_out", "eval_every", "eval_seeds", "adam_grid", "eval_split_seed", "tuning_seed", "pretrained",
             "optimizers", "transfer_hidden", "transfer_tasks", "learned_lr_grid")


def _finished_rule(path: Path, name: str, config: LoptConfig, steps: int) -> tuple[UpdateRule, dict] | None:
    """The rule ``meta_train`` wrote to ``path`` and its record, when it finished ``steps`` meta-steps under the
    meta-training settings of ``config`` (a setting the file predates counts as its default); else ``None``.
    Meta-training checkpoints are not kept in the repository, so a run resumed in a fresh checkout restarts
    only the rules that did not finish."""
    if not path.is_file():
        return None
    meta = read_metadata(path)
    if meta.get("optimizer") != name or int(meta.get("meta_steps_done", -1)) != steps:
        return None
    saved, wanted = json.loads(meta["config"]), json.loads(json.dumps(asdict(config)))
    defaults = json.loads(json.dumps(asdict(LoptConfig())))
    if any(saved.get(k, defaults[k]) != v for k, v in wanted.items() if k not in RACE_ONLY):
        return None
    validation = json.loads(meta.get("meta_validation", "[]"))
    record = {"loss": json.loads(meta.get("meta_loss", "[]")), "validation": validation,
              "selected_step": int(meta.get("selected_meta_step", steps)), "steps": steps}
    return load_rule(path), record


def run(config: LoptConfig, out_dir: str | os.PathLike, progress: bool = True, overwrite: bool = False) -> dict:
    """The whole experiment; meta-training checkpoints live in ``out_dir/meta`` (a rerun resumes). The run folder
    is checked before any compute; processes that meta-train other ``optimizers`` of one config may share it."""
    out = RunFolder(out_dir, "lopt", settings_of(config, ignore=("optimizers", "pretrained")), overwrite).path
    rules, meta_record = meta_train(config, out, progress)
    for name in config.pretrained:
        rules[f"shipped:{name}"] = load_rule(shipped_path(name))
    # race tuned Adam on an unseen split of the meta-training task, and (without re-meta-training) on a wider
    # MLP and other tasks
    results = {"experiment": "lopt", "config": asdict(config), "meta_training": meta_record,
               "torch": torch.__version__, "tasks": {}}
    if config.task == "lm" and config.data_root is None:
        results["corpus"] = corpus_version()
    tasks = race_tasks(config)
    for label, race_task in tasks.items():
        results["tasks"][label] = race(race_task, rules, config, progress)
    report(results, out)
    return results


def race_tasks(config: LoptConfig) -> dict[str, MLPClassificationTask | LanguageModelTask]:
    """The tasks of the race, by label: the meta-training task (or every family member) on an unseen split,
    then the transfer tasks (wider MLP, other datasets, held-out family members)."""
    split = config.eval_split_seed
    if config.task == "family":
        tasks = {f"{m} (split {split})": classification_task(m, split) for m in config.family}
        tasks.update({f"{m} (held out, split {split})": classification_task(m, split) for m in config.held_out})
        return tasks
    task = make_task(config, split_seed=split)
    tasks = {f"{config.task} (hidden {task.hidden}, split {split})": task}
    if config.transfer_hidden is not None:
        wide = replace(config, hidden=config.transfer_hidden)
        tasks[f"{config.task} (hidden {config.transfer_hidden}, transfer)"] = make_task(
            wide, split_seed=config.eval_split_seed)
    for name in config.transfer_tasks:
        tasks[f"{name} (hidden {task.hidden}, transfer)"] = tabular_task(name, hidden=task.hidden, seed=split)
    return tasks


def _tune_lr(task: MLPClassificationTask | LanguageModelTask, make: Callable[[nn.Module, float], torch.optim.Optimizer],
             grid: tuple[float, ...], config: LoptConfig, desc: str, progress: bool) -> tuple[float, dict[float, float]]:
    """The learning rate of ``grid`` with the lowest best test loss within the horizon on the tuning seed, and
    every value's best test loss."""
    losses = {}
    for lr in tqdm(grid, desc=desc, disable=not progress):
        curve = train_curve(task, lambda m, lr=lr: make(m, lr), config.tuning_seed, config.horizon, config.eval_every)
        losses[lr] = min(curve.test_loss)
    return best_on_grid(losses), losses


def race(task: MLPClassificationTask | LanguageModelTask, rules: dict[str, UpdateRule], config: LoptConfig, progress: bool) -> dict:
    """Tune Adam's learning rate on ``task`` (the tuning seed), then race it against every rule on the
    evaluation seeds (1000, 1001, ...). With ``learned_lr_grid``, every rule also races with its ``lr``
    (the multiplier of its learned step) tuned by the same protocol, as ``NAME@tuned``."""
    best_lr, grid = _tune_lr(task, lambda m, lr: torch.optim.Adam(m.parameters(), lr=lr), config.adam_grid, config,
                             "Adam grid", progress)
    makers: dict[str, Callable] = {"adam": lambda m: torch.optim.Adam(m.parameters(), lr=best_lr)}
    learned_lr = {}
    for name, rule in rules.items():
        makers[name] = lambda m, rule=rule: NetworkOptimizer(m, rule)
        if config.learned_lr_grid:
            lr, losses = _tune_lr(task, lambda m, lr, rule=rule: NetworkOptimizer(m, rule, lr=lr),
                                  config.learned_lr_grid, config, f"{name} lr grid", progress)
            makers[f"{name}@tuned"] = lambda m, rule=rule, lr=lr: NetworkOptimizer(m, rule, lr=lr)
            learned_lr[name] = {"lr": lr, "grid": {str(k): v for k, v in losses.items()}}
    curves: dict[str, list[Curve]] = {name: [] for name in makers}
    bar = tqdm(total=config.eval_seeds * len(makers), desc="evaluate", disable=not progress)
    for seed in range(1000, 1000 + config.eval_seeds):
        for name, make in makers.items():
            curves[name].append(train_curve(task, make, seed, config.horizon, config.eval_every))
            bar.update()
    bar.close()
    return _summarise(best_lr, grid, curves) | {"learned_lr": learned_lr}


def _summarise(best_lr: float, grid: dict, curves: dict[str, list[Curve]]) -> dict:
    adam = curves["adam"]
    targets = [min(c.test_loss) for c in adam]
    adam_steps = [c.first_step_reaching(t) for c, t in zip(adam, targets)]
    rows = {}
    for name, runs in curves.items():
        factors, speedups, reached, per_seed = [], [], 0, []
        for c, target, n_adam, a in zip(runs, targets, adam_steps, adam):
            steps = c.first_step_reaching(target)
            per_seed.append(steps)
            if steps is None:
                factors.append(None)
                speedups.append(None)
                continue
            reached += 1
            factors.append(n_adam / steps)
            speedups.append((n_adam * a.seconds) / (steps * c.seconds))    # per-step seconds x steps
        rows[name] = {"step_reduction": mean_std(factors), "speedup": mean_std(speedups),
                      "best_test_loss": mean_std([min(c.test_loss) for c in runs]),
                      "final_test_loss": mean_std([c.test_loss[-1] for c in runs]),
                      "ms_per_step": mean_std([1e3 * c.seconds / max(c.trained, 1) for c in runs]),
                      "reached_adam_best": f"{reached}/{len(runs)}", "diverged": sum(c.diverged for c in runs), "steps_to_adam_best": per_seed,
                      "curves": {"steps": runs[0].steps, "test_loss": [c.test_loss for c in runs]}}
    return {"adam_lr": best_lr, "adam_lr_interior": not on_grid_edge(best_lr, grid), "adam_grid": {str(k): v for k, v in grid.items()},
            "optimizers": rows}


def report(results: dict, out_dir: str | os.PathLike) -> str:
    """Write ``results.json``, ``table.md``, ``loss_curves.png`` (first task) and ``meta_training.png``.

    "x fewer" and the speed-up average over the seeds that reach Adam's best ("reached"); the
    steps per seed show every seed, "–" where the optimizer never reaches it within the horizon.
    """
    out = Path(out_dir)
    cfg = results["config"]
    write_results(out / "results.json", results, cfg.get("device", "cpu"))
    meta = results["meta_training"]
    kept = ", ".join(f"{LABELS[name]} step {m['selected_step']} of {m['steps']}" for name, m in meta.items())
    shipped = ", ".join(f'"{n}"' for n in cfg.get("pretrained", ()))
    trained_on = (f"the task family {', '.join(cfg['family'])} (held out: {', '.join(cfg['held_out']) or 'none'})"
                  if cfg.get("family") else "the first task only")
    lines = [f"Horizon {cfg['horizon']} steps, {cfg['eval_seeds']} evaluation seeds (1000 on) on {cfg.get('task', 'digits')} "
             f"split {cfg.get('eval_split_seed', 0)}, Adam tuned on seed {cfg.get('tuning_seed', 0)}; "
             + (f"learned optimizers meta-trained with PES on split 0 of {trained_on} (rule kept: {kept})"
                if kept else "no rule meta-trained in this run")
             + (f"; shipped rules raced as they are: {shipped}." if shipped else ".")]
    f = lambda pair, d=2: "-" if math.isnan(pair[0]) else f"{pair[0]:.{d}f} ± {pair[1]:.{d}f}"  # noqa: E731
    for label, race_result in results["tasks"].items():
        edge = "" if race_result["adam_lr_interior"] else " **at the grid's edge: widen the grid**"
        lines += ["", f"**{label}**, Adam lr {race_result['adam_lr']} (best of a log grid "
                  f"{min(map(float, race_result['adam_grid']))}..{max(map(float, race_result['adam_grid']))}{edge}):", "",
                  "| optimizer | steps to Adam's best (x fewer) | wall-clock speed-up | reached | steps per seed "
                  "| best test loss | final test loss | ms/step |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in race_result["optimizers"].items():
            seeds = ", ".join("–" if n is None else str(n) for n in r["steps_to_adam_best"])
            lines.append(f"| {label_of(name, race_result.get('learned_lr'))} | {f(r['step_reduction'])} | {f(r['speedup'])} | {r['reached_adam_best']}"
                         f"{f' ({d} diverged)' if (d := r.get('diverged', 0)) else ''} "
                         f"| {seeds} | {f(r['best_test_loss'], 3)} | {f(r['final_test_loss'], 3)} "
                         f"| {f(r['ms_per_step'])} |")
    table = "\n".join(lines)
    atomic_write_text(out / "table.md", table + "\n")
    label, first = next(iter(results["tasks"].items()))
    _plot(first, label, out / "loss_curves.png")
    _plot_grid(results["tasks"], out / "adam_grid.png")
    if meta:
        _plot_meta(meta, out / "meta_training.png")
    return table


def label_of(name: str, learned_lr: dict | None = None) -> str:
    """Table label of an optimizer: a rule name, or ``shipped:NAME`` for a shipped rule; ``NAME@tuned`` is the rule
    with its learning-rate multiplier tuned (the value, from ``learned_lr``, in the label)."""
    base, tuned = name.removesuffix("@tuned"), name.endswith("@tuned")
    label = f"shipped \"{base.split(':', 1)[1]}\"" if base.startswith("shipped:") else LABELS[base]
    if not tuned:
        return label
    chosen = (learned_lr or {})[base]
    grid = sorted(map(float, chosen["grid"]))
    edge = ", grid edge" if len(grid) > 1 and chosen["lr"] in (grid[0], grid[-1]) else ""
    return f"{label}, lr x{chosen['lr']:g} (tuned{edge})"


def _plot_grid(tasks: dict, path: Path) -> None:
    """Adam's best test loss against its learning rate, per task (the selected value marked)."""
    with figure(path, "Adam learning rate", "best test loss within the horizon (tuning seed)",
                "Adam's learning-rate grid (star: selected)", size=(6.4, 4.0), xlog=True, ylog=True) as ax:
        for label, r in tasks.items():
            lrs, losses = zip(*sorted((float(k), v) for k, v in r["adam_grid"].items()))
            line, = ax.plot(lrs, losses, marker=".", label=label)
            ax.plot(r["adam_lr"], losses[lrs.index(r["adam_lr"])], "*", ms=12, color=line.get_color())


def _plot_meta(meta: dict, path: Path) -> None:
    """Meta-validation loss against meta-step per rule (the rule kept is starred); without meta-validation,
    the PES meta-loss averaged over 10 steps."""
    with figure(path, "meta-step (PES)", "meta-loss", "Meta-training (star: the rule kept)", size=(6.4, 4.0)) as ax:
        for name, m in meta.items():
            if m["validation"]:
                steps, losses = zip(*m["validation"])
                line, = ax.plot(steps, losses, marker=".", label=f"{LABELS[name]} (meta-validation)")
                if m["selected_step"] in steps:
                    ax.plot(m["selected_step"], losses[steps.index(m["selected_step"])], "*", ms=12,
                            color=line.get_color())
            elif m["loss"]:
                loss = torch.tensor(m["loss"])
                window = min(10, len(loss))
                smooth = loss.unfold(0, window, 1).mean(1)
                ax.plot(range(window, len(loss) + 1), smooth, label=f"{LABELS[name]} (PES meta-loss)")


def _plot(race_result: dict, label: str, path: Path) -> None:
    with figure(path, "training step", "test loss (cross-entropy)", f"Learned optimizers vs tuned Adam: {label}",
                ylog=True) as ax:
        for name, r in race_result["optimizers"].items():
            steps = r["curves"]["steps"]
            losses = torch.tensor(r["curves"]["test_loss"])
            mean = losses.mean(0)
            std = losses.std(0) if len(losses) > 1 else torch.zeros_like(mean)
            line, = ax.plot(steps, mean, label=label_of(name, race_result.get('learned_lr')))
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
