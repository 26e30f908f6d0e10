"""No import circle inside agentspace/: the modules form layers (docs/architecture.md).

The graph is read from the source (ast): every module-level import, those under ``if TYPE_CHECKING:`` and in
``try`` blocks included (a type-only import is a dependency too), with the packages an import runs first.
Imports inside functions are left out: they load on first use and are how a command keeps its start-up short.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "agentspace"


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, ast.If):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                visit(node.orelse)
                visit(node.finalbody)
                for handler in node.handlers:
                    visit(handler.body)

    visit(tree.body)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the agentspace modules it imports at module level."""
    names = module_names()

    def known(target: str) -> str | None:
        while target and target not in names:
            target = target.rpartition(".")[0]
        return target or None

    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        edges = graph[name] = set()
        for node in module_level_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                base = base if node.level else (node.module or "")
                # `from . import x` imports the module x; `from .m import f` the module m.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in names else base for a in node.names]
            for target in targets:
                module = known(target)
                if module is not None and module != name:
                    edges.add(module)
                    # Importing a.b.c runs the packages a and a.b first: they are dependencies too (but not the
                    # importer's own packages, which always load before it).
                    parts = module.split(".")
                    edges.update(
                        parent
                        for parent in (".".join(parts[:i]) for i in range(1, len(parts)))
                        if not f"{name}.".startswith(f"{parent}.")
                    )
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as one circle's modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def describe(graph: dict[str, set[str]], component: list[str]) -> str:
    members = set(component)
    return "\n".join(f"  {m} -> {', '.join(sorted(graph[m] & members))}" for m in component)


def test_the_graph_sees_type_only_imports() -> None:
    graph = import_graph()
    assert "agentspace.pipeline" in graph["agentspace.service"]
    assert "agentspace.storage.protocols" in graph["agentspace.registry"]  # under `if TYPE_CHECKING:` only
    assert "agentspace.config" in graph["agentspace.routing"]  # likewise
    # `from .storage.protocols import ...` runs storage/__init__.py first: the package is a dependency too
    assert "agentspace.storage" in graph["agentspace.registry"]


def test_a_circle_is_found_and_named() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert describe(graph, ["a", "b", "c"]) == "  a -> b\n  b -> c\n  c -> a"


def test_no_import_circle_inside_agentspace() -> None:
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import circles:\n" + "\n\n".join(describe(graph, c) for c in found)


def test_transports_reach_the_gateway_through_the_service() -> None:
    """Each transport parses, calls ``service.Service`` and encodes: none but ``transports/state.py`` (which
    makes the Service of a request) imports the registry or reads it from the app."""
    graph = import_graph()
    reaching = []
    for name, path in sorted(module_names().items()):
        if not name.startswith("agentspace.transports.") or name == "agentspace.transports.state":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        # ``app[state.REGISTRY]``, ``app.get(state.REGISTRY)``, ``from .state import REGISTRY``: any use of the key
        uses_key = any(
            (isinstance(node, ast.Attribute) and node.attr == "REGISTRY")
            or (isinstance(node, ast.Name) and node.id == "REGISTRY")
            or (isinstance(node, ast.alias) and node.name == "REGISTRY")
            for node in ast.walk(tree)
        )
        if "agentspace.registry" in graph[name] or uses_key:
            reaching.append(name)
    assert reaching == []
