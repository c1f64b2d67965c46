"""A zoo of LoRA fine-tunes of one small language model, made here from the built-in corpus.

The base network is :class:`~gradmetanet.models.CausalTransformer` (character level, ``d = 32``, 4
heads, 2 blocks, attention written with ``nn.Linear`` so that every projection is a LoRA site)
trained on the English text of CPython's ``pydoc_data.topics``. The 79 topics, sorted by name, are
cut into ``sections`` contiguous groups; each group's text keeps its last 10% as held-out text.
Each fine-tune adapts the query and value projections of both blocks with rank-``r`` factors
(PEFT's initialisation, scaling 1) and trains them with Adam on windows of its own data: a random
subset of the sections, a random number of window starts drawn from their training text, a
random learning rate and number of steps. Labels:

- ``membership [M, sections]``: which sections the fine-tuning text came from;
- ``loss [M]``: the fine-tuned model's mean next-token cross-entropy on fixed held-out windows of
  every section (nats);
- ``data_size [M]``: the number of window starts (characters) it was trained on.

Fine-tunes train many at once (:func:`~gradmetanet.zoos.lora.finetune_loras`); the zoo is cached
on disk per configuration, with the corpus version in its metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap
from tqdm.auto import tqdm

from ..models import CausalTransformer
from .lora import AdapterZoo, cached_adapter_zoo, draw_finetune_tasks, finetune_loras, own_finetunes
from .shards import complete_sharded_zoo, make_sharded_zoo
from ..data.text import CharTokenizer, corpus_version, pydoc_topics_text

__all__ = ["LmLoraZooConfig", "LmLoraZoo", "generate_lm_lora_zoo", "load_or_generate_lm_lora_zoo",
           "load_sharded_lm_lora_zoo", "make_sharded_lm_lora_zoo", "LM_SITES"]

LM_SITES = ("blocks.0.attn.q", "blocks.0.attn.v", "blocks.1.attn.q", "blocks.1.attn.v")


@dataclass(frozen=True)
class LmLoraZooConfig:
    """What defines a zoo; any change gives another cache file."""

    n_loras: int = 1000
    rank: int = 4
    sections: int = 8
    d: int = 32
    seq_len: int = 16
    base_steps: int = 1500
    sections_per_finetune: tuple[int, int] = (1, 3)     # inclusive range
    data_sizes: tuple[int, int] = (256, 8192)            # window starts
    learning_rates: tuple[float, float] = (1e-3, 3e-2)  # log-uniform
    steps: tuple[int, int] = (30, 300)
    batch_size: int = 16
    eval_windows: int = 256
    seed: int = 0

    def key(self) -> str:
        """The cache key: this configuration and the corpus (its text changes between Python versions)."""
        text = json.dumps({**asdict(self), "corpus": corpus_version()}, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:16]


@dataclass
class LmLoraZoo(AdapterZoo):
    """The language-model zoo: ``loss [M]`` on the held-out windows, and the base model's."""

    quality = "loss"
    loss: torch.Tensor = None
    base_loss: float = 0.0

    def evaluation_data(self) -> tuple[torch.nn.Module, tuple]:
        corpus = Corpus(self.config)
        return corpus.model(), corpus.held_out

    def evaluate(self, state: dict[str, torch.Tensor], net: torch.nn.Module, data: tuple) -> float:
        """The held-out loss of ``net`` under ``state`` (what a prediction from the adapter replaces)."""
        net.load_state_dict(state)
        x, y = data
        return F.cross_entropy(net(x).flatten(0, 1), y.flatten()).item()


