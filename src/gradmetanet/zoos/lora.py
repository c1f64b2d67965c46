"""A zoo of LoRA fine-tunes of one digits classifier, made here, with labels to learn from the adapters.

The base network is an MLP ``64 -> 32 -> 32 -> 10`` (ReLU) trained on the digits of a few classes
(``base_classes``). Each fine-tune adapts all three linear layers with rank-``r`` LoRA factors
(PEFT's initialisation: ``A`` uniform in ``±1/sqrt(in)``, ``B`` zero; scaling 1) and trains them
with Adam on its own data: a random subset of the ten classes, a random number of training
examples drawn from them, a random learning rate and a random number of steps. Labels:

- ``membership [M, 10]``: which classes were in the fine-tuning data (the analogue of the paper's
  data-membership task);
- ``accuracy [M]``: the fine-tuned network's accuracy on the whole digits test split;
- ``data_size [M]``: the number of fine-tuning examples.

Fine-tunes are trained many at once (``vmap`` over a chunk, a masked functional Adam so that each
stops at its own step count) and the zoo is cached on disk per configuration.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from .cache import cached_zoo
from .shards import complete_sharded_zoo, make_sharded_zoo
from .optim import adam_step
from ..models.mlp import make_mlp
from ..lora.sets import LoraBatch, LoraLayer, LoraSet
from ..data.digits import load_digits_split

__all__ = ["LoraZooConfig", "AdapterZoo", "LoraZoo", "cached_adapter_zoo", "draw_finetune_tasks", "finetune_loras",
           "generate_lora_zoo", "initial_loras", "load_or_generate_lora_zoo", "own_finetunes", "load_sharded_lora_zoo",
           "make_sharded_lora_zoo"]

SITES = ("0", "2", "4")


@dataclass(frozen=True)
class LoraZooConfig:
    """What defines a zoo; any change gives another cache file."""

    n_loras: int = 2000
    rank: int = 4
    base_classes: tuple[int, ...] = (0, 1, 2, 3, 4)
    base_steps: int = 600
    classes_per_finetune: tuple[int, int] = (2, 6)      # inclusive range
    data_sizes: tuple[int, int] = (32, 512)
    learning_rates: tuple[float, float] = (1e-3, 3e-2)  # log-uniform
    steps: tuple[int, int] = (30, 300)
    batch_size: int = 32
    split_seed: int = 0
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class AdapterZoo:
    """LoRA fine-tunes of one base network: factors per site (``A[site]: [M, r, in]``, ``B[site]: [M, out, r]``,
    scaling 1, PEFT's ``alpha = r``), the classes (or text sections) in each fine-tune's data, its data size."""

    config: object
    sites: tuple[str, ...]
    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    membership: torch.Tensor
    data_size: torch.Tensor
    base: dict[str, torch.Tensor]

    #: the zoo's scalar quality label (a field of the subclass): ``"accuracy"`` or ``"loss"``
    quality = "accuracy"

    def __len__(self) -> int:
        return self.membership.shape[0]

    @property
    def targets(self) -> tuple[str, ...]:
        return ("membership", self.quality, "data_size")

    def target(self, name: str) -> torch.Tensor:
        """``[M, K]``: the membership bits, the quality label, or the log data size of every fine-tune."""
        if name == "membership":
            return self.membership
        if name == "data_size":
            return self.data_size.log().unsqueeze(1)
        if name == self.quality:
            return getattr(self, name).unsqueeze(1)
        raise ValueError(f"this zoo has targets {list(self.targets)}, not {name!r}")

    def batch(self, index: torch.Tensor | slice) -> LoraBatch:
        """The fine-tunes ``index`` as a :class:`LoraBatch` (scaling 1: PEFT's ``alpha = r``)."""
        A = {p: self.A[p][index] for p in self.sites}
        n = next(iter(A.values())).shape[0]
        return LoraBatch(self.sites, A, {p: self.B[p][index] for p in self.sites}, {p: torch.ones(n) for p in self.sites})

    def lora_set(self, i: int) -> LoraSet:
        """Fine-tune ``i`` as a :class:`LoraSet` (what ``to_peft`` writes)."""
        return LoraSet(tuple(LoraLayer(p, self.A[p][i], self.B[p][i], 1.0) for p in self.sites))

    @property
    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        return {p: (self.B[p].shape[1], self.A[p].shape[2]) for p in self.sites}

    def merged(self, dws: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
        """The base ``state_dict`` with fine-tune ``i``'s ``dW`` (``dws[site]: [M, out, in]``) added."""
        state = dict(self.base)
        for site in self.sites:
            state[f"{site}.weight"] = self.base[f"{site}.weight"] + dws[site][i]
        return state

    def tensors(self) -> dict[str, torch.Tensor]:
        """What the cache file holds: factors, base weights, labels (the quality and the base's)."""
        tensors = {f"A/{s}": self.A[s].contiguous() for s in self.sites}
        tensors |= {f"B/{s}": self.B[s].contiguous() for s in self.sites}
        tensors |= {f"base/{k}": v.contiguous() for k, v in self.base.items()}
        q = self.quality
        return tensors | {"membership": self.membership, "data_size": self.data_size, q: getattr(self, q),
                          f"base_{q}": torch.tensor(getattr(self, f"base_{q}"))}

    @classmethod
    def from_tensors(cls, config, t: dict[str, torch.Tensor], sites: tuple[str, ...]) -> "AdapterZoo":
        """Inverse of :meth:`tensors`."""
        q = cls.quality
        return cls(config, sites, {s: t[f"A/{s}"] for s in sites}, {s: t[f"B/{s}"] for s in sites},
                   t["membership"], t["data_size"], {k[len("base/"):]: v for k, v in t.items() if k.startswith("base/")},
                   **{q: t[q], f"base_{q}": float(t[f"base_{q}"])})


def cached_adapter_zoo(cls: type[AdapterZoo], config, sites: tuple[str, ...], name: str,
                       generate: Callable[[], AdapterZoo], cache_dir: str | os.PathLike | None,
                       depends: dict[str, str] | None = None) -> AdapterZoo:
    """An adapter zoo through the one verified zoo cache (:func:`~gradmetanet.zoos.cached_zoo`)."""
    return cached_zoo(name, config, generate, cls.tensors, lambda t: cls.from_tensors(config, t, sites), cache_dir,
                      lambda zoo: {"adapters": len(zoo.data_size), "sites": list(sites)}, depends)


@dataclass
class LoraZoo(AdapterZoo):
    """The digits zoo: ``accuracy [M]`` of each fine-tuned network on the test split, and the base's."""

    accuracy: torch.Tensor = None
    base_accuracy: float = 0.0

    def evaluate(self, state: dict[str, torch.Tensor], net: torch.nn.Module, data: tuple) -> float:
        """The test accuracy of ``net`` under ``state`` (what a prediction from the adapter replaces)."""
        net.load_state_dict(state)
        x_test, y_test = data
        return (net(x_test).argmax(1) == y_test).float().mean().item()

    def evaluation_data(self) -> tuple[torch.nn.Module, tuple]:
        _, _, x_test, y_test = load_digits_split(seed=self.config.split_seed)
        return make_mlp([64, 32, 32, 10], "relu"), (x_test, y_test)


def _train_base(config: LoraZooConfig, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.nn.Module:
    model = make_mlp([64, 32, 32, 10], "relu")
    with torch.no_grad():
        for p in model.parameters():
            bound = 1 / math.sqrt(p.shape[-1])
            p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
    keep = torch.isin(y, torch.tensor(config.base_classes))
    xb, yb = x[keep], y[keep]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(config.base_steps):
        idx = torch.randint(len(xb), (config.batch_size,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(xb[idx]), yb[idx]).backward()
        opt.step()
    return model


def draw_finetune_tasks(m: int, groups: int, per_finetune: tuple[int, int], pool_of: Callable[[torch.Tensor], torch.Tensor],
                        data_sizes: tuple[int, int], learning_rates: tuple[float, float], steps: tuple[int, int],
                        gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Per fine-tune: which of ``groups`` groups (classes, text sections) its data comes from (``per_finetune``
    of them, an inclusive range), its training indices into ``pool_of(chosen groups)`` (a random subset of
    ``data_sizes`` entries, padded), a log-uniform learning rate and a number of steps."""
    lo, hi = per_finetune
    masks, indices, sizes = [], [], []
    for _ in range(m):
        k = int(torch.randint(lo, hi + 1, (), generator=gen))
        chosen = torch.randperm(groups, generator=gen)[:k]
        pool = pool_of(chosen)
        n = min(int(torch.randint(data_sizes[0], data_sizes[1] + 1, (), generator=gen)), len(pool))
        indices.append(pool[torch.randperm(len(pool), generator=gen)[:n]])
        masks.append(torch.zeros(groups).index_fill_(0, chosen, 1.0))
        sizes.append(n)
    width = max(sizes)
    padded = torch.stack([torch.cat([i, i.new_zeros(width - len(i))]) for i in indices])
    log_lr = torch.empty(m).uniform_(math.log(learning_rates[0]), math.log(learning_rates[1]), generator=gen)
    counts = torch.randint(steps[0], steps[1] + 1, (m,), generator=gen)
    return {"membership": torch.stack(masks), "indices": padded, "size": torch.tensor(sizes), "lr": log_lr.exp(),
            "steps": counts}


def initial_loras(base: torch.nn.Module, sites: tuple[str, ...], rank: int, m: int, gen: torch.Generator
                  ) -> dict[str, torch.Tensor]:
    """``{"<site>.A": [m, r, in], "<site>.B": [m, out, r]}`` as PEFT initialises them: ``A`` uniform in
    ``±1/sqrt(in)``, ``B`` zero."""
    params = {}
    for site in sites:
        out, inp = dict(base.named_parameters())[f"{site}.weight"].shape
        params[f"{site}.A"] = (torch.rand(m, rank, inp, generator=gen) * 2 - 1) / math.sqrt(inp)
        params[f"{site}.B"] = torch.zeros(m, out, rank)
    return params


def finetune_loras(base: torch.nn.Module, sites: tuple[str, ...], rank: int, tasks: dict[str, torch.Tensor],
                   sample: Callable[[torch.Generator], tuple[torch.Tensor, ...]],
                   loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], gen: torch.Generator | None,
                   init: dict[str, torch.Tensor] | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Train the LoRA factors of ``M`` fine-tunes together (``vmap``; masked Adam: each stops at its own step).

    ``tasks`` holds per fine-tune ``lr [M]`` and ``steps [M]``; ``sample(gen)`` draws one batch per fine-tune
    (inputs ``[M, ...]`` then targets ``[M, ...]``); ``loss_of(outputs, targets)`` is the training loss.
    Initialisation: ``init`` or :func:`initial_loras` drawn from ``gen``.
    """
    m = tasks["lr"].shape[0]
    weights = {k: v.detach() for k, v in base.named_parameters()}
    params = initial_loras(base, sites, rank, m, gen) if init is None else init

    def loss(p: dict[str, torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        merged = dict(weights)
        for site in sites:
            merged[f"{site}.weight"] = weights[f"{site}.weight"] + p[f"{site}.B"] @ p[f"{site}.A"]
        return loss_of(functional_call(base, merged, (inputs,)), targets)

    gradient = vmap(grad(loss))
    moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for step in range(int(tasks["steps"].max())):
        active = (step < tasks["steps"]).float()
        params = adam_step(params, gradient(params, *sample(gen)), moments, step + 1, tasks["lr"] * active)
    return ({s: params[f"{s}.A"] for s in sites}, {s: params[f"{s}.B"] for s in sites})


def _accuracy(base: torch.nn.Module, A: dict[str, torch.Tensor], B: dict[str, torch.Tensor], x: torch.Tensor,
              y: torch.Tensor) -> torch.Tensor:
    weights = {k: v.detach() for k, v in base.named_parameters()}

    def one(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
        merged = dict(weights)
        for site in SITES:
            merged[f"{site}.weight"] = weights[f"{site}.weight"] + b[site] @ a[site]
        return (functional_call(base, merged, (x,)).argmax(1) == y).float().mean()

    with torch.no_grad():
        return vmap(one)(A, B)


def generate_lora_zoo(config: LoraZooConfig, chunk: int = 250, progress: bool = True) -> LoraZoo:
    """Train the base network, then ``n_loras`` fine-tunes, ``chunk`` at a time, every draw from one stream seeded by
    ``config.seed`` (the cached zoo of ``run lora``; a sharded zoo draws each fine-tune from its own seed, see
    :func:`make_sharded_lora_zoo`)."""
    gen = torch.Generator().manual_seed(config.seed)
    x, y, x_test, y_test = load_digits_split(seed=config.split_seed)
    base = _train_base(config, x, y, gen)
    with torch.no_grad():
        base_accuracy = (base(x_test).argmax(1) == y_test).float().mean().item()
    As, Bs, labels = {s: [] for s in SITES}, {s: [] for s in SITES}, {"membership": [], "accuracy": [], "size": []}
    for start in tqdm(range(0, config.n_loras, chunk), desc="LoRA zoo", unit="chunk", disable=not progress):
        m = min(chunk, config.n_loras - start)
        tasks = draw_finetune_tasks(m, 10, config.classes_per_finetune,
                                    lambda classes: torch.nonzero(torch.isin(y, classes)).squeeze(1),
                                    config.data_sizes, config.learning_rates, config.steps, gen)

        def sample(g: torch.Generator, tasks=tasks) -> tuple[torch.Tensor, torch.Tensor]:
            pos = (torch.rand(len(tasks["size"]), config.batch_size, generator=g) * tasks["size"][:, None]).long()
            idx = tasks["indices"].gather(1, pos)
            return x[idx], y[idx]

        A, B = finetune_loras(base, SITES, config.rank, tasks, sample, F.cross_entropy, gen)
        labels["accuracy"].append(_accuracy(base, A, B, x_test, y_test))
        labels["membership"].append(tasks["membership"])
        labels["size"].append(tasks["size"])
        for s in SITES:
            As[s].append(A[s].detach())
            Bs[s].append(B[s].detach())
    return LoraZoo(config, SITES, {s: torch.cat(v) for s, v in As.items()}, {s: torch.cat(v) for s, v in Bs.items()},
                   torch.cat(labels["membership"]), torch.cat(labels["size"]).float(),
                   {k: v.detach() for k, v in base.state_dict().items()},
                   accuracy=torch.cat(labels["accuracy"]), base_accuracy=base_accuracy)


def load_or_generate_lora_zoo(config: LoraZooConfig, cache_dir: str | os.PathLike | None,
                              progress: bool = True) -> LoraZoo:
    """The zoo of ``config`` from ``cache_dir`` when a file for exactly this config is there, else generated
    (and written atomically)."""
    return cached_adapter_zoo(LoraZoo, config, SITES, "lora_zoo", lambda: generate_lora_zoo(config, progress=progress),
                              cache_dir)


def own_finetunes(base: torch.nn.Module, sites: tuple[str, ...], rank: int, seed: int, start: int, stop: int,
                  draw_task: Callable[[torch.Generator], dict[str, torch.Tensor]], batch_size: int,
                  batch_of: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                  loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Fine-tunes ``start .. stop - 1`` trained together, each from its own generator ``(seed, index)``: its task
    (``draw_task(gen)``, one row of :func:`draw_finetune_tasks`), its initialisation and every batch it draws
    (``batch_of(indices [m, batch_size])``: inputs and targets). ``(A, B, tasks)``, the same for any chunk, shard
    or process."""
    gens = [torch.Generator().manual_seed(seed * 1_000_003 + 1 + i) for i in range(start, stop)]
    own = [draw_task(g) for g in gens]
    width = max(int(t["indices"].shape[1]) for t in own)
    tasks = {k: torch.cat([t[k] for t in own]) for k in own[0] if k != "indices"}
    tasks["indices"] = torch.cat([torch.cat([t["indices"], t["indices"].new_zeros(1, width - t["indices"].shape[1])], 1)
                                  for t in own])
    inits = [initial_loras(base, sites, rank, 1, g) for g in gens]

    def sample(_: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        u = torch.cat([torch.rand(1, batch_size, generator=g) for g in gens])
        return batch_of(tasks["indices"].gather(1, (u * tasks["size"][:, None]).long()))

    A, B = finetune_loras(base, sites, rank, tasks, sample, loss_of, None,
                          init={k: torch.cat([i[k] for i in inits]) for k in inits[0]})
    return A, B, tasks


def make_sharded_lora_zoo(config: LoraZooConfig, folder: str | os.PathLike, shard_size: int = 250,
                          rank: int | None = None, world: int | None = None, progress: bool = True) -> list[int]:
    """Make (or finish) the zoo of ``config`` as a sharded folder (:func:`~gradmetanet.zoos.make_sharded_zoo`), this
    process's share of the shards under ``torchrun``: the base network (trained from ``config.seed``, the cached
    zoo's base) in the common tensors, and per fine-tune ``A/<site>``, ``B/<site>``, ``membership``, ``data_size``
    and ``accuracy``. Each fine-tune is drawn from its own seed, so the zoo is the same for any number of
    processes and shards (and is not the cached zoo's fine-tunes, which come from one stream)."""
    x, y, x_test, y_test = load_digits_split(seed=config.split_seed)
    base = _train_base(config, x, y, torch.Generator().manual_seed(config.seed))
    with torch.no_grad():
        base_accuracy = (base(x_test).argmax(1) == y_test).float().mean()

    def draw_task(g: torch.Generator) -> dict[str, torch.Tensor]:
        return draw_finetune_tasks(1, 10, config.classes_per_finetune,
                                   lambda classes: torch.nonzero(torch.isin(y, classes)).squeeze(1),
                                   config.data_sizes, config.learning_rates, config.steps, g)

    def shard(start: int, stop: int) -> dict[str, torch.Tensor]:
        A, B, tasks = own_finetunes(base, SITES, config.rank, config.seed, start, stop, draw_task, config.batch_size,
                                    lambda idx: (x[idx], y[idx]), F.cross_entropy)
        return {f"A/{s}": A[s].detach() for s in SITES} | {f"B/{s}": B[s].detach() for s in SITES} | {
            "membership": tasks["membership"], "data_size": tasks["size"].float(),
            "accuracy": _accuracy(base, A, B, x_test, y_test)}

    def common() -> dict[str, torch.Tensor]:
        return {f"base/{k}": v.detach().clone() for k, v in base.state_dict().items()} | {
            "base_accuracy": base_accuracy}

    return make_sharded_zoo(folder, "lora_zoo", config, config.n_loras, shard_size, shard, common, rank, world,
                            depends={"draws": "per-index seeds"}, progress=progress)


def load_sharded_lora_zoo(folder: str | os.PathLike) -> LoraZoo:
    """The LoRA zoo of a sharded folder made by :func:`make_sharded_lora_zoo`, every shard verified."""
    zoo, fields = complete_sharded_zoo(folder, "lora_zoo", "gradmetanet zoo make lora")
    return LoraZoo.from_tensors(LoraZooConfig(**fields), zoo.tensors(), SITES)
