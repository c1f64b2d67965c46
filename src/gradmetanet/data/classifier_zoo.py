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

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from tqdm.auto import tqdm

from ..zoos.cache import cached_zoo
from ..basenets import ACTIVATIONS, make_mlp
from .classification import mnist1d_arrays
from .inr_zoo import digits_images

__all__ = ["ClassifierZooConfig", "ClassifierZoo", "small_cnn_zoo_template", "zoo_template", "zoo_images",
           "batched_logits", "heavy_ball_step", "load_or_generate_classifier_zoo", "generate_classifier_zoo", "ARCHITECTURES",
           "DATASETS", "load_small_cnn_zoo"]

ARCHITECTURES = ("cnn", "mlp")
DATASETS = ("digits", "mnist1d")
ZOO_ACTIVATIONS = ("tanh", "relu")      # what the zoos' networks are trained with (names of basenets.ACTIVATIONS)


def small_cnn_zoo_template(activation: str = "tanh", channels: int = 16, classes: int = 10) -> nn.Sequential:
    """The Small CNN Zoo network (layout ``[1, 16, 16, 16, 10]``, 4,970 parameters): three 3 x 3 stride-2
    convolutions without padding, global average pooling, a dense layer. Input ``[B, 1, H, W]``."""
    act = ACTIVATIONS[activation]
    return nn.Sequential(nn.Conv2d(1, channels, 3, 2), act(), nn.Conv2d(channels, channels, 3, 2), act(),
                         nn.Conv2d(channels, channels, 3, 2), act(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(channels, classes))


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


def heavy_ball_step(params: dict[str, torch.Tensor], grads: list[torch.Tensor], velocity: dict[str, torch.Tensor],
                    lr: torch.Tensor | float, momentum: float = 0.9) -> dict[str, torch.Tensor]:
    """One SGD step with heavy-ball momentum (``torch.optim.SGD``'s rule) of networks ``{name: [N, *shape]}``;
    ``lr`` a number or one per network ``[N]`` (0 freezes a network). ``velocity`` is updated in place."""
    out = {}
    with torch.no_grad():
        for (k, v), g in zip(params.items(), grads):
            velocity[k] = momentum * velocity[k] + g
            step = lr.view(-1, *[1] * (v.dim() - 1)) if isinstance(lr, torch.Tensor) else lr
            out[k] = v - step * velocity[k]
    return out


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


def _initial_params(template: nn.Module, n: int, seed: int) -> dict[str, torch.Tensor]:
    """``{name: [n, *shape]}``: PyTorch's default initialisation of ``n`` networks, network ``i`` from seed
    ``seed * 1_000_003 + i`` (so a network is the same whatever the size of the zoo)."""
    states = []
    for i in range(n):
        torch.manual_seed(seed * 1_000_003 + i)
        for module in template.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        states.append({k: v.detach().clone() for k, v in template.named_parameters()})
    return {k: torch.stack([s[k] for s in states]) for k in states[0]}


def _accuracy(template: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
              chunk: int = 500) -> torch.Tensor:
    """``[N]``: each network's accuracy on ``(x, y)``."""
    with torch.no_grad():
        hits = [(batched_logits(template, params, x[i:i + chunk]).argmax(-1) == y[i:i + chunk]).float().sum(1)
                for i in range(0, len(x), chunk)]
    return torch.stack(hits).sum(0) / len(x)


def generate_classifier_zoo(config: ClassifierZooConfig, chunk: int = 250, progress: bool = True) -> ClassifierZoo:
    """Train ``config.networks`` networks, ``chunk`` at a time, each with its own drawn recipe (see the module)."""
    x, y = zoo_images(config.dataset, config.architecture)
    gen = torch.Generator().manual_seed(config.seed)
    images = _split(len(x), config.image_split, gen)
    networks = _split(config.networks, config.network_split, gen)
    n = config.networks
    lo, hi = config.steps
    steps = torch.randint(lo, hi + 1, (n,), generator=gen)
    lr = torch.exp(math.log(config.lr[0]) + torch.rand(n, generator=gen) * math.log(config.lr[1] / config.lr[0]))
    subset = config.subset[0] + torch.rand(n, generator=gen) * (config.subset[1] - config.subset[0])
    train = images["train"]
    template = zoo_template(config)
    params = {}
    bar = tqdm(total=n, desc=f"training the {config.name} zoo", disable=not progress)
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        p = _initial_params(template, sl.stop - sl.start, config.seed * 7919 + start)
        m = len(p[next(iter(p))])
        # each network's own training images: a random subset of the image training split
        sizes = (subset[sl] * len(train)).long().clamp_min(config.batch_size)
        ranks = torch.rand(m, len(train), generator=gen).argsort(1)
        own = (ranks < sizes.unsqueeze(1)).float()                     # [m, n_train] membership
        velocity = {k: torch.zeros_like(v) for k, v in p.items()}
        for step in range(int(steps[sl].max())):
            idx = train[torch.multinomial(own, config.batch_size, replacement=True, generator=gen)]   # [m, B]
            p = {k: v.requires_grad_() for k, v in p.items()}
            logits = batched_logits(template, p, x[idx], shared=False)
            loss = F.cross_entropy(logits.flatten(0, 1), y[idx].flatten(), reduction="sum") / config.batch_size
            grads = torch.autograd.grad(loss, list(p.values()))
            p = heavy_ball_step(p, grads, velocity, (step < steps[sl]).float() * lr[sl])
        for k, v in p.items():
            params.setdefault(k, []).append(v.detach())
        bar.update(m)
    bar.close()
    params = {k: torch.cat(v) for k, v in params.items()}
    accuracy = _accuracy(template, params, x[images["test"]], y[images["test"]])
    return ClassifierZoo(config, params, accuracy, lr, steps, subset, images, networks)


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
                      ClassifierZoo.tensors, lambda t: ClassifierZoo.from_tensors(config, t), cache_dir, summary)


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
    import csv
    import gzip

    import numpy as np

    folder = Path(directory)
    missing = [f for f in ("weights.npy", "metrics.csv.gz", "layout.csv") if not (folder / f).exists()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {missing}: the Small CNN Zoo folder holds weights.npy, "
                                "metrics.csv.gz and layout.csv (from the dataset's archive, e.g. cifar10.tar.xz)")
    weights = np.load(folder / "weights.npy", mmap_mode="r")
    with gzip.open(folder / "metrics.csv.gz", "rt") as f:
        rows = list(csv.DictReader(f))
    if len(rows) != len(weights):
        raise ValueError(f"{len(rows)} metric rows for {len(weights)} weight vectors in {folder}")
    keep = [i for i, r in enumerate(rows) if int(float(r["step"])) == step
            and (activation is None or r["config.activation"] == activation)]
    if not keep:
        raise ValueError(f"no network in {folder} at step {step} with activation {activation!r}")
    flat = torch.as_tensor(np.asarray(weights[keep]), dtype=torch.float32)
    with open(folder / "layout.csv") as f:
        layout = list(csv.DictReader(f))
    names = list(small_cnn_zoo_template("tanh").state_dict())
    if len(layout) != len(names):
        raise ValueError(f"layout.csv lists {len(layout)} tensors; the Small CNN Zoo network has {len(names)}")
    params = {}
    for name, row in zip(names, layout):
        shape = tuple(int(s) for s in row["shape"].strip("()[] ").replace(" ", "").split(",") if s)
        t = flat[:, int(row["start_idx"]):int(row["end_idx"])].reshape(len(keep), *shape)
        if t.dim() == 5:
            t = t.permute(0, 4, 3, 1, 2)
        elif t.dim() == 3:
            t = t.transpose(1, 2)
        params[name] = t.contiguous()
    numeric = {}
    for key in rows[0]:
        try:
            numeric[key] = torch.tensor([float(rows[i][key]) for i in keep])
        except ValueError:
            continue
    return params, numeric
