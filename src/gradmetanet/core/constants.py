"""A cache for small constant tensors (positional codes, segment indices, decay vectors).

Rebuilding them every optimizer step costs more than the step's arithmetic on small models, so
they are kept per key (sizes, dtype, device). A tensor built under ``torch.inference_mode()`` is
never kept: it could not be used by autograd later (what an ``lru_cache`` of tensors got wrong).
Callers must not modify a returned tensor in place.
"""

from __future__ import annotations

from typing import Callable, Hashable, TypeVar

import torch

__all__ = ["ConstantCache"]

T = TypeVar("T")


class ConstantCache:
    """``get(key, build)``: the value built for ``key``, built once (at most ``maxsize`` keys, then cleared)."""

    def __init__(self, maxsize: int = 128) -> None:
        self.maxsize = maxsize
        self._store: dict[Hashable, object] = {}

    def get(self, key: Hashable, build: Callable[[], T]) -> T:
        if torch.is_inference_mode_enabled():
            return build()
        if key not in self._store:
            if len(self._store) >= self.maxsize:
                self._store.clear()
            self._store[key] = build()
        return self._store[key]  # type: ignore[return-value]
