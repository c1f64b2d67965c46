"""A zoo of random SIRENs with their decomposed output gradients and Fisher diagonals (paper 7.1).

Every network is a SIREN ``1 -> 32 -> 32 -> 1`` (sine activations) whose weights and biases are
drawn from a standard Gaussian. Each network ``k`` has its own input distribution ``X_p``
on ``[-1, 1]``: with ``p ~ U[0, 1]``, a point is drawn from ``U[-1, 0]`` with probability ``p``
and from ``U[0, 1]`` otherwise (the paper leaves ``X_p`` open; this is our documented choice).
Inputs to the metanetworks: the decomposed gradients of the network *output* at ``set_size``
points. Target: the Fisher diagonal of the unit-variance Gaussian regression model,
``diag F = mean_k (grad f(x'_k))^2``, from ``target_points`` independent points. The standard
estimator is the same formula on the ``set_size`` input points.

Generation is vectorised over networks: the functional extractor
(:func:`~gradmetanet.capture.functional_factors`, what :class:`~gradmetanet.GradientCapture`
records with hooks) runs under ``torch.vmap`` over a chunk of networks.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from .cache import cached_zoo
from .shards import complete_sharded_zoo, make_sharded_zoo
from ..models.siren import siren_spec, siren_template
from ..capture.functional import functional_factors
from ..capture.gradients import linear_fisher_diagonal
from ..core.incidence import neuron_tensor
from ..core.spec import NetworkSpec

__all__ = ["SirenZooConfig", "SirenZoo", "generate_siren_zoo", "load_or_generate_siren_zoo", "load_sharded_siren_zoo",
           "make_sharded_siren_zoo", "siren_factors"]


@dataclass(frozen=True)
class SirenZooConfig:
    """What defines a zoo; any change gives another cache file."""

    n_networks: int = 3000
    widths: tuple[int, ...] = (1, 32, 32, 1)
    set_size: int = 128
    target_points: int = 1024
    omega_0: float = 1.0
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class SirenZoo:
    """Per network ``k``: parameters, input points, decomposed gradients, targets and the standard estimate.

    Attributes:
        config: how it was made.
        params: name -> ``[M, *shape]`` SIREN parameters (names as in :func:`siren_module`).
        points: ``[M, set_size]`` input points; ``target_inputs``: ``[M, target_points]``.
        features: ``[M, set_size, N, 2]`` neuron features (activation, output gradient).
        target: ``[M, P]`` Fisher diagonal from the independent points (parameters in spec order).
        standard: ``[M, P]`` the empirical estimate from the ``set_size`` input gradients.
    """

    config: SirenZooConfig
    params: dict[str, torch.Tensor]
    points: torch.Tensor
    target_inputs: torch.Tensor
    features: torch.Tensor
    target: torch.Tensor
    standard: torch.Tensor

    @property
    def spec(self) -> NetworkSpec:
        return siren_spec(self.config.widths)

    def __len__(self) -> int:
        return self.features.shape[0]


def siren_factors(params: dict[str, torch.Tensor], x: torch.Tensor, widths: tuple[int, ...], omega_0: float
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Factors of the output gradient of ``M`` SIRENs at ``n`` scalar points each, by the functional extractor.

    ``params[name]: [M, *shape]``, ``x: [M, n]``. Returns per site (spec order) ``a [M, n, d_in]`` and
    ``g = df/du [M, n, d_out]``, and the neuron features ``[M, n, N, 2]`` (incidence features).
    """
    spec = siren_spec(widths)
    template = siren_template(widths, omega_0).to(x.dtype)

    def one(p: dict[str, torch.Tensor], points: torch.Tensor):
        _, _, acts, grads, outs = functional_factors(template, spec, p, (points.unsqueeze(-1),),
                                                     lambda f: f.sum(), loss_reduction="sum")
        return acts, grads, neuron_tensor(spec, acts, grads, outs)

    acts, grads, feats = torch.vmap(one)(params, x)
    return ([acts[s.name][:, :, 0] for s in spec.sites], [grads[s.name][:, :, 0] for s in spec.sites], feats)


