"""Every third-party module the package imports is declared in its pyproject.toml.

A module that is only installed because another dependency pulls it in (``httpx`` through litellm) breaks
the day that dependency stops needing it. Each plugin package is checked against its own pyproject.toml.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(pyproject: Path) -> set[str]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    requirements = list(project["dependencies"])
    # A runtime extra (``otel``, ``scale``) declares what the code imports when that feature is used; test and bench do not.
    for extra, extra_requirements in project.get("optional-dependencies", {}).items():
        if extra not in ("test", "bench"):
            requirements += extra_requirements
    # A requirement's name ends where its extras, version or marker begin: "anthropic[aiohttp]>=2.15".
    return {normalize(re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0]) for r in requirements}


def imported_modules(files: list[Path]) -> dict[str, str]:
    """Top-level third-party modules imported anywhere in ``files`` (inside functions too) -> a file using it."""
    found: dict[str, str] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "agentspace":
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


PACKAGES = {
    "agentspace": (ROOT / "pyproject.toml", sorted((ROOT / "agentspace").rglob("*.py"))),
    **{
        folder.name: (folder / "pyproject.toml", sorted(folder.glob("agentspace_*.py")))
        for folder in sorted((ROOT / "plugins").iterdir())
        if (folder / "pyproject.toml").is_file()
    },
}


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_every_imported_module_is_declared(package: str) -> None:
    pyproject, files = PACKAGES[package]
    assert files
    dependencies = declared(pyproject) | {normalize(package)}
    distributions = packages_distributions()
    missing = []
    for module, where in sorted(imported_modules(files).items()):
        if module == package.replace("-", "_"):
            continue
        providers = {normalize(d) for d in distributions.get(module, [module])}
        if not providers & dependencies:
            missing.append(f"{module} (imported in {where}; installed by {', '.join(sorted(providers))})")
    assert not missing, f"{pyproject.relative_to(ROOT)} does not declare: " + "; ".join(missing)
