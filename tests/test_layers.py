"""The package's shape: layers that import only downwards, no import cycle, no private name
imported across modules, small modules. Read from the source (``ast``), nothing imported."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "safety_guard"

#: Each module's layer, by longest prefix: a module imports only from its own layer or below.
LAYERS = {
    "safety_guard._extras": 0,
    "safety_guard._options": 0,
    "safety_guard.files": 0,
    "safety_guard.models.wrappers": 0,
    "safety_guard.engines": 1,
    "safety_guard.models": 2,
    "safety_guard.measure": 3,
    "safety_guard.landscape": 4,
    "safety_guard.plots": 5,
    "safety_guard.guard": 6,
    "safety_guard.testbed": 7,
    "safety_guard.cli": 8,
    "safety_guard.__main__": 9,
}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imports(modules: dict[str, Path]) -> list[tuple[str, str, str | None, bool]]:
    """(importer, imported module, imported name or None, inside a function) of every import of
    the package by the package."""
    found = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        in_function = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                in_function |= {id(n) for n in ast.walk(node) if n is not node}
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom | ast.Import):
                continue
            assert not (isinstance(node, ast.ImportFrom) and node.level), (
                f"{name}: relative import (the package imports absolutely)"
            )
            targets = (
                [(a.name, None) for a in node.names]
                if isinstance(node, ast.Import)
                else [
                    (f"{node.module}.{a.name}", None)
                    if f"{node.module}.{a.name}" in modules
                    else (node.module, a.name)
                    for a in node.names
                ]
            )
            for module, imported in targets:
                if module in modules:
                    found.append((name, module, imported, id(node) in in_function))
    return found


def _layer(module: str) -> int:
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def test_every_module_has_a_layer_and_imports_only_its_layer_or_below():
    modules = _modules()
    upward = []
    for importer, module, _name, _late in _imports(modules):
        if importer == "safety_guard" or module == "safety_guard":  # the public API; __version__
            continue
        if _layer(module) > _layer(importer):
            upward.append(f"{importer} -> {module}")
    assert upward == []


def test_no_import_cycle_not_even_inside_functions():
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for importer, module, _name, _late in _imports(modules):
        package = modules[importer].name == "__init__.py"
        if package and module.startswith(importer + "."):  # a package re-exporting its modules
            continue
        if module == "safety_guard" or (
            modules[module].name == "__init__.py" and importer.startswith(module + ".")
        ):
            continue
        graph[importer].add(module)
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_no_private_name_is_imported_across_modules():
    private = [
        f"{importer} imports {module}.{name}"
        for importer, module, name, _late in _imports(_modules())
        if name and name.startswith("_") and not name.startswith("__")
    ]
    assert private == []


def test_no_module_is_over_600_lines_and_the_callback_is_thin():
    sizes = {m: len(p.read_text().splitlines()) for m, p in _modules().items()}
    assert {m: n for m, n in sizes.items() if n > 600} == {}
    assert sizes["safety_guard.guard.callback"] <= 300
