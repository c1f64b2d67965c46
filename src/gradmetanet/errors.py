"""Errors shared across packages."""

from __future__ import annotations

__all__ = ["CaptureError"]


class CaptureError(RuntimeError):
    """Decomposed gradients could not be captured as asked (the message says why)."""
