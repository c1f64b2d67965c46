"""The one-pass fine-tuner: ``theta' = theta + s * rms * delta(theta / rms [, gradient feature])`` with a graph
metanetwork.

Beyond the paper, ``scalegmn_grad`` also reads each network's gradient on one fixed batch of training images,
as the feature ``theta * theta * dL/dtheta`` entry by entry. Under a sign flip or a positive scale a weight moves
as ``q_i / q_j`` and its gradient as ``q_j / q_i``, so ``theta^2 dL/dtheta`` moves exactly as ``theta`` does
(biases: ``q_i``), under both groups, and with the permutations: the input keeps ScaleGMN's symmetry. It is the
step of multiplicative (log-space) gradient descent, ``theta <- theta exp(-eta theta dL/dtheta)``, to first
order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from ..core.spec import NetworkSpec
from .backbones import GMN, ScaleGMN
from .editor import WeightEditor

__all__ = ["OnePassFineTuner", "MODELS", "gradient_features"]

#: the compared metanetworks: ScaleGMN-B (the zoo's sign or scale group), GMN-B, the same network with its
#: canonicalisation removed (the paper's symmetry-broken ablation), the plain permutation GMN-B, and ScaleGMN-B
#: reading the gradient feature too
MODELS = ("scalegmn", "gmn_broken", "gmn", "scalegmn_grad")


def gradient_features(template: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
                      ) -> dict[str, torch.Tensor]:
    """``{name: [N, *shape]}``: ``theta^2 * dCE/dtheta`` of each network ``params {name: [N, *shape]}`` on the batch
    ``(x, y)`` (moves as ``theta`` under permutations, signs and positive scales; see the module docstring)."""
    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(functional_call(template, p, (x,)), y)

    with torch.no_grad():
        grads = vmap(grad(loss))({k: v.detach() for k, v in params.items()})
    return {k: params[k].detach().square() * g for k, g in grads.items()}


class OnePassFineTuner(WeightEditor):
    """Maps networks ``{name: [N, *shape]}`` to fine-tuned networks in one forward pass: a
    :class:`~gradmetanet.metanets.WeightEditor` whose backbone is one of :data:`MODELS`.

    ``rms``: one positive scalar per parameter tensor (its root mean square over the training zoo); dividing by a
    constant commutes with every sign flip, positive scale and permutation, so the map stays equivariant.
    ``gradient_rms``: the same for the gradient feature (``scalegmn_grad`` only). ``s``: one learnable scale per
    parameter tensor, starting at ``out_scale``.
    """

    def __init__(self, spec: NetworkSpec, rms: dict[str, torch.Tensor], model: str = "scalegmn", hidden: int = 32,
                 layers: int = 3, out_scale: float = 1.0, gradient_rms: dict[str, torch.Tensor] | None = None) -> None:
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; choose from {MODELS}")
        if (gradient_rms is not None) != model.endswith("_grad"):
            raise ValueError(f"{model!r}: pass gradient_rms exactly when the model reads gradients (scalegmn_grad)")
        channels = 1 if gradient_rms is None else 2
        if model == "gmn":
            backbone = GMN(spec, channels, 1, hidden=hidden, layers=layers, bidirectional=True)
        else:
            backbone = ScaleGMN(spec, channels, 1, hidden=hidden, layers=layers, bidirectional=True,
                                symmetry=model != "gmn_broken")
        super().__init__(spec, backbone, rms, out_scale)
        self.register_buffer("gradient_rms", None if gradient_rms is None else
                             torch.stack([gradient_rms[n].reshape(()) for n in self.names]))

    @property
    def reads_gradients(self) -> bool:
        return self.gradient_rms is not None

    def forward(self, params: dict[str, torch.Tensor], gradients: dict[str, torch.Tensor] | None = None
                ) -> dict[str, torch.Tensor]:
        """``params``, and for ``scalegmn_grad`` their :func:`gradient_features`, ``{name: [N, *shape]}``."""
        extra = None
        if self.reads_gradients:
            if gradients is None:
                raise ValueError("this fine-tuner reads gradient features: pass gradient_features(...) of the networks")
            extra = {n: (gradients[n] / self.gradient_rms[i]).unsqueeze(-1) for i, n in enumerate(self.names)}
        return super().forward(params, extra)
