"""Supervised training of a metanetwork with best-validation model selection.

:func:`fit` is the user-facing loop (your networks as a gradient batch, weight-space features or tensors, one
target row per network, split into train, validation and test); :func:`fit_regression` is the index-based
loop the experiments share.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Protocol, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..atomic import atomic_replace
from ..core.spec import NetworkSpec
from ..features.neurons import GradientBatch
from ..distributed import all_reduce_sum, rank_and_world
from ..features.weightspace import WeightSpaceFeatures, flatten_weights

__all__ = ["FitResult", "LazyInputs", "fit", "fit_regression", "evaluate_mse", "has_converged"]

#: ``predict(model, indices) -> [len(indices), P]`` predictions in normalised target units.
Predictor = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass
class FitResult:
    """Outcome of :func:`fit_regression`; errors are mean losses in the caller's units.

    ``converged``: the validation loss stopped improving (:func:`has_converged`, ``window`` = the patience, or a
    fifth of the epochs without one). A run that ends at its epoch cap while still improving is not converged;
    its numbers are those of a model stopped early.
    """

    best_epoch: int
    best_val: float
    test: float
    val_history: list[float] = field(default_factory=list)
    train_history: list[float] = field(default_factory=list)
    epochs_run: int = 0
    converged: bool = False


def has_converged(val_history: list[float], window: int, tolerance: float = 0.01) -> bool:
    """Whether a validation curve stopped improving: its best epoch lies at least ``window`` epochs before the last,
    or the last ``window`` epochs improved the best value by less than ``tolerance`` (relative) - the plateau a
    cosine schedule ends on, where the rate decays to zero and the last epochs still gain a little."""
    if len(val_history) <= window:
        return False
    best = min(range(len(val_history)), key=val_history.__getitem__)
    if len(val_history) - 1 - best >= window:
        return True
    before = min(val_history[:-window])
    return before > 0 and (before - val_history[best]) / before < tolerance


#: ``loss(prediction, target, reduction=...)``, as ``F.mse_loss`` or ``F.binary_cross_entropy_with_logits``
Loss = Callable[..., torch.Tensor]


@torch.no_grad()
def evaluate_mse(model: nn.Module, predict: Predictor, indices: torch.Tensor, targets: torch.Tensor,
                 batch_size: int = 128, loss: Loss = F.mse_loss) -> float:
    """Mean over ``indices`` and entries of ``loss`` (default ``(predict - targets[indices])^2``). Under
    ``torchrun`` each process evaluates its share of ``indices`` and the sums are gathered (a collective: every
    process calls it with the same ``indices``)."""
    model.eval()
    rank, world = rank_and_world()
    mine = indices[rank::world]
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, len(mine), batch_size):
        idx = mine[start:start + batch_size]
        total += loss(predict(model, idx), targets[idx], reduction="sum").double().item()
    model.train()
    return all_reduce_sum(total).item() / (len(indices) * targets.shape[1])


def fit_regression(model: nn.Module, predict: Predictor, targets: torch.Tensor, train_idx: torch.Tensor,
                   val_idx: torch.Tensor, test_idx: torch.Tensor | None, epochs: int, batch_size: int, lr: float,
                   seed: int, on_epoch: Callable[[int, float], None] | None = None, loss: Loss = F.mse_loss,
                   train_predict: Predictor | None = None, schedule: str = "constant",
                   patience: int | None = None, checkpoint: str | os.PathLike | None = None,
                   optimizer: Callable[..., torch.optim.Optimizer] | None = None, clip_norm: float | None = None,
                   keep_initial: bool = False) -> FitResult:
    """Adam on ``loss`` (default the MSE) to ``targets`` (``[M, P]``, normalised); test error at the
    best-validation epoch. ``train_predict`` (default ``predict``) makes the training batches' predictions,
    e.g. on inputs moved by a random group element (augmentation) or on a fresh draw of data (zoo fine-tuning:
    ``predict`` returns each network's objective, ``targets`` are zeros and ``loss`` is the mean). ``schedule``:
    ``"constant"`` learning rate, ``"cosine"`` decay to zero over all steps, or ``"one_cycle"`` (warm-up over the
    first tenth, then annealing). ``optimizer(parameters, lr=lr)`` replaces Adam (AdamW, say); ``clip_norm``
    clips each step's gradient norm. ``keep_initial``: the untrained model is a candidate too (best epoch -1 when
    no epoch beats it). ``patience``: stop once the validation loss has
    not improved for that many epochs (``epochs`` is then a cap); see :attr:`FitResult.converged`.
    ``checkpoint``: a file that receives the loop's whole state after every epoch (model, optimizer, schedule,
    best weights, curves, random states; atomically); a fit started with such a file resumes after its last
    finished epoch, so a run stopped mid-fit loses at most an epoch. A file written by a fit of other settings
    is refused. The file is removed when the fit ends.

    Error values are mean losses in target units; the caller rescales them to its metric. ``test_idx=None`` skips
    the test evaluation (``test`` is then NaN).

    Under ``torchrun`` (a process group of several processes) the fit is data-parallel: every process draws the
    same batches, takes its share of each batch's rows, and ``DistributedDataParallel`` averages the gradients,
    weighted so that the step is the one-process step on the whole batch (up to the order of floating-point sums);
    validation and test are evaluated on every process alike, and only rank 0 writes the checkpoint.
    """
    if schedule not in ("constant", "cosine", "one_cycle"):
        raise ValueError(f"schedule must be 'constant', 'cosine' or 'one_cycle', got {schedule!r}")
    if patience is not None and patience < 1:
        raise ValueError(f"patience must be >= 1 epoch (or None: run every epoch), got {patience}")
    window = patience if patience is not None else max(1, epochs // 5)
    gen = torch.Generator().manual_seed(seed)
    opt = (optimizer or torch.optim.Adam)(model.parameters(), lr=lr)
    steps = epochs * -(-len(train_idx) // batch_size)
    sched = {"constant": lambda: None, "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps),
             "one_cycle": lambda: torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(steps, 1),
                                                                      pct_start=0.1)}[schedule]()
    best_val, best_state, best_epoch = float("inf"), copy.deepcopy(model.state_dict()), -1
    if keep_initial:
        best_val = evaluate_mse(model, predict, val_idx, targets, loss=loss)
    result = FitResult(best_epoch=-1, best_val=float("inf"), test=float("nan"))
    signature = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "schedule": schedule,
                 "patience": -1 if patience is None else patience, "train": train_idx.tolist(), "val": val_idx.tolist(),
                 "parameters": [[k, list(v.shape)] for k, v in model.state_dict().items()]}
    extras = {"optimizer": type(opt).__name__ if optimizer else None, "clip_norm": clip_norm,
              "keep_initial": keep_initial or None}
    signature |= {k: v for k, v in extras.items() if v is not None}      # checkpoints of plain fits keep theirs
    start = 0
    if checkpoint is not None and Path(checkpoint).exists():
        state = _load_checkpoint(checkpoint, signature)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None:
            sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        best_val, best_epoch, best_state = state["best_val"], state["best_epoch"], state["best_state"]
        result.val_history, result.train_history = list(state["val_history"]), list(state["train_history"])
        start = len(result.val_history)
    stopped = patience is not None and start and start - 1 - best_epoch >= patience
    rank, world = rank_and_world()
    trained = _DataParallel(model, find_unused_parameters=True) if world > 1 else model
    for epoch in range(start, 0 if stopped else epochs):
        order = train_idx[torch.randperm(len(train_idx), generator=gen)]
        running, count = 0.0, 0
        for begin in range(0, len(order), batch_size):
            idx = order[begin:begin + batch_size]
            mine, weight = (idx[rank::world], len(idx[rank::world]) * world / len(idx)) if len(idx) >= world else \
                (idx, 1.0)                     # a last batch smaller than the processes: each takes all of it
            value = weight * loss((train_predict or predict)(trained, mine), targets[mine])
            opt.zero_grad(set_to_none=True)
            value.backward()
            if clip_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
            opt.step()
            if sched is not None:
                sched.step()
            batch_loss = all_reduce_sum(value.detach()).item() / world
            running, count = running + batch_loss * len(idx), count + len(idx)
        val = evaluate_mse(model, predict, val_idx, targets, loss=loss)
        result.val_history.append(val)
        result.train_history.append(running / count)
        if val < best_val:
            best_val, best_epoch, best_state = val, epoch, copy.deepcopy(model.state_dict())
        if checkpoint is not None and rank == 0:
            _save_checkpoint(checkpoint, {
                "signature": signature, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": None if sched is None else sched.state_dict(), "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state(), "best_val": best_val, "best_epoch": best_epoch,
                "best_state": best_state, "val_history": result.val_history, "train_history": result.train_history})
        if on_epoch is not None:
            on_epoch(epoch, val)
        if patience is not None and epoch - best_epoch >= patience:
            break
    model.load_state_dict(best_state)
    result.best_epoch, result.best_val = best_epoch, best_val
    result.epochs_run = len(result.val_history)
    result.converged = has_converged(result.val_history, window)
    if test_idx is not None:
        result.test = evaluate_mse(model, predict, test_idx, targets, loss=loss)
    if checkpoint is not None and rank == 0 and Path(checkpoint).exists():
        os.remove(checkpoint)
    return result


class _DataParallel(DistributedDataParallel):
    """``DistributedDataParallel`` that also answers for the wrapped model's attributes, so predictors written for
    the model (``model.gradient_net``) run on the wrapper unchanged."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def _save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_replace(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: str | os.PathLike, signature: dict) -> dict:
    state = torch.load(path, weights_only=True)
    if state.get("signature") != signature:
        differ = sorted(k for k in signature if state.get("signature", {}).get(k) != signature[k])
        raise ValueError(f"checkpoint {path} was written by a fit of other settings (differing: {', '.join(differ)}); "
                         "delete it to start this fit afresh")
    return state


