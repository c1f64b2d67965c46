"""The paper's language-model task for learned optimizers (spec 7: 2 blocks, d = 32, 4 heads, batch 8,
sequences of 8, next-token prediction), on a corpus every machine has.

The text is CPython's ``pydoc_data.topics`` (about 465K characters; :func:`~gradmetanet.data.text.corpus_version`
records the Python version) at the character level, or any text the caller passes (an LM1B-style
directory read with :func:`~gradmetanet.data.text.read_line_corpus`). It is cut into chunks of
``chunk`` characters that a seeded permutation assigns to test (20%) and training, and a part of
training to validation, as the digits task splits its images: a split seed the meta-training did
not use gives the race unseen test text.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..capture.functional import functional_features
from ..data.text import CharTokenizer, next_token_batch, pydoc_topics_text
from ..models import CausalTransformer
from .tasks import Params, Task
from ..capture import spec_of

__all__ = ["LanguageModelTask"]


@contextmanager
def _quiet_vmap_attention():
    """Silence PyTorch's note that attention kernels have no vmap batching rule (the runs of PES are vmapped; the
    fallback loops over them, correctly)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented "
                                                  "the batching rule")
        yield


class LanguageModelTask(Task):
    """Next-token prediction with :class:`~gradmetanet.models.CausalTransformer` (``d = hidden``).

    Batches are ``(ids [B, T], targets [B, T])`` windows of the training text; the loss is the mean
    cross-entropy over all tokens; the test loss is over ``test_windows`` fixed windows of the test text.
    """

    def __init__(self, text: str | None = None, hidden: int = 32, heads: int = 4, blocks: int = 2,
                 seq_len: int = 8, batch_size: int = 8, seed: int = 0, validation_fraction: float = 0.0,
                 chunk: int = 2048, test_windows: int = 512) -> None:
        text = pydoc_topics_text() if text is None else text
        self.tokenizer = CharTokenizer.fit(text)
        ids = self.tokenizer.encode(text)
        chunks = list(ids.split(chunk))
        order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(seed)).tolist()
        n_test = max(1, len(chunks) // 5)
        n_val = int(round(validation_fraction * (len(chunks) - n_test)))
        if len(chunks) - n_test - n_val < 1:
            raise ValueError(f"a text of {len(ids)} tokens in chunks of {chunk} leaves no training text")
        pick = lambda part: torch.cat([chunks[i] for i in sorted(part)]) if part else ids[:0]  # noqa: E731
        self.test_ids = pick(order[:n_test])
        self.val_ids = pick(order[n_test:n_test + n_val])
        self.train_ids = pick(order[n_test + n_val:])
        self.hidden, self.heads, self.blocks = hidden, heads, blocks
        self.seq_len, self.batch_size = seq_len, batch_size
        self.vocab = self.tokenizer.vocab_size
        self.x_test, self.y_test = next_token_batch(self.test_ids, test_windows, seq_len,
                                                    torch.Generator().manual_seed(seed))
        self.model = self.make_model()                 # the structure; parameters come from each run
        self.spec = spec_of(self.model)

    def make_model(self) -> CausalTransformer:
        return CausalTransformer(self.vocab, d=self.hidden, heads=self.heads, blocks=self.blocks,
                                 max_len=self.seq_len)

    def init_params(self, n: int, generator: torch.Generator) -> Params:
        """PyTorch's own initialisation of ``n`` fresh models, each seeded from ``generator``."""
        runs = []
        for seed in torch.randint(2**62, (n,), generator=generator).tolist():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                runs.append({k: v.detach() for k, v in self.make_model().named_parameters()})
        return {k: torch.stack([r[k] for r in runs]) for k in runs[0]}

    def _windows(self, ids: torch.Tensor, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = next_token_batch(ids, n * self.batch_size, self.seq_len, generator)
        return x.view(n, self.batch_size, -1), y.view(n, self.batch_size, -1)

    def sample_batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        return self._windows(self.train_ids, n, generator)

    def sample_validation_batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        if not len(self.val_ids):
            return super().sample_validation_batch(n, generator)
        return self._windows(self.val_ids, n, generator)

    @staticmethod
    def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, -2), targets.flatten())

    def loss(self, params: Params, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch
        with _quiet_vmap_attention():
            return self._cross_entropy(functional_call(self.model, params, (x,)), y)

    def batch_loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch
        return self._cross_entropy(model(x), y)

    def test_loss(self, model: torch.nn.Module) -> float:
        """Mean next-token cross-entropy (nats) on the fixed test windows."""
        with torch.no_grad():
            return self._cross_entropy(model(self.x_test), self.y_test).item()

    def grads_and_features(self, params: Params, batch: tuple[torch.Tensor, ...]
                           ) -> tuple[Params, torch.Tensor, torch.Tensor]:
        """Parameter gradients, neuron features ``[B T, N, 2]`` (tokens are set elements) and the batch loss."""
        x, y = batch
        with _quiet_vmap_attention():
            loss, g_params, features = functional_features(self.model, self.spec, params, (x,),
                                                           lambda logits: self._cross_entropy(logits, y))
        return g_params, features, loss
