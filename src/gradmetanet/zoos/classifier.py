"""Zoos of small classifiers (CNNs in the Small CNN Zoo layout, MLPs), trained here many at once.

A zoo is weak but varied on purpose, as the Small CNN Zoo is: every network draws its own initialisation,
learning rate (log-uniform), number of SGD steps and subset of the training images, so accuracies spread
from chance to good. Networks are trained together: their parameters carry a leading network axis and
one ``vmap`` of the module's ``functional_call`` runs them all (:func:`batched_logits`).

Images are split once (``train`` for the zoo and for any fine-tuning, ``val`` for choices, ``test`` for
the reported numbers) and networks are split too (``train`` / ``val`` / ``test``): held-out networks are
evaluated on held-out images.

Datasets (all offline): ``digits`` (scikit-learn's 1,797 8 x 8 digits; for CNNs upsampled bilinearly to
28 x 28 and quantised to 0..255 as the INR zoo does, for MLPs the native 64 pixels), both scaled to
``[-1, 1]``; ``mnist1d`` (the MNIST-1D benchmark, 5,000 sequences of 40, made by the ``mnist1d`` package's
generator with its default arguments).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from tqdm.auto import tqdm

from .cache import cached_zoo
from .optim import heavy_ball_step
from .shards import complete_sharded_zoo, make_sharded_zoo
from ..models.cnn import small_cnn_zoo_template
from ..models.mlp import make_mlp
from ..data.classification import mnist1d_arrays
from .inr import digits_images

__all__ = ["ClassifierZooConfig", "ClassifierZoo", "small_cnn_zoo_template", "zoo_template", "zoo_images",
           "batched_logits", "load_or_generate_classifier_zoo", "generate_classifier_zoo",
           "train_classifier_networks", "network_recipe", "network_split", "image_split",
           "make_sharded_classifier_zoo", "load_sharded_classifier_zoo", "SmallCnnZooSource", "small_cnn_zoo_to_shards",
           "ARCHITECTURES", "DATASETS", "load_small_cnn_zoo"]

ARCHITECTURES = ("cnn", "mlp")
DATASETS = ("digits", "mnist1d")
#: how networks are drawn: "per-network seeds" (0.9: network i from seed (seed, i) alone; 0.8 drew every recipe from
#: one stream, so a network depended on the zoo's size): caches of the other way are rebuilt
GENERATOR = "per-network seeds"
ZOO_ACTIVATIONS = ("tanh", "relu")      # what the zoos' networks are trained with (names of models.ACTIVATIONS)


@dataclass(frozen=True)
class ClassifierZooConfig:
    architecture: str = "cnn"                     # cnn (Small CNN Zoo layout) | mlp
    activation: str = "tanh"                      # tanh (sign symmetry) | relu (positive scales)
    dataset: str = "digits"                       # digits | mnist1d
    networks: int = 1000
    mlp_hidden: tuple[int, ...] = (32, 32)
    steps: tuple[int, int] = (20, 300)            # SGD steps per network, uniform
    lr: tuple[float, float] = (3e-3, 1e-1)        # log-uniform; SGD with momentum 0.9
    subset: tuple[float, float] = (0.05, 0.5)     # fraction of the training images a network sees, uniform
    batch_size: int = 32
    image_split: tuple[float, float] = (0.6, 0.1)  # train and val fractions of the images (the rest: test)
    network_split: tuple[float, float] = (0.7, 0.1)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES or self.dataset not in DATASETS or \
                self.activation not in ZOO_ACTIVATIONS:
            raise ValueError(f"unknown zoo {self.architecture}/{self.activation}/{self.dataset}: architectures "
                             f"{ARCHITECTURES}, activations {ZOO_ACTIVATIONS}, datasets {DATASETS}")
        if self.architecture == "cnn" and self.dataset != "digits":
            raise ValueError("the CNN zoo reads images: dataset 'digits' (MNIST-1D sequences go to the MLP zoo)")

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        return f"{self.architecture}-{self.activation}" + ("" if self.dataset == "digits" else f"-{self.dataset}")


def zoo_images(dataset: str, architecture: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``: every image of ``dataset`` in ``[-1, 1]`` (``[n, 1, 28, 28]`` for CNNs on digits, ``[n, 64]``
    for MLPs on digits, ``[n, 40]`` for MNIST-1D, standardised as the generator makes it) and labels ``[n]``."""
    if dataset == "mnist1d":
        return mnist1d_arrays()
    if architecture == "cnn":
        images, labels = digits_images()
        return (images.float() / 127.5 - 1).unsqueeze(1), labels
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.as_tensor(data.data, dtype=torch.float32) / 8 - 1, torch.as_tensor(data.target, dtype=torch.long)


