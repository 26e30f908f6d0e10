"""``agentspace plugins new NAME --kind KIND`` writes a package that installs, passes its own tests (written
with ``agentspace.testing``) and shows in ``agentspace plugins``; its README says what to change.

The packages are installed into this test's environment (``pip install --no-deps -e``) and uninstalled
after; their tests run in a subprocess, as a plugin author runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from agentspace.cli import main
from agentspace.scaffold import KINDS

NAMES = {kind: f"scaffolded-{kind}" for kind in KINDS}


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTSPACE_")}
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    return env


@pytest.fixture
def packages(tmp_path: Path) -> Iterator[dict[str, Path]]:
    written = {}
    for kind, name in NAMES.items():
        result = CliRunner().invoke(main, ["plugins", "new", name, "--kind", kind, "--dir", str(tmp_path)])
        assert result.exit_code == 0, result.output
        written[kind] = tmp_path / f"agentspace-{name}"
        assert f"Wrote {written[kind]}/" in result.output
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps"]
    try:
        for root in written.values():
            pip += ["-e", str(root)]
        subprocess.run(pip, check=True, capture_output=True, timeout=600)
        yield written
    finally:
        dists = [f"agentspace-{name}" for name in NAMES.values()]
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", *dists], capture_output=True)


def test_each_kind_installs_passes_its_tests_and_is_listed(packages: dict[str, Path]) -> None:
    listed = subprocess.run(
        [sys.executable, "-m", "agentspace", "plugins"], env=clean_env(), capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stderr
    hooks = {p["name"]: p["hooks"] for p in json.loads(listed.stdout)}
    expected = {
        "provider": "register_providers",
        "sink": "register_usage_sinks",
        "section": "register_context_sections",
        "command": "register_commands",
        "route": "register_routes",
    }
    for kind, name in NAMES.items():
        assert hooks[name] == [expected[kind]]
        root = packages[kind]
        readme = (root / "README.md").read_text()
        assert "## What to change" in readme and f"agentspace_{name.replace('-', '_')}.py" in readme
        assert 'asyncio_mode = "auto"' in (root / "pyproject.toml").read_text()
        if kind == "route":  # under the prefix docs/plugins.md gives plugins, never shadowing the gateway's
            assert f'"/api/plugins/{name}/hello"' in (root / f"agentspace_{name.replace('-', '_')}.py").read_text()
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
            cwd=root,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"{kind}:\n{done.stdout}\n{done.stderr}"
        assert " passed" in done.stdout and "skipped" not in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["Bad_Name", "--kind", "sink"], "lowercase letters and digits"),
        (["ok", "--kind", "widget"], "'widget' is not one of"),
        (["agentspace-foo", "--kind", "sink"], "give the name alone ('foo')"),
        (["echo", "--kind", "provider"], "the installed package 'agentspace-echo' has a plugin named 'echo'"),
        # AGENTSPACE_LOAD_PLUGINS=metrics selects the built-in metrics plugin: it would load this one with it.
        (["metrics", "--kind", "section"], "'metrics' is the name of a built-in plugin"),
        (["telemetry", "--kind", "sink"], "'telemetry' is the name of a built-in plugin"),
    ],
)
def test_bad_names_and_kinds_are_refused(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["plugins", "new", *args, "--dir", str(tmp_path)])
    assert result.exit_code != 0 and message in result.output
    assert not list(tmp_path.iterdir())


def test_an_existing_folder_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "agentspace-mine").mkdir()
    result = CliRunner().invoke(main, ["plugins", "new", "mine", "--kind", "route", "--dir", str(tmp_path)])
    assert result.exit_code == 1 and "exists" in result.output
    assert not list((tmp_path / "agentspace-mine").iterdir())
