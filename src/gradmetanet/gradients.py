"""GradientSet: the decomposed per-example gradients of a batch, and the views derived from them.

For a linear site ``y = W x + b`` and example ``i`` with tokens ``t``, the gradient of example
``i``'s own loss is ``dW_i = sum_t g[i, t] a[i, t]^T`` and ``db_i = sum_t g[i, t]``. A GradientSet
keeps only the factors ``a: [b, T, d_in]`` and ``g: [b, T, d_out]`` per site, which costs
``b T (d_in + d_out)`` numbers instead of ``b d_out d_in``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Literal, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import temporary_path
from .spec import NetworkSpec

__all__ = ["GradientSet", "LossReduction"]

LossReduction = Literal["mean", "sum"]
_FORMAT_VERSION = "1"
#: Upper bound on the elements of per-example gradients materialised at once (for ``T > 1``).
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class GradientSet:
    """Decomposed per-example gradients of one batch for every linear site of ``spec``.

    Attributes:
        spec: the base network's neuron spaces and linear sites.
        activations: site name -> ``a: [b, T, d_in]``, the site's input.
        output_grads: site name -> ``g: [b, T, d_out]``, the gradient of example ``i``'s *own* loss
            with respect to the site's output (already rescaled by ``b`` for a mean-reduced loss).
        outputs: site name -> ``[b, T, d_out]`` pre-activation outputs, kept only for sites whose
            output space no other site reads (the network outputs); they fill the activation slot
            of those neurons in :meth:`neuron_features`.
        loss_reduction: how the batch loss combined examples, ``"mean"`` or ``"sum"``; it decides
            how :meth:`mean_grad` combines them so that it equals ``param.grad``.
    """

    spec: NetworkSpec
    activations: dict[str, torch.Tensor]
    output_grads: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    loss_reduction: LossReduction = "mean"

    def __post_init__(self) -> None:
        if self.loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {self.loss_reduction!r}")
        sizes = set()
        for site in self.spec.sites:
            for kind, store in (("activations", self.activations), ("output_grads", self.output_grads)):
                if site.name not in store:
                    raise ValueError(f"GradientSet: {kind} has no entry for site {site.name!r}")
            a, g = self.activations[site.name], self.output_grads[site.name]
            d_in, d_out = self.spec.space(site.in_space).size, self.spec.space(site.out_space).size
            if a.dim() != 3 or a.shape[-1] != d_in:
                raise ValueError(f"site {site.name!r}: activations must be [b, T, {d_in}], got {list(a.shape)}")
            if g.dim() != 3 or g.shape[-1] != d_out or g.shape[:2] != a.shape[:2]:
                raise ValueError(f"site {site.name!r}: output_grads must be [b, T, {d_out}] matching activations "
                                 f"{list(a.shape)}, got {list(g.shape)}")
            sizes.add(a.shape[0])
        if len(sizes) > 1:
            raise ValueError(f"GradientSet: sites disagree on the number of examples: {sorted(sizes)}")

    # ------------------------------------------------------------------ basic properties
    @property
    def batch_size(self) -> int:
        return next(iter(self.activations.values())).shape[0]

    def __len__(self) -> int:
        return self.batch_size

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.activations.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.activations.values())).device

    def nbytes(self) -> int:
        """Bytes held by the factors (what is stored instead of dense per-example gradients)."""
        tensors = [*self.activations.values(), *self.output_grads.values(), *self.outputs.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def dense_nbytes(self) -> int:
        """Bytes that dense per-example gradients ``[b, P]`` of the same dtype would take."""
        return self.batch_size * self.spec.n_params * next(iter(self.activations.values())).element_size()

    def _map(self, fn) -> "GradientSet":
        return GradientSet(self.spec, {k: fn(v) for k, v in self.activations.items()},
                           {k: fn(v) for k, v in self.output_grads.items()},
                           {k: fn(v) for k, v in self.outputs.items()}, self.loss_reduction)

    def to(self, *args, **kwargs) -> "GradientSet":
        """Move or cast every tensor, with the arguments of :meth:`torch.Tensor.to`."""
        return self._map(lambda t: t.to(*args, **kwargs))

    def select(self, index: torch.Tensor | slice) -> "GradientSet":
        """The sub-set of examples ``index`` (a slice, index tensor or boolean mask)."""
        return self._map(lambda t: t[index])

    def permute_neurons(self, perms: Mapping[str, torch.Tensor]) -> "GradientSet":
        """Apply neuron permutations (space name -> permutation) to the factors."""
        def perm_last(t: torch.Tensor, space: str) -> torch.Tensor:
            p = perms.get(space)
            return t if p is None else t.index_select(-1, p.to(t.device))

        acts, grads, outs = {}, {}, {}
        for site in self.spec.sites:
            acts[site.name] = perm_last(self.activations[site.name], site.in_space)
            grads[site.name] = perm_last(self.output_grads[site.name], site.out_space)
            if site.name in self.outputs:
                outs[site.name] = perm_last(self.outputs[site.name], site.out_space)
        return GradientSet(self.spec, acts, grads, outs, self.loss_reduction)

    # ------------------------------------------------------------------ derived views
    def per_example_grads(self) -> dict[str, torch.Tensor]:
        """Dense per-example gradients ``[b, *param.shape]`` keyed by parameter name.

        This materialises ``b x P`` numbers: meant for checks and dense baselines.
        """
        grads: dict[str, torch.Tensor] = {}
        for site in self.spec.sites:
            a, g = self.activations[site.name], self.output_grads[site.name]
            grads[site.weight] = torch.einsum("bto,bti->boi", g, a)
            if site.bias is not None:
                grads[site.bias] = g.sum(1)
        return grads

    def mean_grad(self) -> dict[str, torch.Tensor]:
        """The batch gradient, equal to ``param.grad`` after the captured backward."""
        scale = 1.0 / self.batch_size if self.loss_reduction == "mean" else 1.0
        grads: dict[str, torch.Tensor] = {}
        for site in self.spec.sites:
            a, g = self.activations[site.name], self.output_grads[site.name]
            grads[site.weight] = torch.einsum("bto,bti->oi", g, a) * scale
            if site.bias is not None:
                grads[site.bias] = g.sum((0, 1)) * scale
        return grads

    def empirical_fisher_diag(self) -> dict[str, torch.Tensor]:
        """``mean_i (grad_i)^2`` per parameter, shape ``param.shape``, keyed by parameter name.

        With one token per example this is ``(g^2)^T (a^2) / b`` and never forms per-example
        gradients; with ``T > 1`` the square of a sum of ``T`` outer products is formed in chunks
        of examples of bounded size.
        """
        fisher: dict[str, torch.Tensor] = {}
        b = self.batch_size
        for site in self.spec.sites:
            a, g = self.activations[site.name], self.output_grads[site.name]
            if a.shape[1] == 1:
                fisher[site.weight] = torch.einsum("bo,bi->oi", g[:, 0].square(), a[:, 0].square()) / b
            else:
                chunk = max(1, _CHUNK_ELEMENTS // (g.shape[-1] * a.shape[-1]))
                total = torch.zeros(g.shape[-1], a.shape[-1], dtype=a.dtype, device=a.device)
                for start in range(0, b, chunk):
                    sl = slice(start, start + chunk)
                    total += torch.einsum("bto,bti->boi", g[sl], a[sl]).square().sum(0)
                fisher[site.weight] = total / b
            if site.bias is not None:
                fisher[site.bias] = g.sum(1).square().mean(0)
        return fisher

    def neuron_features(self) -> dict[str, torch.Tensor]:
        """Per-neuron-space features ``[b * T, n, 2]``: channel 0 activation, channel 1 gradient.

        Channel 0 of a space is the input of the site that reads it; channel 1 is the gradient
        of the site that writes it. The two slots hooks cannot provide are filled by choice:
        the *input* space's gradient channel is zero (the gradient with respect to the data is
        not part of the parameter gradient), and the *output* space's activation channel is
        the network output (the pre-activation of the last site). Tokens are folded into the
        set axis (example-major), as in the paper's treatment of sequences.
        """
        whole = self.neuron_tensor()
        sizes = [space.size for space in self.spec.spaces]
        return dict(zip((space.name for space in self.spec.spaces), whole.split(sizes, dim=1)))

    def neuron_tensor(self) -> torch.Tensor:
        """``[b * T, N, 2]``: :meth:`neuron_features` of every space, concatenated in the spec's order
        (one buffer, filled in place: what a metanetwork reads)."""
        first = next(iter(self.activations.values()))
        out = first.new_empty(first.shape[0] * first.shape[1], self.spec.n_neurons, 2)
        for space, sl in zip(self.spec.spaces, self.spec.space_slices().values()):
            readers, writers = self.spec.readers(space.name), self.spec.writers(space.name)
            if readers:
                act = self.activations[readers[0].name]
            elif writers and writers[0].name in self.outputs:
                act = self.outputs[writers[0].name]
            else:
                raise ValueError(f"space {space.name!r} has no reader and no recorded output")
            grad = self.output_grads[writers[0].name] if writers else None
            if grad is not None and grad.shape != act.shape:
                raise ValueError(f"space {space.name!r}: activation {list(act.shape)} and gradient "
                                 f"{list(grad.shape)} disagree on examples or tokens")
            out[:, sl, 0] = act.flatten(0, 1)
            out[:, sl, 1] = 0.0 if grad is None else grad.flatten(0, 1)
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the factors and the spec to a safetensors file (atomically)."""
        tensors = {f"a/{k}": v.contiguous() for k, v in self.activations.items()}
        tensors |= {f"g/{k}": v.contiguous() for k, v in self.output_grads.items()}
        tensors |= {f"out/{k}": v.contiguous() for k, v in self.outputs.items()}
        metadata = {"format": "gradmetanet.GradientSet", "version": _FORMAT_VERSION,
                    "spec": self.spec.to_json(), "loss_reduction": self.loss_reduction}
        tmp = temporary_path(path)
        save_file({k: v.cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "GradientSet":
        """Read a file written by :meth:`save`; raises ``ValueError`` on anything else."""
        if not os.path.exists(path):
            raise FileNotFoundError(f"no GradientSet file at {os.fspath(path)!r}")
        try:
            with open(path, "rb") as fh:
                header_len = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(header_len))
            tensors = load_file(path, device=str(device))
        except (SafetensorError, ValueError, OSError, UnicodeDecodeError) as err:
            raise ValueError(f"{os.fspath(path)!r} is not a readable safetensors file ({err})") from err
        meta = header.get("__metadata__", {})
        if meta.get("format") != "gradmetanet.GradientSet":
            raise ValueError(f"{os.fspath(path)!r} is a safetensors file but not a saved GradientSet")
        if meta.get("version") != _FORMAT_VERSION:
            raise ValueError(f"{os.fspath(path)!r} has GradientSet format {meta.get('version')!r}; "
                             f"this version reads {_FORMAT_VERSION!r}")
        spec = NetworkSpec.from_json(meta["spec"])
        groups: dict[str, dict[str, torch.Tensor]] = {"a": {}, "g": {}, "out": {}}
        for key, value in tensors.items():
            kind, _, site = key.partition("/")
            groups[kind][site] = value
        return cls(spec, groups["a"], groups["g"], groups["out"], meta["loss_reduction"])
