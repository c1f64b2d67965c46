"""Text corpora available without downloads, a character tokenizer, and next-token batches.

* :func:`pydoc_topics_text`: the English text of CPython's ``pydoc_data.topics`` (about 465K
  characters in Python 3.11; the text differs between Python versions, so record
  :func:`corpus_version` with results).
* :func:`read_line_corpus`: LM1B-style corpora, one sentence a line, from ``*.txt`` files in a
  directory the user names.
* :class:`CharTokenizer`: one id per character seen when fitted, plus an unknown id.
* :func:`next_token_batch`: random windows ``x [B, T]`` and their next tokens ``y [B, T]``.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["pydoc_topics_text", "corpus_version", "read_line_corpus", "CharTokenizer", "next_token_batch"]


def pydoc_topics_text() -> str:
    """The help topics of CPython's ``pydoc_data`` in the order of their sorted names, joined by blank lines."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[name] for name in sorted(topics))


def corpus_version() -> str:
    """The Python version whose ``pydoc_data`` the corpus came from (its text changes between versions)."""
    return f"CPython {platform.python_version()}"


def read_line_corpus(directory: str | os.PathLike, pattern: str = "*.txt") -> list[str]:
    """Non-empty lines (sentences) of every file matching ``pattern`` in ``directory``, files in sorted order."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory; pass the folder that holds the corpus' {pattern} files")
    files = sorted(root.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no {pattern} files in {root}; an LM1B-style corpus is text files with one "
                                "sentence a line")
    lines = [line.strip() for path in files for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"the {len(files)} {pattern} files in {root} hold no text")
    return lines


@dataclass(frozen=True)
class CharTokenizer:
    """Characters to ids ``1..V-1`` in sorted order; id 0 is any character not seen when fitted."""

    chars: str

    @classmethod
    def fit(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> torch.Tensor:
        """``[len(text)]`` int64 ids."""
        index = {c: i + 1 for i, c in enumerate(self.chars)}
        return torch.tensor([index.get(c, 0) for c in text], dtype=torch.long)

    def decode(self, ids: torch.Tensor) -> str:
        """The text of ``ids`` (unknown ids as U+FFFD)."""
        return "".join(self.chars[i - 1] if i > 0 else "\ufffd" for i in ids.tolist())

    def to_json(self) -> str:
        return json.dumps({"kind": "char", "chars": self.chars})

    @classmethod
    def from_json(cls, text: str) -> "CharTokenizer":
        data = json.loads(text)
        if data.get("kind") != "char":
            raise ValueError(f"not a character tokenizer: kind {data.get('kind')!r}")
        return cls(data["chars"])


def next_token_batch(ids: torch.Tensor, batch_size: int, seq_len: int,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows of ``ids [n]``: inputs ``[B, T]`` and the tokens one step later ``[B, T]``."""
    if ids.dim() != 1:
        raise ValueError(f"ids must be one sequence [n], got shape {list(ids.shape)}")
    if len(ids) < seq_len + 1:
        raise ValueError(f"a sequence of {len(ids)} tokens has no window of {seq_len} inputs and their next tokens")
    starts = torch.randint(len(ids) - seq_len, (batch_size,), generator=generator)
    offsets = starts[:, None] + torch.arange(seq_len + 1)
    windows = ids[offsets]
    return windows[:, :-1], windows[:, 1:]