#: what :func:`fit` trains on: one row (network) per target row
class LazyInputs(Protocol):
    """Inputs read batch by batch (a zoo on disk: :meth:`gradmetanet.zoos.ShardedZoo.weights`): ``len`` networks,
    ``select(idx)`` gives a container of those networks, ``spec`` the networks' spec."""

    spec: NetworkSpec

    def __len__(self) -> int: ...

    def select(self, index: torch.Tensor) -> WeightSpaceFeatures | GradientBatch: ...


Inputs = Union[GradientBatch, WeightSpaceFeatures, Mapping[str, torch.Tensor], torch.Tensor, LazyInputs]


def _lazy(inputs: Inputs) -> bool:
    return not isinstance(inputs, (GradientBatch, WeightSpaceFeatures, Mapping, torch.Tensor)) and \
        hasattr(inputs, "select") and hasattr(inputs, "__len__")


def _rows(inputs: Inputs) -> int:
    if _lazy(inputs):
        return len(inputs)
    if isinstance(inputs, GradientBatch):
        return inputs.features.shape[0]
    if isinstance(inputs, WeightSpaceFeatures):
        return next(iter(inputs.tensors.values())).shape[0]
    if isinstance(inputs, Mapping):
        return next(iter(inputs.values())).shape[0]
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    raise TypeError(f"fit reads a GradientBatch, WeightSpaceFeatures, a dict of [M, ...] tensors or a tensor, got "
                    f"{type(inputs).__name__}")


