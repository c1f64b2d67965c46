"""The package's import graph (DESIGN v3, "Layers and packages"): imports run one way. Read from the source with
``ast``, so an import inside a function counts as much as one at the top."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import gradmetanet

PACKAGE = Path(gradmetanet.__file__).parent
#: packages kept only as aliases of earlier layouts (0.8: nn, weightspace; 0.9: amortize): nothing inside the
#: package may import them (the old module paths of 0.9 are served by ``gradmetanet.moved``)
ALIASES = {"nn", "weightspace", "amortize"}
#: DESIGN v3's layers, bottom first: a package imports only from its own layer's utilities and from layers below
LAYERS = [
    {"core", "atomic", "errors", "plots", "timing", "provenance", "distributed", "performance", "moved"},
    {"models", "data", "lora"},
    {"capture"},
    {"integrations", "features"},
    {"metanets", "testing"},
    {"lopt", "zoos"},
    {"experiments", "demo"},
    {"cli"},
]
RANK = {name: rank for rank, layer in enumerate(LAYERS) for name in layer}
#: where an import inside a function is allowed: the command line loads what a command needs when it runs
LAZY_ALLOWED = {"gradmetanet.cli"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> list[tuple[str, str, bool]]:
    """``(importer, imported, inside_a_function)`` for every import of a gradmetanet module by another
    (``TYPE_CHECKING`` blocks left out: they do not run)."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        importer = module_name(path)
        package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        type_checking = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                         and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        functions = {id(n) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                     for n in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in type_checking:
                continue
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets = [target]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                if target.startswith("gradmetanet"):
                    found.append((importer, target, id(node) in functions))
    return found


def unit(module: str) -> str:
    """The package a module belongs to (``core``, ``capture``, ...), or the module itself at the top level."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


def unit_graph(edges: list[tuple[str, str, bool]]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for importer, imported, _ in edges:
        a, b = unit(importer), unit(imported)
        if a != b and a not in ALIASES | {"<root>"}:
            graph[a].add(b)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or ``None``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None


def test_no_circle_between_packages():
    graph = unit_graph(imports())
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def layer_violations(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """The edges of ``graph`` that run sideways or up the layers (a bottom-layer utility may import another)."""
    return sorted((a, b) for a, targets in graph.items() for b in targets
                  if RANK[b] > RANK[a] or (RANK[b] == RANK[a] and RANK[a] > 0))


def test_the_layer_check_sees_upward_and_sideways_imports():
    assert layer_violations({"zoos": {"metanets", "core"}, "metanets": {"zoos"}, "lopt": {"zoos"},
                             "atomic": {"errors"}}) == [("lopt", "zoos"), ("metanets", "zoos")]


def test_every_import_runs_down_the_layers():
    """No package imports one of its own layer or above (the utilities of the bottom layer import nothing up)."""
    graph = unit_graph(imports())
    unplaced = sorted((set(graph) | {b for targets in graph.values() for b in targets}) - set(RANK) - ALIASES)
    assert not unplaced, f"packages not in LAYERS: {unplaced}"
    assert not layer_violations(graph), f"imports that run sideways or up: {layer_violations(graph)}"


def test_core_imports_nothing_outside_core():
    bad = sorted({(a, b) for a, b, _ in imports() if unit(a) == "core" and unit(b) != "core"})
    assert not bad, bad


def test_no_import_inside_a_function_outside_the_cli():
    bad = sorted({(a, b) for a, b, lazy in imports() if lazy and a not in LAZY_ALLOWED})
    assert not bad, bad


def test_nothing_imports_the_experiments_or_the_aliases():
    edges = imports()
    experiments = sorted({a for a, b, _ in edges if unit(b) == "experiments" and unit(a) not in ("experiments",)
                          and a != "gradmetanet.cli"})
    assert not experiments, experiments
    aliases = sorted({a for a, b, _ in edges if unit(b) in ALIASES and unit(a) not in ALIASES})
    assert not aliases, aliases


def test_the_module_paths_of_0_9_still_import_with_a_warning():
    import importlib
    import warnings

    from gradmetanet.capture import GradientSet
    from gradmetanet.moved import MOVED_MODULES
    from gradmetanet.zoos.classifier import ClassifierZooConfig

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.import_module("gradmetanet.data.classifier_zoo")
        from gradmetanet.gradients import GradientSet as OldGradientSet
        from gradmetanet.data import SirenZoo  # noqa: F401 (a name the package exported)
    assert old.ClassifierZooConfig is ClassifierZooConfig and OldGradientSet is GradientSet
    assert any("gradmetanet.zoos.classifier" in str(w.message) for w in caught)
    assert old.__spec__.name == "gradmetanet.zoos.classifier"      # the module keeps its own identity
    for old_path, new_path in MOVED_MODULES.items():
        assert importlib.import_module(old_path) is importlib.import_module(new_path)


def test_the_aliases_of_the_old_layout_still_import():
    from gradmetanet.features import NeuronNormaliser, WeightSpaceFeatures
    from gradmetanet.metanets import DWSNet, GradMetaNet
    from gradmetanet.nn import GradMetaNet as OldGradMetaNet, NeuronNormaliser as OldNormaliser
    from gradmetanet.weightspace import DWSNet as OldDWSNet, WeightSpaceFeatures as OldFeatures

    assert (OldGradMetaNet, OldNormaliser, OldDWSNet, OldFeatures) == (GradMetaNet, NeuronNormaliser, DWSNet,
                                                                       WeightSpaceFeatures)


def test_no_module_is_defined_under_experiments():
    """Models live in the library (an experiment composes them): the INR editor and the zoo fine-tuner are one
    :class:`~gradmetanet.metanets.WeightEditor`."""
    defined = []
    for path in (PACKAGE / "experiments").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any("Module" in ast.unparse(b) for b in node.bases):
                defined.append(f"{path.name}:{node.name}")
    assert not defined, defined
