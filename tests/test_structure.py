"""The shape of the code, checked from its source: no import cycles (imports inside functions and under
TYPE_CHECKING included), the library never imports the CLI, and `animate` stays a short composition."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import avatarcli

PACKAGE = Path(avatarcli.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Every avatarcli module `path` imports, wherever the import statement stands."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {module for module in found if module in known and module != name}


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(path, name, set(found)) for name, path in found.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_sees_function_level_and_type_checking_imports():
    graph = import_graph()
    assert "avatarcli.drivers" in graph["avatarcli.pipeline"]  # imported inside prepare()
    assert "avatarcli.job" in graph["avatarcli.drivers.base"]  # imported under TYPE_CHECKING


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_library_never_imports_the_cli():
    graph = import_graph()
    cli = {name for name in graph if name.startswith("avatarcli.cli")} | {"avatarcli.__main__"}
    offenders = {name: sorted(graph[name] & cli) for name in graph if name not in cli and graph[name] & cli}
    assert offenders == {}


def test_animate_is_a_short_composition():
    from avatarcli.pipeline import animate

    lines, _ = inspect.getsourcelines(animate)
    assert len(lines) <= 60
    assert "def " not in "".join(lines[1:]) and "lambda" not in "".join(lines)  # no closures


def test_the_readme_stays_a_newcomers_page():
    """At most 300 lines; measurement tables live in benchmarks/README.md, which indexes every script."""
    root = PACKAGE.parent
    assert len((root / "README.md").read_text(encoding="utf-8").splitlines()) <= 300
    index = (root / "benchmarks" / "README.md").read_text(encoding="utf-8")
    scripts = sorted(path.name for path in (root / "benchmarks").glob("*.py") if path.name != "common.py")
    assert [name for name in scripts if name not in index] == []
