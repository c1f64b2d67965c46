"""Module paths of the 0.9.0 layout, kept importing (deprecated, until 1.0).

``import gradmetanet.data.classifier_zoo`` (or ``from gradmetanet.batch import GradientBatch``) gives the module at
its new home, once, with a :class:`DeprecationWarning` naming that home. Nothing inside the package uses the old
paths (``tests/test_architecture.py`` checks it).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

__all__ = ["MOVED_MODULES", "MOVED_NAMES", "install", "moved_name"]

#: old module path -> new module path
MOVED_MODULES = {
    "gradmetanet.data.siren_zoo": "gradmetanet.zoos.siren",
    "gradmetanet.data.inr_zoo": "gradmetanet.zoos.inr",
    "gradmetanet.data.classifier_zoo": "gradmetanet.zoos.classifier",
    "gradmetanet.data.lora_zoo": "gradmetanet.zoos.lora",
    "gradmetanet.data.lora_lm_zoo": "gradmetanet.zoos.lora_lm",
    "gradmetanet.amortize.objective": "gradmetanet.zoos.objective",
    "gradmetanet.amortize.sgd": "gradmetanet.zoos.sgd",
    "gradmetanet.amortize.model": "gradmetanet.metanets.finetuner",
    "gradmetanet.gradients": "gradmetanet.capture.gradients",
    "gradmetanet.batch": "gradmetanet.features.neurons",
    "gradmetanet.training": "gradmetanet.metanets.training",
    "gradmetanet.basenets": "gradmetanet.models.mlp",
}


#: names that packages exported in 0.9.0 and no longer hold: package -> {name: the module that holds it now}
MOVED_NAMES = {
    "gradmetanet.data": {"SirenZoo": "gradmetanet.zoos", "SirenZooConfig": "gradmetanet.zoos",
                         "load_or_generate_siren_zoo": "gradmetanet.zoos", "siren_module": "gradmetanet.models",
                         "siren_spec": "gradmetanet.models"},
}


def moved_name(package: str, name: str) -> object:
    """``package.name`` from its new home (with a :class:`DeprecationWarning`), for a package's ``__getattr__``."""
    new = MOVED_NAMES.get(package, {}).get(name)
    if new is None:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    warnings.warn(f"{package}.{name} is now {new}; the old path goes in gradmetanet 1.0",
                  DeprecationWarning, stacklevel=3)
    return getattr(importlib.import_module(new), name)


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module path and loads it as the module at its new home."""

    def __init__(self) -> None:
        self._specs: dict[str, importlib.machinery.ModuleSpec] = {}

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED_MODULES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED_MODULES[spec.name]
        warnings.warn(f"{spec.name} is now {new}; the old path goes in gradmetanet 1.0",
                      DeprecationWarning, stacklevel=3)
        module = importlib.import_module(new)
        self._specs[new] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        """The module at its new home has run already; give it back its own spec (the import system set the old
        path's)."""
        module.__spec__ = self._specs[module.__name__]


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
