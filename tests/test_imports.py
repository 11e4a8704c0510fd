"""The project's modules import each other without a circle.

Every import counts, at the top of a module or inside a function (a lazy import only moves
the circle to run time), except those under `if TYPE_CHECKING:`, which never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import orchestrator

# Where the packages are: site-packages under `make test` (the installed wheel), else the
# source tree. Either way it is the code that runs.
ROOT = Path(orchestrator.__file__ or "").resolve().parent.parent
PACKAGES = ("orchestrator", "events")


def _module_of(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_of(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    name = test.attr if isinstance(test, ast.Attribute) else getattr(test, "id", "")
    return name == "TYPE_CHECKING"


def _imports(module: str, path: Path, known: set[str], typing: bool = False) -> set[str]:
    """The project modules `module` imports: run-time imports only, unless `typing`."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node) and not typing:
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    targets = set()
    for name in found:
        # `import a.b.c` runs a, a.b and a.b.c; a package's own __init__ is not an edge.
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in known and prefix != module and not module.startswith(prefix + "."):
                targets.add(prefix)
    return targets


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of the graph, if there is any."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                found = walk(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = walk(node)
            if found:
                return found
    return None


def test_no_module_imports_itself_through_others() -> None:
    modules = _modules()
    known = set(modules)
    graph = {m: _imports(m, p, known) for m, p in modules.items()}
    assert graph["orchestrator.orchestrator"], "the walk found no imports: it is broken"
    circle = _cycle(graph)
    assert circle is None, " -> ".join(circle or [])


def test_the_views_do_not_import_the_orchestrator() -> None:
    modules = _modules()
    views = modules["orchestrator.views"]
    imported = _imports("orchestrator.views", views, set(modules), typing=True)
    assert "orchestrator.orchestrator" not in imported


def test_the_inspector_reads_without_the_orchestrator_or_its_backends() -> None:
    modules = _modules()
    running = {"orchestrator.orchestrator", "orchestrator.session", "orchestrator.runner"}
    running |= {"orchestrator.backends.bundle", "orchestrator.pool"}
    for name in ("orchestrator.ui.data", "orchestrator.reading"):
        imported = _imports(name, modules[name], set(modules), typing=True)
        assert not imported & running, (name, imported & running)


def test_the_walk_finds_a_circle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
