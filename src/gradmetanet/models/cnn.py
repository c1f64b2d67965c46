"""The Small CNN Zoo's network (Unterthiner et al. 2020), the base network of the CNN zoos."""

from __future__ import annotations

from torch import nn

from .mlp import ACTIVATIONS

__all__ = ["small_cnn_zoo_template"]


def small_cnn_zoo_template(activation: str = "tanh", channels: int = 16, classes: int = 10) -> nn.Sequential:
    """The Small CNN Zoo network (layout ``[1, 16, 16, 16, 10]``, 4,970 parameters): three 3 x 3 stride-2
    convolutions without padding, global average pooling, a dense layer. Input ``[B, 1, H, W]``."""
    act = ACTIVATIONS[activation]
    return nn.Sequential(nn.Conv2d(1, channels, 3, 2), act(), nn.Conv2d(channels, channels, 3, 2), act(),
                         nn.Conv2d(channels, channels, 3, 2), act(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(channels, classes))
