"""LoRA adapters as data: the factors of every adapted layer, read from and written to PEFT's files.

A LoRA update of a layer is ``dW = s * B A`` with ``B: [out, r]``, ``A: [r, in]`` and the scaling
``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). ``(B M^-1, M A)`` gives the same ``dW`` for
every invertible ``M``, independently per layer: the spec of a :class:`LoraSet` has a ``GL(r)``
space per layer (``A: (row rank, col in)``, ``B: (row out, col rank)``), and the one transform of
the core moves adapters like any other parameters.

PEFT's format (``adapter_model.safetensors`` + ``adapter_config.json``): keys
``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight``; ``r``, ``lora_alpha``,
``use_rslora``, ``rank_pattern`` / ``alpha_pattern`` (per-module overrides), ``fan_in_fan_out``
(the base layer stores ``[in, out]``, so ``dW`` is transposed). safetensors lists keys sorted as
text (``layers.10`` before ``layers.2``): layers are paired by module path and ordered numerically.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_replace, atomic_write_text
from ..core.groups import GL, Trivial
from ..core.spec import Axis, NetworkSpec, Parameter, Space, SpecElement

__all__ = ["LoraLayer", "LoraSet", "LoraBatch", "UnsupportedAdapterError", "lora_spec", "pattern_key"]

_PREFIX = "base_model.model."
_WEIGHTS = "adapter_model.safetensors"
_CONFIG = "adapter_config.json"


class UnsupportedAdapterError(ValueError):
    """An adapter file uses a layout gradmetanet does not read (the message names it)."""


@dataclass(frozen=True)
class LoraLayer:
    """One adapted module: ``A: [r, in]``, ``B: [out, r]``, the scaling, and the base layer's layout."""

    path: str
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    fan_in_fan_out: bool = False

    def __post_init__(self) -> None:
        if self.A.dim() != 2 or self.B.dim() != 2 or self.A.shape[0] != self.B.shape[1]:
            raise ValueError(f"LoRA layer {self.path!r}: need A [r, in] and B [out, r], got {list(self.A.shape)} "
                             f"and {list(self.B.shape)}")

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)`` of ``B A``."""
        return self.B.shape[0], self.A.shape[1]

    def delta_weight(self) -> torch.Tensor:
        """``s * B A`` in the base layer's weight layout (``[out, in]``; ``[in, out]`` with ``fan_in_fan_out``)."""
        dw = self.scaling * (self.B @ self.A)
        return dw.T if self.fan_in_fan_out else dw


def _natural_key(path: str) -> list:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def pattern_key(keys: Sequence[str], path: str) -> str:
    """The key of ``rank_pattern`` / ``alpha_pattern`` that PEFT applies to the module at ``path``, or ``path``
    itself when none does.

    PEFT (0.14 on, ``peft.utils.other.get_pattern_key``) reads each key as a regular expression wrapped in a
    group, ``(.*\\.)?(KEY)$`` matched from the start of the module path, and takes the first key that matches in
    the config's order: an alternation ``q_proj|v_proj`` binds inside the group, and a key matches whole trailing
    components only (``_proj`` matches no ``q_proj``). The tests compare this with the installed PEFT.
    """
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", path):
            return key
    return path


def _pattern_value(patterns: Mapping[str, object], path: str, default, what: str, overlapping: str):
    """The value PEFT takes from ``patterns`` for module ``path`` (``default`` when no key matches).

    PEFT writes ``adapter_config.json`` with its keys sorted, so when several keys with different values
    match one module, the order that decided during training is lost (PEFT's own reload then takes the
    first key in the file's order, which may change the adapter's function): refused unless
    ``overlapping == "first"``.
    """
    keys = list(patterns)
    matching = [key for key in keys if pattern_key([key], path) == key]
    values = {patterns[key] for key in matching}
    if len(values) > 1 and overlapping != "first":
        listed = ", ".join(f"{key!r}: {patterns[key]}" for key in matching)
        raise UnsupportedAdapterError(
            f"module {path!r} matches several {what} keys with different values ({listed}). PEFT writes the "
            "config with sorted keys, so the order that chose one of them during training is lost, and PEFT's own "
            "reload takes the first in the file, which may not be the one trained with. Rewrite the config so that "
            "one key matches each module, or pass overlapping_patterns='first' to read it as PEFT reloads it.")
    return patterns.get(pattern_key(keys, path), default)


