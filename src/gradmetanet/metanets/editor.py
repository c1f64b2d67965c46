"""The weight editor: ``theta' = theta + s * rms * delta(theta / rms, extra features)`` with a weight-space backbone.

One module for every task that edits networks in one pass: INR editing (extra features: probe values, or the
features a GradMetaNet computes from the networks' decomposed gradients) and zoo fine-tuning (extra feature: each
network's scaled gradient). ``rms`` holds one positive constant per parameter tensor (its root mean square over the
training networks): dividing by a constant commutes with every permutation, sign flip and positive scale, so the
editor keeps the backbone's symmetry. ``s`` is one learnable scale per parameter tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.spec import NetworkSpec
from .gradient_input import join_gradient_features

__all__ = ["WeightEditor"]


class WeightEditor(nn.Module):
    """Edits networks ``{name: [N, *shape]}`` in one forward pass (see the module docstring).

    ``backbone`` maps weight-space features ``{name: [N, *shape, C]}`` to ``{name: [N, *shape, 1]}`` with
    ``C = 1 + extra channels``; ``gradient_net`` (optional) maps a :class:`~gradmetanet.GradientBatch` of the
    networks' decomposed gradients to per-parameter features that join the extra channels.
    """

    def __init__(self, spec: NetworkSpec, backbone: nn.Module, rms: dict[str, torch.Tensor], out_scale: float = 0.01,
                 gradient_net: nn.Module | None = None) -> None:
        super().__init__()
        self.spec, self.names = spec, list(spec.param_shapes())
        self.backbone, self.gradient_net = backbone, gradient_net
        self.register_buffer("rms", torch.stack([rms[n].reshape(()) for n in self.names]))
        self.scales = nn.Parameter(torch.full((len(self.names),), float(out_scale)))

    def forward(self, params: dict[str, torch.Tensor], extra: dict[str, torch.Tensor] | None = None,
                gradients: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``params {name: [N, *shape]}``, ``extra {name: [N, *shape, E]}`` (every parameter), ``gradients
        [N, b, n_neurons, f]`` (with a ``gradient_net``) -> edited ``{name: [N, *shape]}``."""
        x = {n: (params[n] / self.rms[i]).unsqueeze(-1) for i, n in enumerate(self.names)}
        if extra is not None:
            x = {n: torch.cat([t, extra[n]], -1) for n, t in x.items()}
        if self.gradient_net is not None:
            if gradients is None:
                raise ValueError("this editor reads decomposed gradients: pass gradients=[N, b, n_neurons, f]")
            x = join_gradient_features(x, self.spec, self.gradient_net, gradients)
        delta = self.backbone(x)
        return {n: params[n] + self.scales[i] * self.rms[i] * delta[n][..., 0] for i, n in enumerate(self.names)}