def _model_input(inputs: Inputs, idx: torch.Tensor):
    """Rows ``idx`` of ``inputs``, of the same kind (a container keeps its spec; lazy inputs are read now)."""
    if isinstance(inputs, (GradientBatch, WeightSpaceFeatures)) or _lazy(inputs):
        return inputs.select(idx)
    if isinstance(inputs, Mapping):
        return {k: v[idx] for k, v in inputs.items()}
    return inputs[idx]


def fit(model: nn.Module, inputs: Inputs, targets: torch.Tensor, epochs: int = 50, batch_size: int = 32,
        lr: float = 1e-3, val_fraction: float = 0.2, test_fraction: float = 0.2, seed: int = 0,
        progress: bool = True, patience: int | None = None) -> FitResult:
    """Train ``model`` to map network ``i`` of ``inputs`` to ``targets[i]`` (``[M, K]``) by MSE with Adam.

    ``inputs``: a :class:`~gradmetanet.GradientBatch` (GradMetaNet, GradMetaNet++), a
    :class:`~gradmetanet.features.WeightSpaceFeatures` (the weight-space backbones; each takes the container, which
    carries its spec, and refuses one of another spec) or a dict ``{param: [M, *shape, C]}``, or a tensor
    ``[M, ...]``, or :class:`LazyInputs` read batch by batch (a zoo larger than memory, from its shards). A weight-space output ``{param: [B, *shape, C]}``
    is compared flattened in the spec's parameter order (:func:`~gradmetanet.features.flatten_weights`, so
    build targets with it), an invariant output ``[B, K]`` as it is. The networks are split once, seeded:
    ``val_fraction`` selects the epoch (the model keeps its best-validation weights), ``test_fraction`` is read
    once at the end (``FitResult.test``), the rest trains. ``patience``: stop once validation has not improved
    for that many epochs (``epochs`` is then a cap); ``FitResult.converged`` says whether validation stopped
    improving. Normalise inputs and targets first (:class:`~gradmetanet.features.NeuronNormaliser`).
    """
    m = _rows(inputs)
    if targets.dim() != 2 or targets.shape[0] != m:
        raise ValueError(f"targets must be [M, K] with one row per network ({m}), got {list(targets.shape)}")
    n_val, n_test = max(1, int(round(val_fraction * m))), max(1, int(round(test_fraction * m)))
    if n_val + n_test >= m:
        raise ValueError(f"{m} networks leave nothing to train on with val_fraction={val_fraction} and "
                         f"test_fraction={test_fraction}")
    order = torch.randperm(m, generator=torch.Generator().manual_seed(seed))
    val_idx, test_idx, train_idx = order[:n_val], order[n_val:n_val + n_test], order[n_val + n_test:]
    spec = getattr(inputs, "spec", None)

    def predict(net: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        out = net(_model_input(inputs, idx))
        if isinstance(out, WeightSpaceFeatures):
            return out.flatten()
        if isinstance(out, dict):
            if spec is None:
                raise ValueError("a weight-space output needs the inputs' spec to be flattened: pass a GradientBatch "
                                 "or WeightSpaceFeatures")
            return flatten_weights(out, spec)
        return out.flatten(1)

    with tqdm(total=epochs, desc="fit", unit="epoch", disable=not progress) as bar:
        return fit_regression(model, predict, targets, train_idx, val_idx, test_idx, epochs, batch_size, lr, seed,
                              on_epoch=lambda epoch, val: (bar.update(), bar.set_postfix(val_mse=f"{val:.4g}")),
                              patience=patience)