@dataclass(frozen=True)
class LoraSet:
    """The LoRA layers of one fine-tune, in numeric module order."""

    layers: tuple[LoraLayer, ...]

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("a LoraSet needs at least one adapted layer")
        paths = [layer.path for layer in self.layers]
        if len(set(paths)) != len(paths):
            raise ValueError(f"duplicate module paths in a LoraSet: {paths}")
        object.__setattr__(self, "layers", tuple(sorted(self.layers, key=lambda layer: _natural_key(layer.path))))

    # ------------------------------------------------------------------ views
    def __len__(self) -> int:
        return len(self.layers)

    @property
    def paths(self) -> list[str]:
        return [layer.path for layer in self.layers]

    @property
    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        """Module path -> ``(out, in)``: what the models on LoRAs are built for."""
        return {layer.path: layer.shape for layer in self.layers}

    def delta_weights(self) -> dict[str, torch.Tensor]:
        """Module path -> ``dW`` with its scaling, in the base layer's weight layout."""
        return {layer.path: layer.delta_weight() for layer in self.layers}

    def spec(self) -> NetworkSpec:
        """A ``GL(r_l)`` space per layer and its input and output spaces (``Trivial``); parameters
        ``{path}.lora_A: (row rank, col in)`` and ``{path}.lora_B: (row out, col rank)``."""
        return lora_spec(self.layer_shapes, {layer.path: layer.rank for layer in self.layers})

    def tensors(self) -> dict[str, torch.Tensor]:
        """``{path}.lora_A`` / ``{path}.lora_B`` -> the factors (the parameter names of :meth:`spec`)."""
        out = {}
        for layer in self.layers:
            out[f"{layer.path}.lora_A"], out[f"{layer.path}.lora_B"] = layer.A, layer.B
        return out

    def transform(self, element: SpecElement) -> "LoraSet":
        """Move the factors by a group element of :meth:`spec` (``A <- M A``, ``B <- B M^-1`` per layer)."""
        moved = self.spec().transform_parameters(self.tensors(), element)
        return LoraSet(tuple(LoraLayer(layer.path, moved[f"{layer.path}.lora_A"], moved[f"{layer.path}.lora_B"],
                                       layer.scaling, layer.fan_in_fan_out) for layer in self.layers))

    # ------------------------------------------------------------------ PEFT files
    @classmethod
    def from_peft(cls, directory: str | os.PathLike, device: str | torch.device = "cpu",
                  overlapping_patterns: Literal["refuse", "first"] = "refuse", skip_non_lora: bool = False
                  ) -> "LoraSet":
        """Read a PEFT LoRA adapter directory (``adapter_model.safetensors`` + ``adapter_config.json``).

        ``rank_pattern`` / ``alpha_pattern`` keys are matched as PEFT matches them (:func:`pattern_key`). A module
        that several keys match with different values is refused (the training order of the keys is not in the
        file); ``overlapping_patterns="first"`` takes the first key in the file's order, as PEFT's reload does.
        Tensors that are not LoRA factors (``modules_to_save`` heads, ``lora_B`` biases of ``lora_bias=True``) are
        refused, or with ``skip_non_lora=True`` left out with a warning that names them (the set then describes the
        factors only, not everything the adapter changes).
        """
        if overlapping_patterns not in ("refuse", "first"):
            raise ValueError(f"overlapping_patterns must be 'refuse' or 'first', got {overlapping_patterns!r}")
        directory = Path(directory)
        weights, config_path = directory / _WEIGHTS, directory / _CONFIG
        if not config_path.is_file():
            raise FileNotFoundError(f"no {_CONFIG} in {os.fspath(directory)!r}; is it a PEFT adapter directory?")
        if not weights.is_file():
            found = " (an adapter_model.bin: re-save it with safetensors)" if (directory / "adapter_model.bin").exists() \
                else ""
            raise FileNotFoundError(f"no {_WEIGHTS} in {os.fspath(directory)!r}{found}")
        config = json.loads(config_path.read_text())
        if config.get("peft_type", "LORA") != "LORA":
            raise UnsupportedAdapterError(f"peft_type {config.get('peft_type')!r}: only LoRA adapters are read")
        if config.get("use_dora"):
            raise UnsupportedAdapterError("DoRA adapters (use_dora) are not supported: they add a magnitude vector")
        tensors = load_file(weights, device=str(device))
        skipped = [k for k in tensors if _factor_key(k) is None and "lora_embedding_" not in k
                   and "lora_magnitude_vector" not in k]
        if skipped and skip_non_lora:
            warnings.warn(f"{os.fspath(directory)!r}: left out {len(skipped)} tensors that are not LoRA factors: "
                          f"{skipped}", stacklevel=2)
            tensors = {k: v for k, v in tensors.items() if k not in skipped}
        return cls(tuple(_layers_from(tensors, config, overlapping_patterns)))

    def to_peft(self, directory: str | os.PathLike, base_model_name_or_path: str | None = None) -> None:
        """Write PEFT's format (a ``r`` / ``lora_alpha`` shared by most layers, patterns for the others)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        ranks = [layer.rank for layer in self.layers]
        r = max(set(ranks), key=ranks.count)
        fan = {layer.fan_in_fan_out for layer in self.layers}
        if len(fan) > 1:
            raise ValueError("PEFT stores one fan_in_fan_out for all layers; these layers mix both layouts")
        alphas = {layer.path: layer.scaling * layer.rank for layer in self.layers}     # alpha = s * r (no rsLoRA)
        common_alpha = max(set(alphas.values()), key=list(alphas.values()).count)
        config = {
            "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
            "r": r, "lora_alpha": common_alpha, "use_rslora": False, "use_dora": False,
            "target_modules": self.paths, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": fan.pop(),
            "rank_pattern": {_exact(l.path): l.rank for l in self.layers if l.rank != r},
            "alpha_pattern": {_exact(p): a for p, a in alphas.items() if a != common_alpha},
            "init_lora_weights": True, "modules_to_save": None,
        }
        tensors = {}
        for layer in self.layers:
            tensors[f"{_PREFIX}{layer.path}.lora_A.weight"] = layer.A.detach().contiguous().cpu()
            tensors[f"{_PREFIX}{layer.path}.lora_B.weight"] = layer.B.detach().contiguous().cpu()
        with atomic_replace(directory / _WEIGHTS) as tmp:
            save_file(tensors, tmp, metadata={"format": "pt"})
        atomic_write_text(directory / _CONFIG, json.dumps(config, indent=2))


def lora_spec(layer_shapes: Mapping[str, tuple[int, int]], ranks: Mapping[str, int]) -> NetworkSpec:
    """The spec of adapters on ``layer_shapes`` (path -> ``(out, in)``) with ``ranks`` (path -> r)."""
    spaces, params = [], []
    for p, (out, inp) in layer_shapes.items():
        spaces += [Space(f"{p}:in", inp, Trivial()), Space(f"{p}:rank", ranks[p], GL()), Space(f"{p}:out", out, Trivial())]
        params += [Parameter(f"{p}.lora_A", (Axis("row", f"{p}:rank"), Axis("col", f"{p}:in"))),
                   Parameter(f"{p}.lora_B", (Axis("row", f"{p}:out"), Axis("col", f"{p}:rank")))]
    return NetworkSpec(tuple(spaces), (), tuple(params))


def _exact(path: str) -> str:
    """A pattern key that matches exactly this module path and no longer one ending in it (PEFT matches keys as
    regexes after an optional prefix ``(.*\\.)?``; ``^`` holds only when that prefix is empty)."""
    return "^" + re.escape(path)


def _factor_key(key: str) -> re.Match | None:
    """``(module path, "A" | "B")`` groups of a LoRA factor's key in PEFT's file, or ``None``."""
    return re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)


def _layers_from(tensors: Mapping[str, torch.Tensor], config: Mapping, overlapping: str = "refuse"
                 ) -> list[LoraLayer]:
    """Pair ``lora_A`` / ``lora_B`` by module path; scalings from the config and its patterns."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if "lora_magnitude_vector" in key:
            raise UnsupportedAdapterError(f"{key!r}: DoRA adapters (magnitude vectors) are not supported")
        if "lora_embedding_" in key:
            raise UnsupportedAdapterError(f"{key!r}: LoRA on embeddings is not supported yet (linear layers only)")
        match = _factor_key(key)
        if match is None:
            raise UnsupportedAdapterError(f"{key!r} is not a LoRA factor of a linear layer (lora_A / lora_B weight): "
                                          "a modules_to_save head or a lora_bias? from_peft(..., skip_non_lora=True) "
                                          "reads the factors and names what it leaves out")
        path, which = match.groups()
        if value.dim() != 2:
            raise UnsupportedAdapterError(f"{key!r} has shape {list(value.shape)}: convolutional LoRA is not "
                                          "supported (linear layers only)")
        factors.setdefault(path, {})[which] = value
    r, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    layers = []
    for path, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"module {path!r} has lora_{''.join(pair)} but not both lora_A and lora_B")
        rank = pair["A"].shape[0]
        declared = int(_pattern_value(rank_pattern, path, r, "rank_pattern", overlapping))
        if declared != rank:
            raise ValueError(f"module {path!r}: lora_A has rank {rank} but the config says r = {declared}")
        a = float(_pattern_value(alpha_pattern, path, alpha, "alpha_pattern", overlapping))
        scaling = a / math.sqrt(rank) if config.get("use_rslora") else a / rank
        layers.append(LoraLayer(path, pair["A"], pair["B"], scaling, bool(config.get("fan_in_fan_out", False))))
    if not layers:
        raise ValueError("the adapter file holds no LoRA factors")
    return layers


