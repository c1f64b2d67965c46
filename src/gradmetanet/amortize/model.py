"""The one-pass fine-tuner: ``theta' = theta + s * rms * delta(theta / rms)`` with a graph metanetwork."""

from __future__ import annotations

import torch
from torch import nn

from ..core.spec import NetworkSpec
from ..weightspace import GMN, ScaleGMN

__all__ = ["OnePassFineTuner", "MODELS"]

#: the compared metanetworks: ScaleGMN-B (the zoo's sign or scale group) and GMN-B, the same network with its
#: canonicalisation removed (the paper's symmetry-broken ablation); "gmn" is the plain permutation GMN-B
MODELS = ("scalegmn", "gmn_broken", "gmn")


class OnePassFineTuner(nn.Module):
    """Maps networks ``{name: [N, *shape]}`` to fine-tuned networks in one forward pass.

    ``rms``: one positive scalar per parameter tensor (its root mean square over the training zoo); dividing by a
    constant commutes with every sign flip, positive scale and permutation, so the map stays equivariant.
    ``s``: one learnable scale per parameter tensor, starting at ``out_scale``.
    """

    def __init__(self, spec: NetworkSpec, rms: dict[str, torch.Tensor], model: str = "scalegmn", hidden: int = 32,
                 layers: int = 3, out_scale: float = 0.1) -> None:
        super().__init__()
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; choose from {MODELS}")
        self.spec, self.names = spec, list(spec.param_shapes())
        if model == "gmn":
            self.backbone = GMN(spec, 1, 1, hidden=hidden, layers=layers, bidirectional=True)
        else:
            self.backbone = ScaleGMN(spec, 1, 1, hidden=hidden, layers=layers, bidirectional=True,
                                     symmetry=model == "scalegmn")
        self.register_buffer("rms", torch.stack([rms[n].reshape(()) for n in self.names]))
        self.scales = nn.Parameter(torch.full((len(self.names),), float(out_scale)))

    def forward(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = {n: (params[n] / self.rms[i]).unsqueeze(-1) for i, n in enumerate(self.names)}
        delta = self.backbone(x)
        return {n: params[n] + self.scales[i] * self.rms[i] * delta[n][..., 0] for i, n in enumerate(self.names)}