def zoo_template(config: ClassifierZooConfig) -> nn.Module:
    """The architecture every network of the zoo shares."""
    if config.architecture == "cnn":
        return small_cnn_zoo_template(config.activation)
    d_in = 40 if config.dataset == "mnist1d" else 64
    return make_mlp([d_in, *config.mlp_hidden, 10], config.activation)


def batched_logits(template: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
                   shared: bool = True) -> torch.Tensor:
    """``[N, B, classes]``: the ``N`` networks ``params {name: [N, *shape]}`` on ``x`` (``[B, ...]`` for every
    network when ``shared``, else ``[N, B, ...]``, one batch each); differentiable in ``params``."""
    return vmap(lambda p, xi: functional_call(template, p, (xi,)), in_dims=(0, None if shared else 0))(params, x)


def _split(n: int, fractions: tuple[float, float], gen: torch.Generator) -> dict[str, torch.Tensor]:
    order = torch.randperm(n, generator=gen)
    a, b = int(round(fractions[0] * n)), int(round((fractions[0] + fractions[1]) * n))
    return {"train": order[:a].sort().values, "val": order[a:b].sort().values, "test": order[b:].sort().values}


@dataclass
class ClassifierZoo:
    """Networks ``params {name: [M, *shape]}`` of one architecture with how each was trained and how well it does.

    ``accuracy [M]``: on the test images. ``lr``, ``steps``, ``subset [M]``: the drawn training recipe.
    ``images`` and ``networks``: the splits (indices into ``x`` and into the networks).
    """

    config: ClassifierZooConfig
    params: dict[str, torch.Tensor]
    accuracy: torch.Tensor
    lr: torch.Tensor
    steps: torch.Tensor
    subset: torch.Tensor
    images: dict[str, torch.Tensor]
    networks: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.accuracy)

    def template(self) -> nn.Module:
        return zoo_template(self.config)

    def data(self) -> tuple[torch.Tensor, torch.Tensor]:
        return zoo_images(self.config.dataset, self.config.architecture)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"params/{k}": v.contiguous() for k, v in self.params.items()}
        out |= {"accuracy": self.accuracy, "lr": self.lr, "steps": self.steps, "subset": self.subset}
        out |= {f"images/{k}": v for k, v in self.images.items()} | {f"networks/{k}": v for k, v in self.networks.items()}
        return out

    @classmethod
    def from_tensors(cls, config: ClassifierZooConfig, t: dict[str, torch.Tensor]) -> "ClassifierZoo":
        """Inverse of :meth:`tensors`; ``params`` in the template's parameter order (safetensors sorts keys as text)."""
        part = lambda prefix: {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}  # noqa: E731
        stored = part("params/")
        params = {name: stored[name] for name, _ in zoo_template(config).named_parameters()}
        return cls(config, params, t["accuracy"], t["lr"], t["steps"], t["subset"], part("images/"), part("networks/"))


def network_split(config: ClassifierZooConfig) -> dict[str, torch.Tensor]:
    """The zoo's train / val / test networks (indices), drawn from ``config.seed`` and the zoo's size alone."""
    return _split(config.networks, config.network_split, torch.Generator().manual_seed(config.seed * 31 + 1))


def image_split(config: ClassifierZooConfig, n_images: int) -> dict[str, torch.Tensor]:
    """The train / val / test images (indices), drawn from ``config.seed`` alone."""
    return _split(n_images, config.image_split, torch.Generator().manual_seed(config.seed * 31))


