"""docs/architecture.md stays true: every file and folder its layout names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def named_paths() -> list[str]:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    layout = text.split("```", 2)[1]
    paths, folders = [], {}  # indentation -> folder at that depth
    for line in layout.splitlines():
        match = re.match(r"^( *)([\w.-]+/?)(\s|$)", line)
        if not match or not (match.group(2).endswith("/") or "." in match.group(2)):
            continue  # a continuation line of a description
        depth = len(match.group(1))
        parents = [folders[d] for d in sorted(folders) if d < depth]
        name = match.group(2)
        paths.append("".join(parents) + name)
        folders = {d: f for d, f in folders.items() if d < depth}
        if name.endswith("/"):
            folders[depth] = name
    return paths


def test_every_path_in_the_layout_exists() -> None:
    paths = named_paths()
    assert "agentspace/pipeline.py" in paths and "agentspace/storage/embedded/sessions.py" in paths
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert missing == []


def test_every_module_is_in_the_layout() -> None:
    """A module added without a line in the layout is found here (the commands of cli/ share one line)."""
    named = set(named_paths())
    package = ROOT / "agentspace"
    missing = [
        str(p.relative_to(ROOT))
        for p in sorted(package.rglob("*.py"))
        if p.parent != package / "cli"
        and p.name not in ("__init__.py", "__main__.py")
        and str(p.relative_to(ROOT)) not in named
    ]
    assert missing == []


def test_the_layers_name_modules_that_exist() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    layers = text.split("## Layers", 1)[1].split("## ", 1)[0]
    for name in re.findall(r"`([a-z_]+(?:/[a-z_]+)?)(?:/\*)?`", layers):
        path = ROOT / "agentspace" / name
        assert path.with_suffix(".py").exists() or path.is_dir(), name


def test_every_command_script_and_shared_test_helper_is_named() -> None:
    """The commands of cli/ (one line between them), the benchmarks, the scripts and tests/support/ are named
    in their lines of the layout, so a reader finds each by its file name there too."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    layout = text.split("```", 2)[1]
    names = set(re.findall(r"[\w-]+\.py|(?<=\s)test(?=\s)", layout))
    files = [
        *(ROOT / "agentspace" / "cli").glob("*.py"),
        *(ROOT / "benchmarks").glob("*.py"),
        *(ROOT / "scripts").iterdir(),
        *(ROOT / "tests" / "support").glob("*.py"),
    ]
    missing = sorted(
        str(p.relative_to(ROOT)) for p in files if p.is_file() and p.name != "__init__.py" and p.name not in names
    )
    assert missing == []
