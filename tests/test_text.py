"""Text corpora without downloads, the character tokenizer and next-token batches."""

from __future__ import annotations

import pytest
import torch

from gradmetanet.data.text import CharTokenizer, corpus_version, next_token_batch, pydoc_topics_text, read_line_corpus


def test_pydoc_corpus_and_tokenizer_round_trip():
    text = pydoc_topics_text()
    assert len(text) > 300_000 and "class" in text and corpus_version().startswith("CPython 3.")
    tok = CharTokenizer.fit(text)
    ids = tok.encode(text[:5000])
    assert ids.dtype == torch.long and int(ids.min()) >= 1 and int(ids.max()) < tok.vocab_size
    assert tok.decode(ids) == text[:5000]
    assert tok.encode("\u2603").tolist() == [0] and tok.decode(torch.tensor([0])) == "\ufffd"
    assert CharTokenizer.from_json(tok.to_json()) == tok
    with pytest.raises(ValueError, match="not a character tokenizer"):
        CharTokenizer.from_json('{"kind": "bpe"}')


def test_line_corpus_from_files_the_test_writes(tmp_path):
    (tmp_path / "b.txt").write_text("third sentence\n\n  fourth  \n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first sentence\nsecond\n", encoding="utf-8")
    (tmp_path / "ignored.csv").write_text("x,y\n")
    assert read_line_corpus(tmp_path) == ["first sentence", "second", "third sentence", "fourth"]
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        read_line_corpus(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.txt files"):
        read_line_corpus(empty)
    (empty / "blank.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="hold no text"):
        read_line_corpus(empty)


def test_next_token_batches_are_shifted_windows():
    ids = torch.arange(100)
    x, y = next_token_batch(ids, 8, 5, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 5)
    assert torch.equal(y, x + 1) and torch.equal(x[:, 1:], x[:, :-1] + 1)
    again, _ = next_token_batch(ids, 8, 5, torch.Generator().manual_seed(0))
    assert torch.equal(x, again)
    with pytest.raises(ValueError, match="no window of 5"):
        next_token_batch(torch.arange(5), 2, 5)
    with pytest.raises(ValueError, match="one sequence"):
        next_token_batch(torch.zeros(2, 9, dtype=torch.long), 2, 3)
