"""The package layout as a test: what may import what, read from the source with `ast`.

Three rules (docs/architecture.md, "Packages and their one-way dependencies"):

1. The four packages import only leftward: data_tools <- pretrain <- index <- eval, and none of
   them imports the top-level `benchmarks/` folder (it is not installed).
2. No import cycle between modules, counting imports inside functions too: a lazy import only
   hides a cycle from the interpreter, not from the reader.
3. No module uses another module's `_private` name, neither `from m import _name` nor `m._name`.

Each rule is checked on the real tree and, so that the checker itself cannot silently pass, on
small hand-written trees that break it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Leftmost first: a package may import the packages at or before its own position.
PACKAGES = ("data_tools", "pretrain", "index", "eval")
NAMESPACE = "clipforge"


@dataclass(frozen=True)
class ImportEdge:
    """One import in one module: who imports what, where, and which names it takes."""

    importer: str
    """Dotted module name of the importing file, e.g. `clipforge.index.build`."""
    imported: str
    """Dotted name of the imported module (for `from pkg import mod`: the submodule, if one)."""
    names: tuple[str, ...]
    """The names taken by a `from ... import` (empty for `import x`)."""
    line: int
    """Line number in the importing file."""


def module_files(root: Path) -> dict[str, Path]:
    """Every product module under ROOT, keyed by its installed dotted name."""
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((NAMESPACE, *parts))] = path
    return modules


def _resolve_relative(importer: str, is_package: bool, level: int, module: str | None) -> str:
    base = importer.split(".")
    # A package's __init__ is its own anchor for `from . import x`; a plain module's is its parent.
    keep = len(base) - level + (1 if is_package else 0)
    anchor = base[:keep]
    return ".".join(anchor + ([module] if module else []))


def import_edges(modules: dict[str, Path]) -> list[ImportEdge]:
    """All imports of the product modules, absolute and relative, at any depth of the code."""
    edges: list[ImportEdge] = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    edges.append(ImportEdge(name, alias.name, (), node.lineno))
            elif isinstance(node, ast.ImportFrom):
                target = (
                    _resolve_relative(name, is_package, node.level, node.module)
                    if node.level
                    else (node.module or "")
                )
                names = tuple(alias.name for alias in node.names)
                # `from clipforge.index import build` imports the module clipforge.index.build.
                submodules = [n for n in names if f"{target}.{n}" in modules]
                for sub in submodules:
                    edges.append(ImportEdge(name, f"{target}.{sub}", (), node.lineno))
                rest = tuple(n for n in names if n not in submodules)
                if rest or not submodules:
                    edges.append(ImportEdge(name, target, rest, node.lineno))
    return edges


def package_of(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) >= 2 and parts[0] == NAMESPACE and parts[1] in PACKAGES:
        return parts[1]
    return None


def upward_imports(edges: list[ImportEdge]) -> list[str]:
    """Imports that point right (e.g. pretrain importing index) or into `benchmarks`."""
    bad = []
    for edge in edges:
        source = package_of(edge.importer)
        if edge.imported == "benchmarks" or edge.imported.startswith("benchmarks."):
            bad.append(f"{edge.importer}:{edge.line} imports {edge.imported} (not installed)")
            continue
        target = package_of(edge.imported)
        if source and target and PACKAGES.index(target) > PACKAGES.index(source):
            where = f"{edge.importer}:{edge.line}"
            bad.append(f"{where} imports {edge.imported} ({source} -> {target})")
    return bad


def _owning_module(name: str, modules: dict[str, Path]) -> str | None:
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_cycles(edges: list[ImportEdge], modules: dict[str, Path]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for edge in edges:
        target = _owning_module(edge.imported, modules)
        # A package's __init__ re-exporting its own modules is not a cycle worth flagging.
        if target and target != edge.importer and not edge.importer.startswith(target + "."):
            graph[edge.importer].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def private_uses(edges: list[ImportEdge], modules: dict[str, Path]) -> list[str]:
    """`from other import _x` and `other._x`, where `other` is a different clipforge module."""
    bad = []
    for edge in edges:
        if not edge.imported.startswith(NAMESPACE + ".") or edge.imported == edge.importer:
            continue
        for name in edge.names:
            if name.startswith("_") and not name.startswith("__"):
                bad.append(f"{edge.importer}:{edge.line} imports {edge.imported}.{name}")
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        bound: dict[str, str] = {}  # local alias -> the clipforge module it names
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules and alias.asname:
                        bound[alias.asname] = alias.name
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    if full in modules:
                        bound[alias.asname or alias.name] = full
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in bound
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and bound[node.value.id] != name
            ):
                bad.append(f"{name}:{node.lineno} uses {bound[node.value.id]}.{node.attr}")
    return bad


# --- the real tree -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_tree() -> tuple[dict[str, Path], list[ImportEdge]]:
    modules = module_files(REPO)
    return modules, import_edges(modules)


def test_the_tree_is_found(real_tree: tuple[dict[str, Path], list[ImportEdge]]) -> None:
    modules, edges = real_tree
    # Guards against a checker that passes because it read nothing.
    for package in PACKAGES:
        assert f"{NAMESPACE}.{package}.cli" in modules
    assert any(package_of(e.imported) == "data_tools" for e in edges)


def test_packages_import_only_leftward(
    real_tree: tuple[dict[str, Path], list[ImportEdge]],
) -> None:
    _, edges = real_tree
    assert upward_imports(edges) == []


def test_no_import_cycle(real_tree: tuple[dict[str, Path], list[ImportEdge]]) -> None:
    modules, edges = real_tree
    assert import_cycles(edges, modules) == []


def test_no_private_name_crosses_a_module(
    real_tree: tuple[dict[str, Path], list[ImportEdge]],
) -> None:
    modules, edges = real_tree
    assert private_uses(edges, modules) == []


# --- the checker on trees that break each rule ----------------------------------------------------


def _write_tree(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for package in PACKAGES:
        (root / package).mkdir(parents=True, exist_ok=True)
        (root / package / "__init__.py").write_text("")
    for relative, text in files.items():
        (root / relative).write_text(text)
    return module_files(root)


def test_checker_catches_an_upward_import(tmp_path: Path) -> None:
    modules = _write_tree(
        tmp_path,
        {
            "pretrain/train.py": "from clipforge.index import build\n",
            "index/build.py": "from ..data_tools import reader\nimport benchmarks.x\n",
            "data_tools/reader.py": "",
        },
    )
    bad = upward_imports(import_edges(modules))
    assert len(bad) == 2
    assert "clipforge.pretrain.train:1 imports clipforge.index.build (pretrain -> index)" in bad
    assert "clipforge.index.build:2 imports benchmarks.x (not installed)" in bad


def test_checker_catches_a_cycle_through_a_lazy_import(tmp_path: Path) -> None:
    modules = _write_tree(
        tmp_path,
        {
            "index/build.py": "def f():\n    from . import merge\n",
            "index/merge.py": "from clipforge.index.build import Log\n",
            "index/plan.py": "from .merge import x\n",
        },
    )
    cycles = import_cycles(import_edges(modules), modules)
    assert cycles == [["clipforge.index.build", "clipforge.index.merge"]]


def test_checker_catches_private_names(tmp_path: Path) -> None:
    modules = _write_tree(
        tmp_path,
        {
            "data_tools/reader.py": "_Skips = 1\n",
            "index/embed.py": (
                "from clipforge.data_tools.reader import _Skips, ShardStream\n"
                "from clipforge.data_tools import reader\n"
                "reader._batches\n"
                "self._own\n"
            ),
        },
    )
    bad = private_uses(import_edges(modules), modules)
    assert bad == [
        "clipforge.index.embed:1 imports clipforge.data_tools.reader._Skips",
        "clipforge.index.embed:3 uses clipforge.data_tools.reader._batches",
    ]
