"""Inner tasks for meta-training, written functionally so that many inner runs vectorise with vmap.

A task draws initial parameters and batches from a ``torch.Generator`` (so a run is
reproducible and its random state can be checkpointed) and defines a per-run loss
``loss(params, batch) -> scalar``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from torch.func import functional_call

from ..models.mlp import make_mlp
from ..data import load_classification_split, load_digits_split
from ..data.image_files import load_cifar, load_fashion_mnist
from ..capture.functional import functional_features
from ..capture import spec_of

__all__ = ["Task", "LinearRegressionTask", "MLPClassificationTask", "DigitsMLPTask", "fashion_mnist_task",
           "cifar_task", "tabular_task", "classification_task"]

Params = dict[str, torch.Tensor]


class Task:
    """Interface: ``init_params``, ``sample_batch`` (both for ``n`` runs at once) and ``loss`` (one run).

    Tasks with held-out data also define ``sample_validation_batch``, which PES can use as the
    meta-objective (``PESConfig.objective = "validation"``).
    """

    def init_params(self, n: int, generator: torch.Generator) -> Params:
        raise NotImplementedError

    def sample_batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def sample_validation_batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError(f"{type(self).__name__} has no validation data; use the training-loss "
                                  "meta-objective (objective='train')")

    def loss(self, params: Params, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class LinearRegressionTask(Task):
    """``y_hat = w^T x`` with ``x`` from a mixture of two Gaussians at (1, 2) and (2, 1), target 0.

    The loss ``E[(w^T x)^2]`` has non-diagonal curvature, the paper's 2-parameter sanity task.
    """

    batch_size: int = 32
    noise: float = 0.3

    def init_params(self, n: int, generator: torch.Generator) -> Params:
        return {"w": torch.randn(n, 2, generator=generator)}

    def sample_batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        centres = torch.tensor([[1.0, 2.0], [2.0, 1.0]])
        which = torch.randint(2, (n, self.batch_size), generator=generator)
        x = centres[which] + self.noise * torch.randn(n, self.batch_size, 2, generator=generator)
        return (x,)

    def loss(self, params: Params, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        (x,) = batch
        return (x @ params["w"]).square().mean()


class MLPClassificationTask(Task):
    """MLP ``d -> hidden -> classes`` (ReLU), cross-entropy, on given training data; batch 128 by default.

    ``hidden`` is one width, or a sequence of widths for a deeper MLP (``(64, 64)``: two hidden layers).

    ``validation_fraction`` moves a seeded random part of the training data into a validation
    split (``x_val``, ``y_val``) for validation meta-objectives; training then uses the rest.
    Parameter names follow ``make_mlp`` (``0.weight``, ``0.bias``, ``2.weight``, ``2.bias``), so a
    meta-trained rule drops into an ``nn.Sequential`` of the same shape.
    :meth:`grads_and_features` also returns the decomposed gradients that GradMetaNet rules read.
    """

    def __init__(self, x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                 hidden: int | Sequence[int] = 32, batch_size: int = 128, validation_fraction: float = 0.0) -> None:
        if not 0.0 <= validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must lie in [0, 1), got {validation_fraction}")
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))
        n_val = int(round(validation_fraction * len(x_train)))
        val, train = order[:n_val], order[n_val:]
        self.x_val, self.y_val = x_train[val], y_train[val]
        x_train, y_train = x_train[train], y_train[train]
        self.x_train, self.y_train, self.x_test, self.y_test = x_train, y_train, x_test, y_test
        self.widths = (hidden,) if isinstance(hidden, int) else tuple(hidden)
        self.hidden, self.batch_size = self.widths[0], batch_size
        self.in_dim = x_train.shape[1]
        self.classes = int(max(y_train.max(), y_test.max())) + 1
        self.model = self.make_model()                   # the structure; parameters come from each run
        self.spec = spec_of(self.model)

    def make_model(self) -> torch.nn.Sequential:
        """The ``nn.Sequential`` this task trains, for ordinary (non-functional) training loops."""
        return make_mlp([self.in_dim, *self.widths, self.classes], "relu")

    def init_params(self, n: int, generator: torch.Generator) -> Params:
        """PyTorch's default ``nn.Linear`` initialisation, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, for ``n`` runs."""
        params = {}
        for site in self.spec.sites:
            fan_in = self.spec.space(site.in_space).size
            for name in (site.weight, site.bias) if site.bias else (site.weight,):
                shape = self.spec.param_shapes()[name]
                params[name] = (torch.rand(n, *shape, generator=generator) * 2 - 1) / math.sqrt(fan_in)
        return params

    def sample_batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        idx = torch.randint(len(self.x_train), (n, self.batch_size), generator=generator)
        return self.x_train[idx], self.y_train[idx]

    def sample_validation_batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        if not len(self.x_val):
            return super().sample_validation_batch(n, generator)
        idx = torch.randint(len(self.x_val), (n, self.batch_size), generator=generator)
        return self.x_val[idx], self.y_val[idx]

    def loss(self, params: Params, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(functional_call(self.model, params, (x,)), y)

    def batch_loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The training loss of an ordinary ``nn.Module`` on one batch (what a training loop backpropagates)."""
        x, y = batch
        return F.cross_entropy(model(x), y)

    def test_loss(self, model: torch.nn.Module) -> float:
        """Cross-entropy on the whole test set."""
        with torch.no_grad():
            return F.cross_entropy(model(self.x_test), self.y_test).item()

    def grads_and_features(self, params: Params, batch: tuple[torch.Tensor, ...]
                           ) -> tuple[Params, torch.Tensor, torch.Tensor]:
        """Parameter gradients, neuron features ``[b, N, 2]`` (incidence features, as
        ``GradientSet.neuron_tensor``) and the batch loss, by the functional extractor."""
        x, y = batch
        loss, g_params, features = functional_features(self.model, self.spec, params, (x,),
                                                       lambda logits: F.cross_entropy(logits, y))
        return g_params, features, loss


class DigitsMLPTask(MLPClassificationTask):
    """The scikit-learn 8x8 digits with an MLP ``64 -> hidden -> 10`` (the task that runs offline)."""

    def __init__(self, hidden: int = 32, batch_size: int = 128, seed: int = 0,
                 validation_fraction: float = 0.0) -> None:
        super().__init__(*load_digits_split(seed=seed), hidden=hidden, batch_size=batch_size,
                         validation_fraction=validation_fraction)


def fashion_mnist_task(root: str, hidden: int = 32, batch_size: int = 128,
                       validation_fraction: float = 0.0) -> MLPClassificationTask:
    """FashionMNIST 8x8 (IDX files in ``root``), MLP ``64 -> hidden -> 10`` as in the paper."""
    return MLPClassificationTask(*load_fashion_mnist(root, "train"), *load_fashion_mnist(root, "test"),
                                 hidden=hidden, batch_size=batch_size, validation_fraction=validation_fraction)


def cifar_task(root: str, classes: int = 10, hidden: int | None = None, batch_size: int = 128,
               validation_fraction: float = 0.0) -> MLPClassificationTask:
    """CIFAR-10 / CIFAR-100 8x8 colour (pickles in ``root``), MLP ``192 -> 32 | 128 -> classes`` as in the paper."""
    hidden = hidden or (32 if classes == 10 else 128)
    return MLPClassificationTask(*load_cifar(root, classes, "train"), *load_cifar(root, classes, "test"),
                                 hidden=hidden, batch_size=batch_size, validation_fraction=validation_fraction)


def tabular_task(name: str, hidden: int = 32, batch_size: int = 128, seed: int = 0) -> MLPClassificationTask:
    """A small tabular classification set that scikit-learn ships (``wine``, ``breast_cancer``, ``iris``).

    Features are standardised with training statistics; the split is a seeded 75/25 permutation.
    For transfer tests: a learned optimizer meta-trained on digits meets other input and output sizes.
    """
    if name not in ("wine", "breast_cancer", "iris"):
        raise ValueError(f"unknown tabular task {name!r}; choose from ['breast_cancer', 'iris', 'wine']")
    return MLPClassificationTask(*load_classification_split(name, seed), hidden=hidden, batch_size=batch_size)


def classification_task(member: str, seed: int = 0, validation_fraction: float = 0.0) -> MLPClassificationTask:
    """The task a member name describes: ``"DATASET:WIDTHS:BATCH"``, widths joined by ``x``.

    ``"digits:32:128"`` is the digits in ``[0, 1]`` with one hidden layer of 32 and batch 128;
    ``"digits-std:64x64:32"`` standardised digits, two hidden layers of 64, batch 32;
    ``"mnist1d:32:128"`` MNIST-1D. Datasets: ``gradmetanet.data.CLASSIFICATION_SETS``.
    """
    parts = member.split(":")
    try:
        dataset, widths, batch = parts
        hidden = tuple(int(w) for w in widths.split("x"))
        batch_size = int(batch)
    except ValueError:
        raise ValueError(f"task member {member!r} is not DATASET:WIDTHS:BATCH (e.g. 'digits-std:64x64:32')") from None
    if min(hidden) < 1 or batch_size < 1:
        raise ValueError(f"task member {member!r}: widths and batch size must be positive")
    return MLPClassificationTask(*load_classification_split(dataset, seed), hidden=hidden, batch_size=batch_size,
                                 validation_fraction=validation_fraction)
