"""config.example.toml documents every key with its default; config errors name file, key and expectation."""

from __future__ import annotations

import re
import sys
import tomllib
import types
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from agentspace.cli import main
from agentspace.config import PRICING_SCHEMA, PROVIDER_SCHEMA, SCHEMA, ConfigError, load_config, parse_config

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"
HEADER = re.compile(r"^#?\s*\[([^\]]+)\]\s*$")
KEY = re.compile(r"^(#\s*)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.+)$")


def documented() -> dict[str, dict[str, tuple[bool, str]]]:
    """section header -> key -> (commented, value text), for `key = v` and `# key = v` lines."""
    out: dict[str, dict[str, tuple[bool, str]]] = {}
    section = ""
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if m := HEADER.match(line):
            section = m.group(1).strip()
            continue
        # "# # comment" lines inside commented tables are prose, not keys.
        if (m := KEY.match(line)) and not line.startswith("# #"):
            keys = out.setdefault(section, {})
            if m.group(2) not in keys or keys[m.group(2)][0]:  # the uncommented default wins over an example
                keys[m.group(2)] = (bool(m.group(1)), m.group(3))
    return out


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("AGENTSPACE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("AGENTSPACE_CONFIG", raising=False)
    return tmp_path / "home"


def test_example_loads_and_equals_the_defaults() -> None:
    config = load_config(EXAMPLE)
    assert config.values == parse_config({}).values
    assert config["models"]["default"] == "anthropic/claude-sonnet-4-6"
    assert config.providers == {} and config.pricing == {} and config.plugins == {}


def test_example_documents_every_schema_key_with_its_default() -> None:
    docs = documented()
    for section, keys in SCHEMA.items():
        assert section in docs, f"[{section}] missing from config.example.toml"
        for key, (_types, default) in keys.items():
            assert key in docs[section], f"{section}.{key} is not documented in config.example.toml"
            commented, text = docs[section][key]
            if default is None:
                assert commented, f"{section}.{key} has no default; show it commented out"
            elif not commented:
                assert tomllib.loads(f"v = {text}")["v"] == default, f"{section}.{key}: not the default"
    provider_tables = [s for s in docs if s.startswith("providers.")]
    pricing_tables = [s for s in docs if s.startswith("pricing.")]
    assert provider_tables and pricing_tables and "plugins.memory" in docs
    for tables, schema in ((provider_tables, PROVIDER_SCHEMA), (pricing_tables, PRICING_SCHEMA)):
        shown = {k for t in tables for k in docs[t]}
        assert set(schema) <= shown, f"undocumented: {set(schema) - shown}"
    assert "fallbacks" in docs["models"] and "base_url" in docs["providers.openai"]


def test_commented_examples_are_valid_when_uncommented(tmp_path: Path) -> None:
    """Uncommenting the whole file gives a valid config too (the examples are not lies)."""
    docs = documented()
    lines, section = [], ""
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if m := HEADER.match(stripped):
            section = m.group(1).strip()
            lines.append(stripped.lstrip("# "))
        elif (m := KEY.match(stripped)) and m.group(1) and not stripped.startswith("# #"):
            # A key shown as default and again as a commented example ([models] fallbacks) keeps the default.
            if not any(k == m.group(2) and not commented for k, (commented, _) in docs.get(section, {}).items()):
                lines.append(stripped[1:].strip())
        elif not stripped.startswith("#"):
            lines.append(line)
    config = parse_config(tomllib.loads("\n".join(lines)), "uncommented")
    assert config.provider_settings("openai")["base_url"] == "http://127.0.0.1:8000/v1"
    assert config.pricing["my/model"]["input_per_mtok"] == 1.0


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agentspace.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("[server]\nhots = '0.0.0.0'\n", "server.hots", "unknown key"),
        ("[server]\nport = '80'\n", "server.port", "expected an integer"),
        ("[server]\nport = 70000\n", "server.port", "0-65535"),
        ("[thinking]\nenabled = 1\n", "thinking.enabled", "expected true or false"),
        ("[chat]\non_disconnect = 'maybe'\n", "chat.on_disconnect", "expected one of finish, abort"),
        ("[server]\nevent_loop = 'trio'\n", "server.event_loop", "expected one of auto, uvloop, asyncio"),
        ("[storage]\nlease_seconds = 0.5\n", "storage.lease_seconds", "expected 2 seconds or more"),
        ("[server\nport = 1\n", "(syntax)", "not valid TOML"),
        ("[bogus]\nx = 1\n", "bogus", "unknown section"),
        ("[providers.openai]\nbase_uri = 'x'\n", "providers.openai.base_uri", "unknown key"),
        ('[pricing."my/model"]\ninput_per_mtok = "cheap"\n', 'pricing."my/model".input_per_mtok', "expected"),
        # A type the gateway cannot send to a model (Anthropic and litellm take these five) would be accepted,
        # stored, and then refused by the upstream.
        ("[attachments]\nmedia_types = ['text/plain']\n", "attachments.media_types", "image/png, image/jpeg"),
        ("[attachments]\nmedia_types = [1]\n", "attachments.media_types", "application/pdf"),
    ],
)
def test_config_errors_name_file_key_and_expectation(tmp_path: Path, text: str, key: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = info.value.message
    assert str(path) in message and key in message and expected in message


def test_unreadable_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(tmp_path)  # a directory


@pytest.fixture
def fake_server(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Stands in for agentspace.server: records how serve calls run_server instead of binding."""
    calls: list[dict[str, Any]] = []
    module = types.ModuleType("agentspace.server")
    module.run_server = lambda config, host=None, port=None: calls.append(  # type: ignore[attr-defined]
        {"config": config, "host": host, "port": port}
    )
    monkeypatch.setitem(sys.modules, "agentspace.server", module)
    return calls


def test_serve_with_bad_config_fails_before_binding(tmp_path: Path, fake_server: list[dict[str, Any]]) -> None:
    path = write(tmp_path, "[server]\nport = 'eighty'\n")
    result = CliRunner().invoke(main, ["serve", "--config", str(path)])
    assert result.exit_code != 0
    assert f"{path}: server.port: expected an integer" in result.output
    assert "Traceback" not in result.output
    assert fake_server == []


def test_serve_with_unreadable_config_via_env(
    tmp_path: Path, fake_server: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTSPACE_CONFIG", str(tmp_path / "nope.toml"))
    result = CliRunner().invoke(main, ["serve"])
    assert result.exit_code != 0 and "nope.toml: (file): cannot be read" in result.output
    assert fake_server == []


def test_serve_passes_config_and_overrides(tmp_path: Path, fake_server: list[dict[str, Any]]) -> None:
    result = CliRunner().invoke(
        main,
        ["serve", "--config", str(EXAMPLE), "--port", "0", "--host", "127.0.0.2", "--data-dir", str(tmp_path / "d")],
    )
    assert result.exit_code == 0, result.output
    (call,) = fake_server
    assert (call["host"], call["port"]) == ("127.0.0.2", 0)
    assert call["config"]["server"]["port"] == 0
    assert call["config"].data_dir == (tmp_path / "d").resolve()


def test_data_dir_precedence(tmp_path: Path, home: Path, fake_server: list[dict[str, Any]]) -> None:
    CliRunner().invoke(main, ["serve"])
    assert fake_server[-1]["config"].data_dir == home  # AGENTSPACE_HOME
    configured = write(tmp_path, "[storage]\ndata_dir = 'state'\n")
    CliRunner().invoke(main, ["--config", str(configured), "serve"])
    assert fake_server[-1]["config"].data_dir == tmp_path / "state"  # relative to the config file
    CliRunner().invoke(main, ["--config", str(configured), "--data-dir", str(tmp_path / "flag"), "serve"])
    assert fake_server[-1]["config"].data_dir == (tmp_path / "flag").resolve()


def test_plugin_settings_checked_against_a_schema() -> None:
    from agentspace.config import ConfigError, parse_config

    schema = {"folder": ((str,), None), "max_bytes": ((int,), 100)}
    config = parse_config({"plugins": {"memory": {"folder": "notes"}}}, "agentspace.toml")
    assert config.plugin_settings("memory", schema) == {"folder": "notes", "max_bytes": 100}
    assert config.plugin_settings("other", schema) == {"folder": None, "max_bytes": 100}
    for bad, key in (({"folder": 3}, "plugins.memory.folder"), ({"colour": "red"}, "plugins.memory.colour")):
        with pytest.raises(ConfigError) as err:
            parse_config({"plugins": {"memory": bad}}, "agentspace.toml").plugin_settings("memory", schema)
        assert err.value.message.startswith(f"agentspace.toml: {key}: ")
