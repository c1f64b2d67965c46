"""Base networks for the experiments beyond MLPs."""

from .transformer import CausalTransformer

__all__ = ["CausalTransformer"]
