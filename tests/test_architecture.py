"""The shape of the library: no import cycle, and every import points down the layer table.

The import graph is read from the source with :mod:`ast` (nothing is imported): every
``import``/``from ... import`` statement of every library file (``combireg/`` and ``cli/``, which
is the package ``combireg.cli``) counts, at module level or inside a function, relative or
absolute, under ``if TYPE_CHECKING`` too. ``from . import io`` is an edge to the module
``combireg.io``; ``from .errors import CombiregError`` an edge to ``combireg.errors``. Importing a
submodule also runs its parent package's ``__init__``, which is not counted as an edge (every
module would otherwise depend on the front door ``combireg``).

:data:`LAYERS` is the layer table of DESIGN.md with today's module names: a module may import
modules of its own layer (as long as there is no cycle) and of the layers below it.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterable, Mapping

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Library source folders and the package each one is.
SOURCES = {"combireg": ROOT / "combireg", "combireg.cli": ROOT / "cli"}

#: (layer, what it owns, modules), bottom up. A name ending in ".*" is a package with all its modules.
LAYERS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (1, "foundations", ("combireg.errors", "combireg.version", "combireg.geometry", "combireg.image",
                        "combireg.filters", "combireg.device")),
    (2, "formats and settings", ("combireg.io", "combireg.paramfile", "combireg.params", "combireg.outputs",
                                 "combireg.landmarks", "combireg.overlap", "combireg.cases")),
    (3, "engine", ("combireg.losses", "combireg.warp", "combireg.pyramid", "combireg.optimize", "combireg.quality",
                   "combireg.rigid", "combireg.sequences")),
    (4, "tools around the engine", ("combireg.elastix_driver", "combireg.preprocess", "combireg.network",
                                    "combireg.deformations", "combireg.template", "combireg.synth",
                                    "combireg.synth_varied", "combireg.apply")),
    (5, "one registration", ("combireg.api", "combireg.adapters.*", "combireg.training_data", "combireg.train")),
    (6, "studies", ("combireg.executor", "combireg.methods", "combireg.summary", "combireg.evaluate",
                    "combireg.compare", "combireg.batch")),
    (7, "front end", ("combireg", "combireg.cli.*")),
)


# ------------------------------------------------------------------------------ the graph
def module_names(sources: Mapping[str, Path] = SOURCES) -> dict[str, Path]:
    """Every library module's dotted name and file (``__init__.py`` is its package)."""
    modules = {}
    for package, folder in sources.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _resolve(name: str, modules: Iterable[str]) -> str | None:
    """The longest library module that ``name`` (a dotted name) is or lies in; None outside."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imports_of(module: str, path: Path, modules: Iterable[str]) -> set[str]:
    """The library modules that one file's import statements name (all of them, anywhere)."""
    modules = set(modules)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from pkg import name`: the submodule pkg.name where there is one, else pkg itself.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            resolved = _resolve(target, modules)
            if resolved is not None and resolved != module:
                found.add(resolved)
    return found


def import_graph(sources: Mapping[str, Path] = SOURCES) -> dict[str, set[str]]:
    """Module -> the library modules it imports."""
    modules = module_names(sources)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None when the graph has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def layer_of(module: str, layers=LAYERS) -> int | None:
    """The layer of a module in the table (exact names first, then ``package.*`` entries)."""
    for number, _, names in layers:
        if module in names:
            return number
    for number, _, names in layers:
        for name in names:
            if name.endswith(".*") and (module == name[:-2] or module.startswith(name[:-1])):
                return number
    return None


def upward_imports(graph: Mapping[str, Iterable[str]], layers=LAYERS) -> list[str]:
    """Every import from a module to one in a higher layer, as ``a (layer) -> b (layer)``."""
    wrong = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if layer_of(target, layers) > layer_of(module, layers):
                wrong.append(f"{module} ({layer_of(module, layers)}) -> {target} ({layer_of(target, layers)})")
    return wrong


# ------------------------------------------------------------------------------ the library
@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_graph_sees_every_kind_of_import(graph):
    assert len(graph) > 30
    assert "combireg.preprocess" in graph["combireg.api"]  # inside a function, relative
    assert "combireg.io" in graph["combireg.outputs"]  # `from . import io` inside a function
    assert "combireg.api" in graph["combireg"]  # the package's lazy __getattr__
    assert "combireg.cli.common" in graph["combireg.cli.run_cmd"]  # relative, in cli/
    assert "combireg.preprocess" in graph["combireg.cli.preprocess_cmd"]  # `from combireg import preprocess`
    assert "combireg.outputs" in graph["combireg.adapters.elastix"]  # two dots, inside a method


def test_no_import_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_is_in_the_layer_table(graph):
    missing = sorted(m for m in graph if layer_of(m) is None)
    assert not missing, f"modules missing from LAYERS in {Path(__file__).name}: {', '.join(missing)}"


def test_imports_point_down_the_layers(graph):
    wrong = upward_imports(graph)
    assert not wrong, "imports into a higher layer:\n" + "\n".join(wrong)


# ------------------------------------------------------------------------------ the checks themselves
def test_find_cycle_reports_the_cycle_path():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"x": {"y"}, "y": {"y2"}, "y2": {"y"}}) == ["y", "y2", "y"]


def test_upward_imports_are_found():
    layers = ((1, "low", ("p.low",)), (2, "high", ("p.high", "p.pkg.*")))
    assert upward_imports({"p.low": {"p.high"}, "p.high": {"p.low"}}, layers) == ["p.low (1) -> p.high (2)"]
    assert upward_imports({"p.low": {"p.pkg.sub"}, "p.pkg": {"p.low"}}, layers) == ["p.low (1) -> p.pkg.sub (2)"]
    assert upward_imports({"p.high": {"p.low", "p.pkg"}, "p.low": set()}, layers) == []


def test_imports_are_read_from_source(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .version import v\n\ndef f():\n    from . import a\n")
    (pkg / "version.py").write_text("v = 1\n")
    (pkg / "a.py").write_text("import os\nfrom pkg.sub import b as _b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .. import a\n"
                                      "def g():\n    from ..version import v\n    from . import c\n")
    (pkg / "sub" / "c.py").write_text("from pkg import v\n")
    graph = import_graph({"pkg": pkg})
    assert graph == {"pkg": {"pkg.version", "pkg.a"}, "pkg.version": set(), "pkg.a": {"pkg.sub.b"},
                     "pkg.sub": set(), "pkg.sub.b": {"pkg.a", "pkg.version", "pkg.sub.c"}, "pkg.sub.c": {"pkg"}}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]  # the TYPE_CHECKING import counts
