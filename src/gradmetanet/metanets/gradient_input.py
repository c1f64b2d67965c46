"""Weight-space backbones that also read the networks' decomposed gradients.

A GradMetaNet with a weight-space head maps each network's gradient set to ``F`` features per parameter entry; they
are appended to the backbone's weight features (``{name: [N, *shape, C]}`` -> ``[N, *shape, C + F]``), the input the
paper's INR-editing variants "backbone + GradMetaNet" read. Both parts are permutation-equivariant, so the joint
model is; it keeps a backbone's larger group (ScaleGMN's sign flips) only if the gradient network does too.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.spec import NetworkSpec
from ..features.neurons import GradientBatch

__all__ = ["WithGradientFeatures", "join_gradient_features"]


def join_gradient_features(x: dict[str, torch.Tensor], spec: NetworkSpec, gradient_net: nn.Module,
                           gradients: torch.Tensor) -> dict[str, torch.Tensor]:
    """``x {name: [N, *shape, C]}`` with ``gradient_net``'s features of ``gradients [N, b, n_neurons, f]``
    appended: ``{name: [N, *shape, C + F]}``."""
    feats = gradient_net(GradientBatch(spec, gradients))
    return {n: torch.cat([t, feats[n]], -1) for n, t in x.items()}


class WithGradientFeatures(nn.Module):
    """``backbone(x ++ gradient_net(gradients))``: a weight-space backbone whose input channels are the weight
    features and ``F`` features per parameter from ``gradient_net`` (a GradMetaNet with a weight-space head,
    ``out_features = F``); the backbone is built with ``C + F`` input channels."""

    def __init__(self, spec: NetworkSpec, backbone: nn.Module, gradient_net: nn.Module) -> None:
        super().__init__()
        self.spec, self.backbone, self.gradient_net = spec, backbone, gradient_net

    def forward(self, x: dict[str, torch.Tensor], gradients: torch.Tensor):
        """``x {name: [N, *shape, C]}``, ``gradients [N, b, n_neurons, f]`` -> the backbone's output."""
        return self.backbone(join_gradient_features(x, self.spec, self.gradient_net, gradients))
