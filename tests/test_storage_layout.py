"""The storage package's layout rules, read from the source: a backend's subpackage imports no other
backend's module and no private name of another module, and neither the CLI nor a usage sink compares
the backend's name (the store's protocol answers, ``storage/protocols.py``)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STORAGE = ROOT / "agentspace" / "storage"
BACKENDS = sorted(p.name for p in STORAGE.iterdir() if (p / "__init__.py").exists())
BACKEND_NAMES = {"tinydb", "postgres"}  # the built-in backends' [storage] backend names


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, source: str | None = None) -> list[tuple[str, list[str]]]:
    """Every (absolute module, names imported from it) of a module, type-only and function-level ones too,
    and the modules named to ``importlib.import_module``."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [alias.name for alias in node.names]
            found.append((target, names))
            found += [(f"{target}.{name}", []) for name in names]  # `from . import module`
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            found.append((str(node.args[0].value), []))
    return found


def crossings(path: Path, backend: str, source: str | None = None) -> list[str]:
    problems = []
    own = f"agentspace.storage.{backend}"
    for target, names in imports(path, source):
        for other in BACKENDS:
            if other != backend and (
                target == f"agentspace.storage.{other}" or target.startswith(f"agentspace.storage.{other}.")
            ):
                problems.append(f"{path.name} imports {target} (the {other} backend)")
        if target.startswith("agentspace") and target != own and not target.startswith(own + "."):
            problems += [f"{path.name} imports the private {target}.{n}" for n in names if n.startswith("_")]
        elif target.startswith(own + "."):  # another module of the same backend: public names only
            problems += [f"{path.name} imports the private {target}.{n}" for n in names if n.startswith("_")]
    return problems


def name_comparisons(source: str, filename: str = "<source>") -> list[str]:
    """Comparisons that involve a backend's name: a literal backend name, ``[...]["backend"]`` or
    ``.backend``."""

    def about_backend(node: ast.expr) -> bool:
        if isinstance(node, ast.Constant) and node.value in BACKEND_NAMES:
            return True
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value == "backend":
            return True
        return isinstance(node, ast.Attribute) and node.attr == "backend"

    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Compare) and any(about_backend(n) for n in [node.left, *node.comparators]):
            found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_storage_package_has_a_subpackage_per_backend() -> None:
    assert BACKENDS == ["embedded", "postgres"]
    for backend in BACKENDS:
        jobs = {p.stem for p in (STORAGE / backend).glob("*.py")}
        assert {"sessions", "usage", "clients"} <= jobs, backend
    assert {"ledger", "migrations", "database"} <= {p.stem for p in (STORAGE / "postgres").glob("*.py")}


def test_no_backend_imports_another_backend_or_a_private_name() -> None:
    problems = [
        problem
        for backend in BACKENDS
        for path in sorted((STORAGE / backend).rglob("*.py"))
        for problem in crossings(path, backend)
    ]
    assert problems == []


def test_the_crossing_check_finds_what_it_looks_for() -> None:
    """The check above is not vacuous: the imports the postgres backend had before are found."""
    source = (
        "from ..embedded.sessions import SessionStore\n"
        "from ..reports import _merge\n"
        "from .database import _clean\n"
        "import importlib\n"
        "importlib.import_module('agentspace.storage.embedded.clients')\n"
    )
    found = crossings(STORAGE / "postgres" / "probe.py", "postgres", source)
    assert any("embedded.sessions (the embedded backend)" in f for f in found)
    assert any("private agentspace.storage.reports._merge" in f for f in found)
    assert any("private agentspace.storage.postgres.database._clean" in f for f in found)
    assert any("embedded.clients (the embedded backend)" in f for f in found)
    assert crossings(STORAGE / "postgres" / "probe.py", "postgres", "from ..reports import merge\n") == []


def test_the_cli_and_the_sinks_never_compare_the_backend_name() -> None:
    paths = [
        *sorted((ROOT / "agentspace" / "cli").glob("*.py")),
        *sorted((ROOT / "agentspace" / "default_plugins").glob("*.py")),
        ROOT / "agentspace" / "sinks.py",
        ROOT / "agentspace" / "sink_queue.py",
        *sorted((ROOT / "plugins").glob("*/**/*.py")),
    ]
    found = [c for path in paths for c in name_comparisons(path.read_text(), str(path.relative_to(ROOT)))]
    assert found == []
    # What the CLI and the tinydb sink did before: each is found.
    assert len(name_comparisons('if config["storage"]["backend"] != "tinydb": pass')) == 1
    assert len(name_comparisons('ok = storage.backend == "postgres"')) == 1
