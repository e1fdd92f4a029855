"""The house rules of docs/architecture.md, checked on the code's own imports (every import, inside functions too).

Rooms and what each may import (besides itself and the standard library / third-party packages):

- ``corrpo.models``: nothing else of corrpo (the bottom room);
- ``corrpo.generation``, ``corrpo.inversion``: ``corrpo.models``;
- ``corrpo.rewards``: nothing else of corrpo;
- ``corrpo.training``: models, generation, inversion, rewards;
- ``corrpo.data``: rewards and training (the ``TrainingHost`` interface the data module reads);
- ``corrpo.runs``: models and inversion (a report reads files; it never trains);
- the top (``corrpo.cli``, ``corrpo.module``, ``corrpo`` itself) and ``callbacks``: every room.

Then: no import circle among the modules, at most 8 ``.py`` files directly in ``corrpo/``, none over 450 lines, and
the benchmarks import no private name and nothing from ``tests/``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("models", "generation", "inversion", "rewards", "training", "data", "runs")
ALLOWED = {
    "models": set(),
    "generation": {"models"},
    "inversion": {"models"},
    "rewards": set(),
    "training": {"models", "generation", "inversion", "rewards"},
    "data": {"rewards", "training"},
    "runs": {"models", "inversion"},
}


def module_files() -> dict[str, Path]:
    """Every module of corrpo/ and callbacks/, by dotted name (a package by its own name)."""
    files = {}
    for top in ("corrpo", "callbacks"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            files[name] = path
    return files


def imported_modules(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (relative imports resolved)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def room(module: str) -> str:
    """``models`` ... ``runs`` for a module inside a room; ``top`` for corrpo's own top level and callbacks."""
    parts = module.split(".")
    if parts[0] == "corrpo" and len(parts) > 1 and parts[1] in ROOMS:
        return parts[1]
    return "top"


def import_graph() -> dict[str, set[str]]:
    known = module_files()
    return {name: imported_modules(name, path, known) for name, path in known.items()}


def test_every_import_points_down_the_rooms():
    wrong = []
    for module, targets in import_graph().items():
        here = room(module)
        if here == "top":
            continue
        for target in targets:
            there = room(target)
            if there != here and there not in ALLOWED[here]:
                wrong.append(f"{module} ({here}) imports {target} ({there})")
    assert not wrong, "imports against docs/architecture.md's directions:\n" + "\n".join(sorted(wrong))


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a circle of imports."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    # a package's __init__ importing its own submodules is not a circle with them
    graph = {
        m: {t for t in ts if not m.startswith(t + ".") and not t.startswith(m + ".")}
        for m, ts in import_graph().items()
    }
    assert circles(graph) == []


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_corrpo_keeps_its_rooms_small():
    flat = sorted(p.name for p in (ROOT / "corrpo").glob("*.py"))
    assert len(flat) <= 8, f"corrpo/ holds {len(flat)} flat files: {flat}; each belongs in a room"
    long = [
        f"{p.relative_to(ROOT)}: {n}" for p in module_files().values() if (n := len(p.read_text().splitlines())) > 450
    ]
    assert not long, f"files over 450 lines (split by concept): {long}"


def private_definitions() -> set[str]:
    """The names of corrpo's and callbacks' private functions, methods and classes (``_name``, not dunders)."""
    names = set()
    for path in module_files().values():
        for node in ast.walk(ast.parse(path.read_text())):
            is_def = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            if is_def and node.name.startswith("_") and not node.name.startswith("__"):
                names.add(node.name)
    return names


@pytest.mark.parametrize("script", sorted((ROOT / "benchmarks").glob("*.py")), ids=lambda p: p.name)
def test_benchmarks_import_no_private_name_and_nothing_from_tests(script):
    """A benchmark runs the code users run: through public names only, and never through the test suite's
    helpers (``tests/`` on its path), which could drift from what the package does."""
    text = script.read_text()
    private = private_definitions()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("corrpo", "callbacks")):
            named = [a.name for a in node.names if a.name.startswith("_")]
            assert not named, f"{script.name} imports private {named} from {node.module}"
        if isinstance(node, ast.Attribute) and node.attr in private:
            raise AssertionError(f"{script.name} calls corrpo's private {ast.unparse(node)}")
    assert '"tests"' not in text and "'tests'" not in text, f"{script.name} puts tests/ on its path"
