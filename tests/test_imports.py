"""The package's modules import one another without cycles (lazy imports inside functions included)."""

from __future__ import annotations

import ast

from conftest import REPO

PACKAGE = REPO / "src" / "digitgen"


def _imports(path) -> set[str]:
    """The digitgen modules a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("digitgen"):
            names = [node.module.removeprefix("digitgen").lstrip(".")] if node.module != "digitgen" else []
            found.update(names or [a.name for a in node.names if (PACKAGE / f"{a.name}.py").is_file()])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("digitgen."))
    return found - {""}


def test_no_import_cycles_inside_the_package():
    graph = {path.stem: _imports(path) for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
    done, path = set(), []

    def visit(module: str) -> None:
        assert module not in path, f"import cycle: {' -> '.join(path[path.index(module) :] + [module])}"
        if module in done:
            return
        path.append(module)
        for imported in sorted(graph.get(module, ())):
            visit(imported)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    assert "serving" not in graph["tracking"]  # tracking only logs; loading is serving's