def network_recipe(config: ClassifierZooConfig, index: int, train_images: torch.Tensor
                   ) -> tuple[dict[str, torch.Tensor], int, float, float, torch.Tensor]:
    """Network ``index``'s initial parameters, steps, learning rate, image fraction and batches ``[steps, B]``
    (indices into the images), all from its own seed ``(config.seed, index)``: a network is the same whatever the
    zoo's size, its shards or the processes that make it."""
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + index)
    template = zoo_template(config)
    with torch.random.fork_rng(devices=[]):                  # PyTorch's default initialisation; the caller's RNG stays
        torch.manual_seed(int(torch.randint(2 ** 62, (1,), generator=gen)))
        for module in template.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        params = {k: v.detach().clone() for k, v in template.named_parameters()}
    lo, hi = config.steps
    steps = int(torch.randint(lo, hi + 1, (1,), generator=gen))
    lr = math.exp(math.log(config.lr[0]) + float(torch.rand((), generator=gen)) * math.log(config.lr[1] / config.lr[0]))
    subset = config.subset[0] + float(torch.rand((), generator=gen)) * (config.subset[1] - config.subset[0])
    size = max(config.batch_size, int(subset * len(train_images)))
    own = train_images[torch.randperm(len(train_images), generator=gen)[:size]]
    batches = own[torch.randint(size, (steps, config.batch_size), generator=gen)]
    return params, steps, lr, subset, batches


def train_classifier_networks(config: ClassifierZooConfig, start: int, stop: int) -> dict[str, torch.Tensor]:
    """Networks ``start .. stop - 1`` of the zoo trained together (each by its own :func:`network_recipe`):
    ``{"params/<name>": [m, *shape], "accuracy", "lr", "steps", "subset": [m]}``."""
    x, y = zoo_images(config.dataset, config.architecture)
    images = image_split(config, len(x))
    template = zoo_template(config)
    recipes = [network_recipe(config, i, images["train"]) for i in range(start, stop)]
    params = {k: torch.stack([r[0][k] for r in recipes]) for k in recipes[0][0]}
    steps = torch.tensor([r[1] for r in recipes])
    lr = torch.tensor([r[2] for r in recipes])
    longest = int(steps.max())
    batches = torch.stack([torch.cat([r[4], r[4].new_zeros(longest - r[1], config.batch_size)]) for r in recipes])
    velocity = {k: torch.zeros_like(v) for k, v in params.items()}
    for step in range(longest):
        idx = batches[:, step]                                              # [m, B]
        p = {k: v.requires_grad_() for k, v in params.items()}
        logits = batched_logits(template, p, x[idx], shared=False)
        loss = F.cross_entropy(logits.flatten(0, 1), y[idx].flatten(), reduction="sum") / config.batch_size
        grads = torch.autograd.grad(loss, list(p.values()))
        params = heavy_ball_step(p, grads, velocity, (step < steps).float() * lr)
    params = {k: v.detach() for k, v in params.items()}
    accuracy = _accuracy(template, params, x[images["test"]], y[images["test"]])
    return {**{f"params/{k}": v for k, v in params.items()}, "accuracy": accuracy, "lr": lr, "steps": steps,
            "subset": torch.tensor([r[3] for r in recipes])}


def _accuracy(template: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
              chunk: int = 500) -> torch.Tensor:
    """``[N]``: each network's accuracy on ``(x, y)``."""
    with torch.no_grad():
        hits = [(batched_logits(template, params, x[i:i + chunk]).argmax(-1) == y[i:i + chunk]).float().sum(1)
                for i in range(0, len(x), chunk)]
    return torch.stack(hits).sum(0) / len(x)


def generate_classifier_zoo(config: ClassifierZooConfig, chunk: int = 250, progress: bool = True) -> ClassifierZoo:
    """Train ``config.networks`` networks, ``chunk`` at a time (any chunk gives the same zoo: see
    :func:`network_recipe`)."""
    parts = []
    bar = tqdm(total=config.networks, desc=f"training the {config.name} zoo", disable=not progress)
    for start in range(0, config.networks, chunk):
        parts.append(train_classifier_networks(config, start, min(start + chunk, config.networks)))
        bar.update(len(parts[-1]["accuracy"]))
    bar.close()
    tensors = {k: torch.cat([part[k] for part in parts]) for k in parts[0]}
    x, _ = zoo_images(config.dataset, config.architecture)
    tensors |= {f"images/{k}": v for k, v in image_split(config, len(x)).items()}
    tensors |= {f"networks/{k}": v for k, v in network_split(config).items()}
    return ClassifierZoo.from_tensors(config, tensors)


