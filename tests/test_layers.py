"""The package imports one way: no cycle between modules or subpackages, function-level imports included,
and every module imports only from its own layer or the layers below it (docs/architecture.md)."""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mpmae"

#: The layers, lowest first: a module may import from its own layer and the ones listed before it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("mpmae.atomic", "mpmae.storage", "mpmae.modalities", "mpmae.tasks", "mpmae.architectures", "mpmae.tables"),
    ("mpmae.config",),
    ("mpmae.data", "mpmae.pretext_losses", "mpmae.telemetry", "mpmae.tracking"),
    ("mpmae.models",),
    ("mpmae.optim", "mpmae.checkpoint", "mpmae.reference_checkpoint"),
    ("mpmae.export",),
    ("mpmae.evaluation",),
    ("mpmae.runtime",),
    ("mpmae.train", "mpmae.viz"),
    ("mpmae.finetune",),
    ("mpmae.tune", "mpmae.benchmark"),
    ("mpmae.dashboards", "mpmae.cluster"),
    ("mpmae.cli", "mpmae"),
)


@functools.cache
def module_files() -> dict[str, Path]:
    """Dotted module name -> file, packages by their ``__init__``."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_names(path: Path, module: str) -> Iterator[str]:
    """Every ``mpmae`` name a module imports, at any depth of its AST (so lazy imports count too)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """Module -> the modules it imports (``from pkg import name`` resolves to the module ``name`` if it is one)."""
    modules = module_files()

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = {owner(name) for name in imported_names(path, module) if name.split(".")[0] == "mpmae"}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a closed path, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return [*stack[stack.index(target):], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def subpackage(module: str) -> str:
    """``mpmae.train.worker`` -> ``mpmae.train``; top-level modules stand for themselves."""
    return ".".join(module.split(".")[:2])


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        source = subpackage(module)
        packages.setdefault(source, set()).update(subpackage(t) for t in targets if subpackage(t) != source)
    return packages


def layer_of(module: str) -> int:
    for index, members in enumerate(LAYERS):
        if subpackage(module) in members:
            return index
    raise AssertionError(f"{module} is in no layer of LAYERS: add it where it belongs")


def test_the_graph_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    """The parser itself: an import inside a function and a relative import are edges."""
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from mpmae.models import convnextv2\n    from .step import unwrap\n")
    assert set(imported_names(path, "mpmae.train.m")) == {
        "mpmae.models", "mpmae.models.convnextv2", "mpmae.train.step", "mpmae.train.step.unwrap"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_itself_back() -> None:
    assert find_cycle(import_graph()) is None


def test_no_subpackage_imports_itself_back() -> None:
    assert find_cycle(package_graph(import_graph())) is None


@pytest.mark.parametrize("module", sorted(module_files()))
def test_imports_go_down_the_layers(module: str) -> None:
    upward = sorted(t for t in import_graph()[module] if layer_of(t) > layer_of(module))
    assert not upward, f"{module} (layer {layer_of(module)}) imports from higher layers: {upward}"
