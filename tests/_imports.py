"""The project's import graph, read from the source with :mod:`ast` (nothing is imported).

Not a test module: used by tests/test_architecture.py. A module's imports are every ``import`` /
``from ... import`` statement in its file, at module level or inside functions (a lazy import is
still a dependency), except those under ``if TYPE_CHECKING:`` (never executed). Only modules of
:data:`PACKAGES` are nodes; ``from pkg import name`` is an edge to ``pkg.name`` when that is a
module, else to ``pkg`` (its ``__init__``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("model", "pipeline", "flows", "lerenet")


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """``{dotted module name: file}`` of every ``.py`` file of :data:`PACKAGES` (``pkg/__init__.py`` -> ``pkg``)."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> Iterable[ast.Import | ast.ImportFrom]:
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            stack.append(child)


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is one of our modules."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        cand = ".".join(parts[:n])
        if cand in modules:
            return cand
    return None


def imports_of(module: str, modules: dict[str, Path], nodes: Iterable[ast.AST] | None = None) -> set[str]:
    """Our modules that ``module`` imports (module docstring); ``nodes`` restricts the search to those
    AST nodes (e.g. one function) instead of the whole file."""
    path = modules[module]
    is_pkg = path.name == "__init__.py"
    if nodes is None:
        nodes = [ast.parse(path.read_text(), str(path))]
    out: set[str] = set()
    for tree in nodes:
        found = [tree] if isinstance(tree, (ast.Import, ast.ImportFrom)) else list(_import_nodes(tree))
        for node in found:
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join([*pkg, base] if base else pkg)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                owner = _owner(t, modules)
                if owner is not None and owner != module:
                    out.add(owner)
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """``{module: modules it imports}`` over :data:`PACKAGES`."""
    modules = module_files(root)
    return {m: imports_of(m, modules) for m in modules}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a self-import): the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's algorithm (recursion depth = longest import chain, small)
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def closure(graph: dict[str, set[str]], roots: Iterable[str]) -> set[str]:
    """Every module reachable from ``roots`` (roots included)."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(graph.get(m, ()))
    return seen


def function_imports(module: str, function: str, modules: dict[str, Path]) -> set[str]:
    """Our modules imported inside the top-level function ``function`` of ``module``.

    Raises:
        LookupError: no such function.
    """
    path = modules[module]
    tree = ast.parse(path.read_text(), str(path))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == function:
            return imports_of(module, modules, [node])
    raise LookupError(f"{path}: no top-level function {function}")