def load_or_generate_classifier_zoo(config: ClassifierZooConfig, cache_dir: str | os.PathLike | None,
                                    progress: bool = True) -> ClassifierZoo:
    """The zoo of ``config`` from the verified cache in ``cache_dir`` (:func:`~gradmetanet.zoos.cached_zoo`), else
    trained and cached; ``cache_dir=None`` keeps nothing."""
    def summary(zoo: ClassifierZoo) -> dict:
        acc = zoo.accuracy
        return {"networks": len(zoo), "parameters": sum(v[0].numel() for v in zoo.params.values()),
                "test_accuracy": {"mean": acc.mean().item(), "min": acc.min().item(), "max": acc.max().item()},
                "splits": {"images": {k: len(v) for k, v in zoo.images.items()},
                           "networks": {k: len(v) for k, v in zoo.networks.items()}}}
    return cached_zoo("classifier_zoo", config, lambda: generate_classifier_zoo(config, progress=progress),
                      ClassifierZoo.tensors, lambda t: ClassifierZoo.from_tensors(config, t), cache_dir, summary,
                      depends={"networks": GENERATOR})


def make_sharded_classifier_zoo(config: ClassifierZooConfig, folder: str | os.PathLike, shard_size: int = 250,
                                 rank: int | None = None, world: int | None = None, progress: bool = True) -> list[int]:
    """Make (or finish) the zoo of ``config`` as a sharded folder (:func:`~gradmetanet.zoos.make_sharded_zoo`): one
    shard of ``shard_size`` networks at a time, this process's share of them under ``torchrun``."""
    def common() -> dict[str, torch.Tensor]:
        x, _ = zoo_images(config.dataset, config.architecture)
        return {f"images/{k}": v for k, v in image_split(config, len(x)).items()} | \
            {f"networks/{k}": v for k, v in network_split(config).items()}
    return make_sharded_zoo(folder, "classifier_zoo", config, config.networks, shard_size,
                            lambda start, stop: train_classifier_networks(config, start, stop), common, rank, world,
                            depends={"networks": GENERATOR}, progress=progress)


def load_sharded_classifier_zoo(folder: str | os.PathLike) -> ClassifierZoo:
    """The classifier zoo of a sharded folder, every shard verified (a missing or damaged one is named)."""
    zoo, fields = complete_sharded_zoo(folder, "classifier_zoo", "gradmetanet zoo make classifier")
    return ClassifierZoo.from_tensors(ClassifierZooConfig(**fields), zoo.tensors())


@dataclass(frozen=True)
class SmallCnnZooSource:
    """Which networks of the public Small CNN Zoo files to read: the checkpoints at ``step`` (86, the final one)
    and, unless ``None``, of ``activation``."""

    directory: str
    activation: str | None = "tanh"
    step: int = 86