def _fisher_from_factors(acts: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    """``[M, P]`` mean over points of squared per-point gradients, from factors, in spec order."""
    parts = []
    for a, g in zip(acts, grads):
        weight, bias = linear_fisher_diagonal(a, g)
        parts += [weight.flatten(1), bias]
    return torch.cat(parts, 1)


def _draw_inputs(m: int, n: int, p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``[m, n]`` points of ``X_p``: ``U[-1, 0]`` with probability ``p`` (per network), else ``U[0, 1]``."""
    left = torch.rand(m, n, generator=gen) < p[:, None]
    u = torch.rand(m, n, generator=gen)
    return torch.where(left, -u, u)


def _draws(config: SirenZooConfig, m: int, gen: torch.Generator
           ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """``m`` networks' parameters, input points and target points (float64), drawn from ``gen``."""
    spec = siren_spec(config.widths)
    params = {k: torch.randn(m, *s, generator=gen, dtype=torch.float64) for k, s in spec.param_shapes().items()}
    p = torch.rand(m, generator=gen, dtype=torch.float64)
    points = _draw_inputs(m, config.set_size, p, gen).double()
    return params, points, _draw_inputs(m, config.target_points, p, gen).double()


def _zoo_tensors(config: SirenZooConfig, params: dict[str, torch.Tensor], points: torch.Tensor,
                 target_inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """A chunk's stored tensors (float32): ``params/<name>``, ``points``, ``target_inputs``, ``features``,
    ``target`` and ``standard``, computed in float64."""
    acts, grads, features = siren_factors(params, points, config.widths, config.omega_0)
    t_acts, t_grads, _ = siren_factors(params, target_inputs, config.widths, config.omega_0)
    return {f"params/{k}": v.float() for k, v in params.items()} | {
        "points": points.float(), "target_inputs": target_inputs.float(), "features": features.float(),
        "target": _fisher_from_factors(t_acts, t_grads).float(), "standard": _fisher_from_factors(acts, grads).float()}


def _from_tensors(config: SirenZooConfig, t: dict[str, torch.Tensor]) -> SirenZoo:
    params = {k[len("params/"):]: v for k, v in t.items() if k.startswith("params/")}
    return SirenZoo(config, params, t["points"], t["target_inputs"], t["features"], t["target"], t["standard"])


def generate_siren_zoo(config: SirenZooConfig, chunk: int = 250, progress: bool = True) -> SirenZoo:
    """Draw the zoo (float64 generation, float32 storage), ``chunk`` networks at a time, every draw from one stream
    seeded by ``config.seed`` (the cached zoo of the curvature experiment; a sharded zoo draws each network from its
    own seed, see :func:`make_sharded_siren_zoo`)."""
    params, points, target_inputs = _draws(config, config.n_networks, torch.Generator().manual_seed(config.seed))
    parts = []
    for start in tqdm(range(0, config.n_networks, chunk), desc="SIREN zoo", unit="chunk", disable=not progress):
        sl = slice(start, start + chunk)
        parts.append(_zoo_tensors(config, {k: v[sl] for k, v in params.items()}, points[sl], target_inputs[sl]))
    return _from_tensors(config, {k: torch.cat([part[k] for part in parts]) for k in parts[0]})


def make_sharded_siren_zoo(config: SirenZooConfig, folder: str | os.PathLike, shard_size: int = 250,
                           rank: int | None = None, world: int | None = None, progress: bool = True) -> list[int]:
    """Make (or finish) the zoo of ``config`` as a sharded folder (:func:`~gradmetanet.zoos.make_sharded_zoo`), this
    process's share of the shards under ``torchrun``. Network ``i`` is drawn from its own seed ``(config.seed, i)``:
    the zoo is the same for any number of processes and shards, and is not the cached zoo of the same ``config``
    (one stream, kept so that earlier results stay reproducible). Train on its gradient sets lazily with
    ``ShardedZoo(folder).gradients(siren_spec(widths))`` and ``.column("target")``."""
    def shard(start: int, stop: int) -> dict[str, torch.Tensor]:
        draws = [_draws(config, 1, torch.Generator().manual_seed(config.seed * 1_000_003 + i))
                 for i in range(start, stop)]
        params = {k: torch.cat([d[0][k] for d in draws]) for k in draws[0][0]}
        return _zoo_tensors(config, params, torch.cat([d[1] for d in draws]), torch.cat([d[2] for d in draws]))

    return make_sharded_zoo(folder, "siren_zoo", config, config.n_networks, shard_size, shard,
                            lambda: {"networks": torch.tensor(config.n_networks)}, rank, world,
                            depends={"draws": "per-index seeds"}, progress=progress)


def load_sharded_siren_zoo(folder: str | os.PathLike) -> SirenZoo:
    """The SIREN zoo of a sharded folder made by :func:`make_sharded_siren_zoo`, every shard verified."""
    zoo, fields = complete_sharded_zoo(folder, "siren_zoo", "gradmetanet zoo make siren")
    return _from_tensors(SirenZooConfig(**fields), zoo.tensors())


def load_or_generate_siren_zoo(config: SirenZooConfig, cache_dir: str | os.PathLike | None,
                               progress: bool = True) -> SirenZoo:
    """The zoo of ``config`` from the verified cache in ``cache_dir`` (:func:`~gradmetanet.zoos.cached_zoo`), else
    generated and cached; ``cache_dir=None`` keeps nothing."""
    def to_tensors(zoo: SirenZoo) -> dict[str, torch.Tensor]:
        return {f"params/{k}": v for k, v in zoo.params.items()} | {
            "points": zoo.points, "target_inputs": zoo.target_inputs, "features": zoo.features, "target": zoo.target,
            "standard": zoo.standard}

    return cached_zoo("siren_zoo", config, lambda: generate_siren_zoo(config, progress=progress), to_tensors,
                      lambda t: _from_tensors(config, t), cache_dir, lambda zoo: {"networks": len(zoo.target)})
