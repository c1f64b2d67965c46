"""Datasets: the digits, the classification sets of scikit-learn, MNIST-1D, image files and text (the zoos made
from them are in :mod:`gradmetanet.zoos`)."""

from ..moved import moved_name
from .classification import CLASSIFICATION_SETS, load_classification_split
from .digits import load_digits_split
from .text import CharTokenizer, next_token_batch, pydoc_topics_text, read_line_corpus

__all__ = ["CLASSIFICATION_SETS", "CharTokenizer", "load_classification_split", "load_digits_split",
           "next_token_batch", "pydoc_topics_text", "read_line_corpus"]


def __getattr__(name: str) -> object:
    """The SIREN zoo's names, exported here in 0.9.0 (deprecated)."""
    return moved_name(__name__, name)