class _SmallCnnFiles:
    """The public files of one Small CNN Zoo dataset, opened: the weights memory-mapped, the chosen rows' indices
    (``keep``), their metric rows and the tensor layout."""

    def __init__(self, source: SmallCnnZooSource) -> None:
        folder = Path(source.directory)
        missing = [f for f in ("weights.npy", "metrics.csv.gz", "layout.csv") if not (folder / f).exists()]
        if missing:
            raise FileNotFoundError(f"{folder} lacks {missing}: the Small CNN Zoo folder holds weights.npy, "
                                    "metrics.csv.gz and layout.csv (from the dataset's archive, e.g. cifar10.tar.xz)")
        self.weights = np.load(folder / "weights.npy", mmap_mode="r")
        with gzip.open(folder / "metrics.csv.gz", "rt") as f:
            self.rows = list(csv.DictReader(f))
        if len(self.rows) != len(self.weights):
            raise ValueError(f"{len(self.rows)} metric rows for {len(self.weights)} weight vectors in {folder}")
        self.keep = [i for i, r in enumerate(self.rows) if int(float(r["step"])) == source.step
                     and (source.activation is None or r["config.activation"] == source.activation)]
        if not self.keep:
            raise ValueError(f"no network in {folder} at step {source.step} with activation {source.activation!r}")
        with open(folder / "layout.csv") as f:
            self.layout = list(csv.DictReader(f))
        self.names = list(small_cnn_zoo_template("tanh").state_dict())
        if len(self.layout) != len(self.names):
            raise ValueError(f"layout.csv lists {len(self.layout)} tensors; the Small CNN Zoo network has "
                             f"{len(self.names)}")

    def networks(self, start: int, stop: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Chosen networks ``start .. stop - 1``: ``(params, metrics)``, read from the memory-mapped weights."""
        keep = self.keep[start:stop]
        flat = torch.as_tensor(np.asarray(self.weights[keep]), dtype=torch.float32)
        params = {}
        for name, row in zip(self.names, self.layout):
            shape = tuple(int(s) for s in row["shape"].strip("()[] ").replace(" ", "").split(",") if s)
            t = flat[:, int(row["start_idx"]):int(row["end_idx"])].reshape(len(keep), *shape)
            if t.dim() == 5:
                t = t.permute(0, 4, 3, 1, 2)
            elif t.dim() == 3:
                t = t.transpose(1, 2)
            params[name] = t.contiguous()
        numeric = {}
        for key in self.rows[0]:
            try:
                numeric[key] = torch.tensor([float(self.rows[i][key]) for i in keep])
            except ValueError:
                continue
        return params, numeric


def load_small_cnn_zoo(directory: str | os.PathLike, activation: str | None = "tanh", step: int = 86
                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The public Small CNN Zoo (Unterthiner et al. 2020) from ``directory``: ``weights.npy`` (``[M, 4970]``, one
    flat TensorFlow parameter vector per row), ``metrics.csv.gz`` (one row per network: ``step``,
    ``config.activation``, ``test_accuracy``, ...) and ``layout.csv`` (``varname, start_idx, end_idx, shape``).

    Returns ``(params, metrics)``: ``params`` in the layout of :func:`small_cnn_zoo_template`'s ``state_dict``
    (kernels moved from TensorFlow's ``[kh, kw, in, out]`` to ``[out, in, kh, kw]``, dense ``[in, out]`` to
    ``[out, in]``), only the checkpoints at ``step`` (86, the final one) and, unless ``None``, of ``activation``;
    ``metrics``: their numeric metric columns as float tensors.
    """
    files = _SmallCnnFiles(SmallCnnZooSource(str(directory), activation, step))
    return files.networks(0, len(files.keep))


def small_cnn_zoo_to_shards(source: SmallCnnZooSource, folder: str | os.PathLike, shard_size: int = 250,
                            rank: int | None = None, world: int | None = None, progress: bool = True) -> list[int]:
    """The chosen networks of the public Small CNN Zoo files as a sharded zoo folder (resumable, shared among
    ``torchrun``'s processes like :func:`make_sharded_classifier_zoo`), one shard's networks in memory at a time:
    ``params/<name>`` in the layout of :func:`small_cnn_zoo_template`, ``accuracy`` (the published test
    accuracy) and every numeric metric column as ``metrics/<column>``. Train on it with
    ``ShardedZoo(folder).weights(spec)`` and ``ShardedZoo(folder).column("accuracy")``."""
    files = _SmallCnnFiles(source)

    def shard(start: int, stop: int) -> dict[str, torch.Tensor]:
        params, metrics = files.networks(start, stop)
        return {f"params/{k}": v for k, v in params.items()} | {f"metrics/{k}": v for k, v in metrics.items()} | {
            "accuracy": metrics["test_accuracy"].float().clone()}

    return make_sharded_zoo(folder, "small_cnn_zoo", source, len(files.keep), shard_size, shard,
                            lambda: {"networks": torch.tensor(len(files.keep))}, rank, world, progress=progress)
