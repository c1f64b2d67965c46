"""Meta-trained optimizers shipped inside the package, and the safetensors format they use.

A rule file holds the rule's meta-parameters (``UpdateRule.state_dict()``) and, as safetensors
metadata, the rule's name (``"optimizer"``, one of ``RULE_NAMES``), its recipe (``"rule"``: the
factory's arguments as JSON: sizes, ``set_size``, signatures; since version 0.9, so a rule of any
size loads without the configuration that made it) and free-form provenance (the meta-training
configuration and command). Every rule runs on MLPs of any depth and width, so a file does not
depend on the network it was meta-trained on. Files without a recipe (the shipped ones, written
before 0.9) are rebuilt with the default sizes (files of version 0.1 also carry an ``"n_layers"``
entry, which is ignored). :func:`pretrained` builds a drop-in optimizer from a
shipped file::

    opt = gradmetanet.lopt.pretrained("mlp-small", model)
    for x, y in loader:
        opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()
    opt.close()
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_replace
from ..metanets import LINEAR_SIGNATURES, TRANSFORMER_SIGNATURES
from .optimizers import RULE_NAMES, SIGNATURE_SETS, NetworkOptimizer, UpdateRule, make_rule

__all__ = ["PRETRAINED_DIR", "RENAMED", "available", "describe", "load_rule", "pretrained", "read_metadata",
           "save_rule", "ship", "shipped_path"]

#: Where the shipped rules live (``NAME.safetensors``).
PRETRAINED_DIR = Path(__file__).parent / "pretrained"

#: Names of shipped rules that were replaced, and their replacement. ``"digits-mlp"`` (version 0.2, meta-trained
#: on the [0, 1] digits alone, still shipped as ``"digits-mlp-v0.2"``) became ``"mlp-small"`` (version 0.6,
#: meta-trained on a family of MLP tasks).
RENAMED = {"digits-mlp": "mlp-small"}


def shipped_path(name: str) -> Path:
    """The file of the shipped rule ``name`` (a renamed one resolves to its replacement, with a warning)."""
    if name in RENAMED:
        warnings.warn(f"the shipped optimizer {name!r} was replaced by {RENAMED[name]!r} (meta-trained on a task "
                      f"family; see docs/learned_optimizers.md) and now loads it; the old rule is {name + '-v0.2'!r}",
                      FutureWarning, stacklevel=3)
        name = RENAMED[name]
    path = PRETRAINED_DIR / f"{name}.safetensors"
    if not path.is_file():
        raise ValueError(f"no shipped optimizer named {name!r}; available: {available()}")
    return path


def available() -> list[str]:
    """Names of the shipped optimizers."""
    return sorted(p.stem for p in PRETRAINED_DIR.glob("*.safetensors"))


def save_rule(rule: UpdateRule, name: str, path: str | os.PathLike, provenance: dict[str, str] | None = None) -> None:
    """Write ``rule`` (built by ``make_rule(name, ...)`` or a factory such as ``deepsets_rule(hidden=64)``) to
    ``path`` atomically, with its recipe; a rule the file could not rebuild is refused."""
    if name not in RULE_NAMES:
        raise ValueError(f"unknown optimizer {name!r}; choose from {list(RULE_NAMES)}")
    recipe = getattr(rule, "recipe", None)
    if recipe is None and not (name == "sgdm" and rule.per_parameter is None):
        raise ValueError("this rule was composed by hand (no recipe): a file could not rebuild it; build it with "
                         "make_rule or a rule factory (deepsets_rule, unf_rule, gradmetanet_ds_rule, ...)")
    if recipe is not None and recipe["optimizer"] != name:
        raise ValueError(f"the rule was built as {recipe['optimizer']!r}, not {name!r}")
    if recipe is not None and "signatures" in recipe and recipe["signatures"] is None:
        raise ValueError("the rule's weight-space layer has custom signatures, which a rule file cannot name; use "
                         f"one of {list(SIGNATURE_SETS)}")
    weights = {k: v.detach().contiguous().cpu() for k, v in rule.state_dict().items()}
    metadata = {"optimizer": name, **(provenance or {})}
    if recipe is not None:
        metadata["rule"] = json.dumps({k: v for k, v in recipe.items() if k != "optimizer"}, sort_keys=True)
    with atomic_replace(path) as tmp:
        save_file(weights, tmp, metadata=metadata)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a rule file (clear errors for a missing or corrupted file)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no rule file at {os.fspath(path)!r}")
    try:
        with safe_open(path, "pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{os.fspath(path)!r} is not a readable safetensors rule file ({err})") from err


def load_rule(path: str | os.PathLike) -> UpdateRule:
    """The rule stored at ``path`` (written by :func:`save_rule` or the lopt experiment), rebuilt from its recipe;
    a file without one gets the default sizes, and transformer signatures where the lopt experiment's config
    says ``task: lm``."""
    metadata = read_metadata(path)
    name = metadata.get("optimizer")
    if name not in RULE_NAMES:
        raise ValueError(f"{os.fspath(path)!r} names optimizer {name!r}; this version knows {list(RULE_NAMES)}")
    if "rule" in metadata:
        rule = make_rule(name, **json.loads(metadata["rule"]))
    else:
        task = json.loads(metadata["config"]).get("task") if "config" in metadata else None
        rule = make_rule(name, TRANSFORMER_SIGNATURES if task == "lm" else LINEAR_SIGNATURES)
    try:
        rule.load_state_dict(load_file(path))
    except RuntimeError as err:
        raise ValueError(f"{os.fspath(path)!r} does not match the {name!r} rule of this version ({err})") from err
    return rule


def pretrained(name: str, model: nn.Module) -> NetworkOptimizer:
    """A shipped meta-trained optimizer (see :func:`available`) bound to ``model``.

    Call :meth:`~gradmetanet.lopt.NetworkOptimizer.close` when done if the rule reads decomposed
    gradients (it registers capture hooks on the model).
    """
    rule = load_rule(shipped_path(name)).to(next(model.parameters()).device)
    for p in rule.parameters():
        p.requires_grad_(False)
    return NetworkOptimizer(model, rule)


def ship(source: str | os.PathLike, name: str, command: str) -> Path:
    """Copy a meta-trained rule file into the package as ``name``, recording the ``command`` that made it."""
    metadata = read_metadata(source)
    rule = load_rule(source)
    target = PRETRAINED_DIR / f"{name}.safetensors"
    PRETRAINED_DIR.mkdir(exist_ok=True)
    provenance = {k: v for k, v in metadata.items() if k not in ("optimizer", "n_layers", "rule")} | {"command": command}
    save_rule(rule, metadata["optimizer"], target, provenance)
    return target


def describe(name: str) -> dict[str, str]:
    """The provenance of a shipped optimizer (its metadata: rule, meta-training config and command)."""
    return read_metadata(shipped_path(name))
