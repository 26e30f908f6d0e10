"""Plugins: found through the ``agentspace`` entry-point group, selectable, listed with their hooks.

The fixture plugin (tests/fixtures/fixture-plugin) is a real pip-installable package. The plugin
manager is process-wide, so anything that depends on AGENTSPACE_LOAD_PLUGINS runs the CLI in a
subprocess, exactly as a user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

import pluggy
import pytest

from agentspace.plugins import DEFAULT_PLUGINS

FIXTURE = "agentspace-fixture-plugin"
FIXTURE_DIR = Path(__file__).resolve().parent / "fixtures" / "fixture-plugin"

try:
    distribution(FIXTURE)
    installed = True
except PackageNotFoundError:
    installed = False

needs_fixture = pytest.mark.skipif(
    not installed, reason=f"{FIXTURE} is not installed; run: pip install -e {FIXTURE_DIR}"
)


def run_cli(tmp_path: Path, *args: str, load: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("AGENTSPACE_LOAD_PLUGINS", "AGENTSPACE_CONFIG")}
    env["AGENTSPACE_HOME"] = str(tmp_path / "home")
    if load is not None:
        env["AGENTSPACE_LOAD_PLUGINS"] = load
    return subprocess.run(
        [sys.executable, "-m", "agentspace", *args], env=env, capture_output=True, text=True, timeout=60
    )


def listed(tmp_path: Path, *args: str, load: str | None = None) -> list[dict[str, Any]]:
    result = run_cli(tmp_path, "plugins", *args, load=load)
    assert result.returncode == 0, result.stderr
    data: list[dict[str, Any]] = json.loads(result.stdout)
    return data


def test_hookimpl_is_exported() -> None:
    from agentspace import hookimpl
    from agentspace.hookspecs import hookimpl as spec_hookimpl

    assert hookimpl is spec_hookimpl


# Where each name of the public plugin surface is defined. A name added to ``agentspace.__all__`` must be
# added here, so the surface is always a deliberate list of the real objects, not copies.
PUBLIC_NAMES = {
    "agentspace.hookspecs": ["hookimpl"],
    "agentspace.config": ["Config", "ConfigError", "load_config"],
    "agentspace.cli.common": ["command_config", "config_options"],
    "agentspace.providers.base": ["Provider", "ProviderRequest", "ThinkingSettings"],
    "agentspace.events": [
        "ProviderEvent",
        "TextDelta",
        "ReasoningDelta",
        "ResponseStarted",
        "SourceEvent",
        "ToolCallEvent",
        "UsageReport",
        "ProviderFinish",
        "ProviderError",
    ],
    "agentspace.tokens": ["count_tokens"],
    "agentspace.types": [
        "ModelInfo",
        "PriceTier",
        "ChatMessage",
        "Part",
        "TextPart",
        "ReasoningPart",
        "SourcePart",
        "ToolCallPart",
        "ToolResultPart",
        "ContextRequest",
        "ContextSection",
        "ContextSectionBuilder",
        "Tool",
        "UsageRecord",
        "TokenUsage",
        "Cost",
    ],
    "agentspace.sinks": ["UsageSink", "DropRecord"],
}


@pytest.mark.parametrize(("module", "name"), [(m, n) for m, names in PUBLIC_NAMES.items() for n in names])
def test_public_name_is_the_internal_object(module: str, name: str) -> None:
    import importlib

    import agentspace

    namespace: dict[str, Any] = {}
    exec(f"from agentspace import {name}", namespace)  # the import a plugin author writes
    assert namespace[name] is getattr(importlib.import_module(module), name)
    assert name in agentspace.__all__


def test_all_lists_exactly_the_public_names() -> None:
    import agentspace

    expected = {n for names in PUBLIC_NAMES.values() for n in names} | {"__version__"}
    assert sorted(agentspace.__all__) == sorted(expected)
    assert len(agentspace.__all__) == len(set(agentspace.__all__))
    namespace: dict[str, Any] = {}
    exec("from agentspace import *", namespace)
    assert expected <= set(namespace)


@needs_fixture
def test_installed_plugin_is_listed_with_its_hooks(tmp_path: Path) -> None:
    plugins = {p["name"]: p for p in listed(tmp_path)}
    fixture = next(p for p in plugins.values() if p.get("package") == FIXTURE)
    assert fixture["hooks"] == ["register_commands", "register_context_sections"]
    assert fixture["version"] == "0.0.1"
    assert not any(p.get("builtin") for p in plugins.values())


def test_all_lists_exactly_the_builtins(tmp_path: Path) -> None:
    plugins = listed(tmp_path, "--all", load="")
    assert {p["name"] for p in plugins} == set(DEFAULT_PLUGINS)
    assert all(p["builtin"] is True and p["hooks"] for p in plugins)


@needs_fixture
def test_all_adds_builtins_to_installed(tmp_path: Path) -> None:
    plugins = listed(tmp_path, "--all", load=FIXTURE)
    assert {p["name"] for p in plugins if p.get("builtin")} == set(DEFAULT_PLUGINS)
    assert [p["package"] for p in plugins if not p.get("builtin")] == [FIXTURE]


@needs_fixture
def test_load_plugins_env_selects(tmp_path: Path) -> None:
    assert listed(tmp_path, load="") == []
    assert [p["package"] for p in listed(tmp_path, load=FIXTURE)] == [FIXTURE]
    assert [p["package"] for p in listed(tmp_path, load="fixture")] == [FIXTURE]  # entry-point name works too


@needs_fixture
def test_load_plugins_env_matches_distribution_names_as_pip_does_and_names_what_matched_nothing(
    tmp_path: Path,
) -> None:
    """pip takes agentspace_fixture_plugin and Agentspace-Fixture-Plugin for agentspace-fixture-plugin (PEP 503),
    so the selection does too; a name no installed plugin has is said, not silently loaded as nothing."""
    for spelling in ("agentspace_fixture_plugin", "Agentspace-Fixture-Plugin"):
        assert [p["package"] for p in listed(tmp_path, load=spelling)] == [FIXTURE]
    result = run_cli(tmp_path, "plugins", load="fixture,fixtrue")
    assert result.returncode == 0 and [p["package"] for p in json.loads(result.stdout)] == [FIXTURE]
    assert "AGENTSPACE_LOAD_PLUGINS names 'fixtrue', which no installed plugin is" in result.stderr


@needs_fixture
def test_plugin_command_works(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "hello", "plugin author", load=FIXTURE)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Hello, plugin author! (agentspace-fixture-plugin)\n"
    assert "hello" in run_cli(tmp_path, "--help", load=FIXTURE).stdout


@needs_fixture
def test_plugin_command_absent_when_not_loaded(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "hello", load="")
    assert result.returncode == 2
    assert "No such command 'hello'" in result.stderr


@needs_fixture
def test_plugin_context_section_registers() -> None:
    from agentspace.config import parse_config
    from agentspace.plugins import create_plugin_manager

    pm = create_plugin_manager(load_entry_points=False)
    import agentspace_fixture_plugin

    pm.register(agentspace_fixture_plugin, name="fixture")
    sections: list[Any] = []
    pm.hook.register_context_sections(register=sections.append, config=parse_config({}))
    assert "fixture" in [s.name for s in sections]


# --- agentspace.testing: the helpers plugin packages test themselves with --------------------------


def test_make_config_merges_toml_and_tables_and_names_the_file(tmp_path: Path) -> None:
    from agentspace.config import ConfigError
    from agentspace.testing import make_config

    toml = '[chat]\nmax_steps = 3\n[plugins.memory]\nfolder = "a"\n'
    config = make_config(tmp_path, toml, plugins={"memory": {"max_bytes": 9}})
    assert config["chat"]["max_steps"] == 3
    assert config.plugin_settings("memory") == {"folder": "a", "max_bytes": 9}
    assert config.data_dir == tmp_path / "data" and config.data_dir.is_dir()
    assert config.resolve_path("notes") == tmp_path / "notes"
    with pytest.raises(ConfigError) as e:
        make_config(tmp_path, chat={"max_steps": "3"})
    assert e.value.key == "chat.max_steps" and str(tmp_path / "agentspace.toml") in str(e.value)
    with pytest.raises(ConfigError) as e:
        make_config(tmp_path, "[chat\n")
    assert e.value.key == "(syntax)"


def test_plugin_manager_registers_after_the_builtins_and_unregisters(tmp_path: Path) -> None:
    from agentspace import hookimpl
    from agentspace.testing import make_config, plugin_manager

    class Plain:
        @hookimpl
        def formatting_prompt(self, model: str) -> str:
            return f"plain for {model}"

    plugin = Plain()
    with plugin_manager(plugin) as pm:
        assert set(DEFAULT_PLUGINS) < {pm.get_name(p) for p in pm.get_plugins()}
        assert pm.hook.formatting_prompt(config=make_config(tmp_path), model="m") == "plain for m"
    assert not pm.is_registered(plugin)
    with plugin_manager(plugin, builtins=False) as pm:
        assert pm.get_plugins() == {plugin}

    # Mistakes that would make a plugin do nothing, or fail only under the server, fail the test instead.
    class MisspeltHook:
        @hookimpl
        def register_tool(self, register: Any) -> None: ...

    class MisspeltParameter:
        @hookimpl
        def register_tools(self, regster: Any) -> None: ...

    for wrong in (MisspeltHook(), MisspeltParameter()):
        with pytest.raises(pluggy.PluginValidationError), plugin_manager(wrong):
            pass


def test_registered_asks_only_the_given_plugins(tmp_path: Path) -> None:
    from agentspace import ContextSection, hookimpl
    from agentspace.testing import make_config, registered

    class Sections:
        @hookimpl
        def register_context_sections(self, register: Any) -> None:
            register(ContextSection("a", lambda request: "A"))
            register(ContextSection("b", lambda request: "B"))

    assert [s.name for s in registered("register_context_sections", make_config(tmp_path), Sections())] == ["a", "b"]


def test_installed_plugin_says_how_to_fix_a_missing_entry_point() -> None:
    from agentspace.testing import installed_plugin

    with pytest.raises(LookupError, match="no installed plugin has the entry point 'no-such-plugin'.*pip install"):
        installed_plugin("no-such-plugin")


async def test_gateway_client_serves_the_plugins_and_runs_their_server_hooks(tmp_path: Path) -> None:
    from agentspace import hookimpl
    from agentspace.testing import gateway_client, make_config

    calls: list[str] = []

    class Lifecycle:
        @hookimpl
        def server_startup(self) -> None:
            calls.append("startup")

        @hookimpl
        def server_shutdown(self) -> None:
            calls.append("shutdown")

    async with gateway_client(make_config(tmp_path), Lifecycle()) as client:
        assert calls == ["startup"]
        response = await client.get("/api/sessions")  # a route that needs the gateway token
        assert response.status == 200, await response.text()
        ws = await client.ws_connect("/gateway")
        await ws.send_json({"type": "session.list", "id": "1"})
        assert (await ws.receive_json(timeout=10))["requestId"] == "1"
        await ws.close()
    assert calls == ["startup", "shutdown"]