@dataclass(frozen=True)
class LoraBatch:
    """``N`` LoRA sets of one base model, stacked per layer: ``A[path]: [N, r_path, in]``, ``B[path]: [N, out, r_path]``.

    Ranks may differ from layer to layer (PEFT's ``rank_pattern``), not from set to set; ``fan_in_fan_out``
    names the layers whose base weight is stored ``[in, out]`` (GPT-2's ``Conv1D``).
    """

    paths: tuple[str, ...]
    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    scaling: dict[str, torch.Tensor]
    fan_in_fan_out: frozenset[str] = frozenset()

    @classmethod
    def stack(cls, sets: Sequence[LoraSet]) -> "LoraBatch":
        if not sets:
            raise ValueError("LoraBatch.stack needs at least one LoraSet")
        paths = tuple(sets[0].paths)
        by = [{layer.path: layer for layer in s.layers} for s in sets]
        for i, s in enumerate(sets[1:], 1):
            if tuple(s.paths) != paths or s.layer_shapes != sets[0].layer_shapes:
                raise ValueError(f"LoRA set {i} adapts other modules or shapes than set 0; a batch shares one base "
                                 "model and one set of adapted modules")
            ranks = [p for p in paths if by[i][p].rank != by[0][p].rank]
            if ranks:
                raise ValueError(f"LoRA set {i} has other ranks than set 0 at {ranks} "
                                 f"({[by[i][p].rank for p in ranks]} vs {[by[0][p].rank for p in ranks]}): stack sets "
                                 "whose layers have equal ranks (models run on any rank, batch by batch)")
            flips = [p for p in paths if by[i][p].fan_in_fan_out != by[0][p].fan_in_fan_out]
            if flips:
                raise ValueError(f"LoRA set {i} stores the base weights of {flips} in another layout than set 0")
        return cls(paths, {p: torch.stack([b[p].A for b in by]) for p in paths},
                   {p: torch.stack([b[p].B for b in by]) for p in paths},
                   {p: torch.tensor([b[p].scaling for b in by]) for p in paths},
                   frozenset(p for p in paths if by[0][p].fan_in_fan_out))

    def __len__(self) -> int:
        return next(iter(self.A.values())).shape[0]

    @property
    def ranks(self) -> dict[str, int]:
        """Module path -> the rank of its factors."""
        return {p: self.A[p].shape[1] for p in self.paths}

    @property
    def rank(self) -> int:
        """The one rank of every layer (raises for a batch whose layers have several ranks)."""
        ranks = set(self.ranks.values())
        if len(ranks) > 1:
            raise ValueError(f"this batch's layers have ranks {self.ranks} (a rank_pattern); models built for one "
                             "rank cannot read it, GL-net and the rank-free models can")
        return ranks.pop()

    @property
    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        return {p: (self.B[p].shape[1], self.A[p].shape[2]) for p in self.paths}

    def spec(self) -> NetworkSpec:
        """As :meth:`LoraSet.spec` (the batch axis leads every tensor)."""
        return lora_spec(self.layer_shapes, self.ranks)

    def transform(self, element: SpecElement) -> "LoraBatch":
        """Every set moved by the same element of :meth:`spec` (``A <- M A``, ``B <- B M^-1`` per layer)."""
        tensors = {f"{p}.lora_A": self.A[p] for p in self.paths} | {f"{p}.lora_B": self.B[p] for p in self.paths}
        moved = self.spec().transform_parameters(tensors, element, leading=1)
        return LoraBatch(self.paths, {p: moved[f"{p}.lora_A"] for p in self.paths},
                         {p: moved[f"{p}.lora_B"] for p in self.paths}, self.scaling, self.fan_in_fan_out)

    def delta_weights(self) -> dict[str, torch.Tensor]:
        """Module path -> ``[N, *weight shape]`` scaled ``B A`` in the base layer's layout (``[N, out, in]``;
        ``[N, in, out]`` for the ``fan_in_fan_out`` layers), as :meth:`LoraSet.delta_weights`."""
        out = {}
        for p in self.paths:
            dw = self.scaling[p].to(self.B[p].dtype).view(-1, 1, 1) * (self.B[p] @ self.A[p])
            out[p] = dw.transpose(1, 2) if p in self.fan_in_fan_out else dw
        return out