class Corpus:
    """The sections' token ids (training and held-out parts) and the fixed held-out windows."""

    def __init__(self, config: LmLoraZooConfig) -> None:
        import pydoc_data.topics

        self.config = config
        self.tokenizer = CharTokenizer.fit(pydoc_topics_text())
        names = sorted(pydoc_data.topics.topics)
        groups = [names[len(names) * k // config.sections: len(names) * (k + 1) // config.sections]
                  for k in range(config.sections)]
        texts = ["\n".join(pydoc_data.topics.topics[n] for n in group) for group in groups]
        ids = [self.tokenizer.encode(t) for t in texts]
        cut = [int(0.9 * len(t)) for t in ids]
        self.train = [t[:c] for t, c in zip(ids, cut)]
        self.starts = [len(t) - config.seq_len - 1 for t in self.train]           # window starts per section
        self.all_train = torch.cat(self.train)
        self.offsets = torch.tensor([0] + [len(t) for t in self.train]).cumsum(0)[:-1]
        held = [t[c:] for t, c in zip(ids, cut)]
        gen = torch.Generator().manual_seed(12345)
        per = max(1, config.eval_windows // config.sections)
        windows = []
        for t in held:
            starts = torch.randint(len(t) - config.seq_len, (per,), generator=gen)
            windows.append(t[starts[:, None] + torch.arange(config.seq_len + 1)])
        w = torch.cat(windows)
        self.held_out = (w[:, :-1], w[:, 1:])

    def model(self) -> CausalTransformer:
        return CausalTransformer(self.tokenizer.vocab_size, d=self.config.d, heads=4, blocks=2,
                                 max_len=self.config.seq_len, attention="linear")

    def windows(self, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next tokens ``[..., T]`` of windows at global ``starts`` of the training text."""
        w = self.all_train[starts.unsqueeze(-1) + torch.arange(self.config.seq_len + 1)]
        return w[..., :-1], w[..., 1:]


def _lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten())


def _train_base(corpus: Corpus, config: LmLoraZooConfig, gen: torch.Generator) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (), generator=gen)))
        model = corpus.model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    pool = torch.cat([off + torch.arange(n) for off, n in zip(corpus.offsets.tolist(), corpus.starts)])
    for _ in range(config.base_steps):
        x, y = corpus.windows(pool[torch.randint(len(pool), (config.batch_size,), generator=gen)])
        opt.zero_grad()
        _lm_loss(model(x), y).backward()
        opt.step()
    return model


def _held_out_loss(base: torch.nn.Module, A: dict, B: dict, corpus: Corpus) -> torch.Tensor:
    weights = {k: v.detach() for k, v in base.named_parameters()}
    x, y = corpus.held_out

    def one(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
        merged = dict(weights)
        for site in LM_SITES:
            merged[f"{site}.weight"] = weights[f"{site}.weight"] + b[site] @ a[site]
        return _lm_loss(functional_call(base, merged, (x,)), y)

    with torch.no_grad():
        return vmap(one)(A, B)


def generate_lm_lora_zoo(config: LmLoraZooConfig, chunk: int = 200, progress: bool = True) -> LmLoraZoo:
    """Train the base language model, then ``n_loras`` fine-tunes, ``chunk`` at a time."""
    gen = torch.Generator().manual_seed(config.seed)
    corpus = Corpus(config)
    base = _train_base(corpus, config, gen)
    with torch.no_grad():
        base_loss = _lm_loss(base(corpus.held_out[0]), corpus.held_out[1]).item()
    As, Bs = {s: [] for s in LM_SITES}, {s: [] for s in LM_SITES}
    labels: dict[str, list] = {"membership": [], "loss": [], "size": []}
    for start in tqdm(range(0, config.n_loras, chunk), desc="LM LoRA zoo", unit="chunk", disable=not progress):
        m = min(chunk, config.n_loras - start)
        tasks = draw_finetune_tasks(
            m, config.sections, config.sections_per_finetune,
            lambda chosen: torch.cat([corpus.offsets[s] + torch.arange(corpus.starts[s]) for s in chosen.tolist()]),
            config.data_sizes, config.learning_rates, config.steps, gen)

        def sample(g: torch.Generator, tasks=tasks) -> tuple[torch.Tensor, torch.Tensor]:
            pos = (torch.rand(len(tasks["size"]), config.batch_size, generator=g) * tasks["size"][:, None]).long()
            return corpus.windows(tasks["indices"].gather(1, pos))

        A, B = finetune_loras(base, LM_SITES, config.rank, tasks, sample, _lm_loss, gen)
        labels["loss"].append(_held_out_loss(base, A, B, corpus))
        labels["membership"].append(tasks["membership"])
        labels["size"].append(tasks["size"])
        for s in LM_SITES:
            As[s].append(A[s].detach())
            Bs[s].append(B[s].detach())
    return LmLoraZoo(config, LM_SITES, {s: torch.cat(v) for s, v in As.items()},
                     {s: torch.cat(v) for s, v in Bs.items()}, torch.cat(labels["membership"]),
                     torch.cat(labels["size"]).float(), {k: v.detach() for k, v in base.state_dict().items()},
                     loss=torch.cat(labels["loss"]), base_loss=base_loss)


def load_or_generate_lm_lora_zoo(config: LmLoraZooConfig, cache_dir: str | os.PathLike | None,
                                 progress: bool = True) -> LmLoraZoo:
    """The zoo of ``config`` from ``cache_dir`` when a file for exactly this config (and corpus) is there, else
    generated (and written atomically)."""
    return cached_adapter_zoo(LmLoraZoo, config, LM_SITES, "lm_lora_zoo",
                              lambda: generate_lm_lora_zoo(config, progress=progress), cache_dir,
                              {"corpus": corpus_version()})


def make_sharded_lm_lora_zoo(config: LmLoraZooConfig, folder: str | os.PathLike, shard_size: int = 200,
                             rank: int | None = None, world: int | None = None, progress: bool = True) -> list[int]:
    """Make (or finish) the zoo of ``config`` as a sharded folder, this process's share under ``torchrun``: the base
    model once (from ``config.seed``, the cached zoo's base; common tensors) and each fine-tune from its own seed
    (:func:`~gradmetanet.zoos.lora.own_finetunes`): the same zoo for any number of processes and shards."""
    corpus = Corpus(config)
    base = _train_base(corpus, config, torch.Generator().manual_seed(config.seed))
    with torch.no_grad():
        base_loss = _lm_loss(base(corpus.held_out[0]), corpus.held_out[1])

    def draw_task(g: torch.Generator) -> dict[str, torch.Tensor]:
        return draw_finetune_tasks(
            1, config.sections, config.sections_per_finetune,
            lambda chosen: torch.cat([corpus.offsets[s] + torch.arange(corpus.starts[s]) for s in chosen.tolist()]),
            config.data_sizes, config.learning_rates, config.steps, g)

    def shard(start: int, stop: int) -> dict[str, torch.Tensor]:
        A, B, tasks = own_finetunes(base, LM_SITES, config.rank, config.seed, start, stop, draw_task,
                                    config.batch_size, corpus.windows, _lm_loss)
        return {f"A/{s}": A[s].detach() for s in LM_SITES} | {f"B/{s}": B[s].detach() for s in LM_SITES} | {
            "membership": tasks["membership"], "data_size": tasks["size"].float(),
            "loss": _held_out_loss(base, A, B, corpus)}

    def common() -> dict[str, torch.Tensor]:
        return {f"base/{k}": v.detach().clone() for k, v in base.state_dict().items()} | {"base_loss": base_loss}

    return make_sharded_zoo(folder, "lm_lora_zoo", config, config.n_loras, shard_size, shard, common, rank, world,
                            depends={"draws": "per-index seeds", "corpus": corpus_version()}, progress=progress)


def load_sharded_lm_lora_zoo(folder: str | os.PathLike) -> LmLoraZoo:
    """The language-model LoRA zoo of a sharded folder made by :func:`make_sharded_lm_lora_zoo`, every shard
    verified."""
    zoo, fields = complete_sharded_zoo(folder, "lm_lora_zoo", "gradmetanet zoo make lora-lm")
    return LmLoraZoo.from_tensors(LmLoraZooConfig(**fields), zoo.tensors(), LM_SITES)
