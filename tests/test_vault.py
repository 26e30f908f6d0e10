"""The key vault and the gateway token: file modes, masking, lookup order, never echoing a key."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from agentspace.cli import keys as keys_cmd
from agentspace.cli import main
from agentspace.config import parse_config
from agentspace.gateway_token import (
    TokenFile,
    load_or_create_token,
    rotate_token,
    token_matches,
    token_path,
)
from agentspace.vault import KeyVault, mask, missing_key_message, resolve_key

SECRET = "sk-ant-api03-THIS-IS-SECRET-a1b2"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    data = tmp_path / "home"
    monkeypatch.setenv("AGENTSPACE_HOME", str(data))
    monkeypatch.delenv("AGENTSPACE_CONFIG", raising=False)
    for var in ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "GEMINI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    return data


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_vault_file_is_private_and_documented(home: Path) -> None:
    vault = KeyVault(home)
    vault.set("anthropic", SECRET)
    assert mode(vault.path) == 0o600
    assert mode(home) == 0o700
    data = json.loads(vault.path.read_text())
    assert "Do not share" in data["__note__"]
    assert data["keys"] == {"anthropic": SECRET}
    # Rewrites stay private, even when the file had been loosened meanwhile.
    os.chmod(vault.path, 0o644)
    vault.set("openai", "sk-other-key-0000000000")
    assert mode(vault.path) == 0o600
    assert vault.names() == ["anthropic", "openai"]
    assert vault.remove("openai") is True
    assert vault.remove("openai") is False
    assert vault.get("openai") is None
    assert not [p for p in home.iterdir() if p.name.endswith(".tmp")]


def test_mask() -> None:
    assert mask(SECRET) == "sk-ant-...a1b2"
    assert mask("short-key") == "****"


def test_resolve_order_vault_then_env(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config({})
    assert resolve_key(config, "anthropic") is None
    monkeypatch.setenv("ANTHROPIC_API_KEY", "from-env")
    assert resolve_key(config, "anthropic") == "from-env"
    KeyVault(home).set("anthropic", "from-vault")
    assert resolve_key(config, "anthropic") == "from-vault"
    # Unknown prefixes use PREFIX_API_KEY; config can rename both the env var and the vault entry.
    monkeypatch.setenv("MY_LLM_API_KEY", "x")
    assert resolve_key(config, "my-llm") == "x"
    custom = parse_config({"providers": {"openai": {"api_key_env": "WORK_OPENAI", "key_name": "work"}}})
    monkeypatch.setenv("WORK_OPENAI", "env-work")
    assert resolve_key(custom, "openai") == "env-work"
    KeyVault(home).set("work", "vault-work")
    assert resolve_key(custom, "openai") == "vault-work"


def test_missing_key_message() -> None:
    assert missing_key_message("anthropic") == "Anthropic API key not configured. Run: agentspace keys add anthropic"
    assert missing_key_message("openai") == "OpenAI API key not configured. Run: agentspace keys add openai"
    assert missing_key_message("gemini").startswith("Gemini API key not configured.")


def test_keys_add_from_stdin_is_never_echoed(home: Path) -> None:
    result = CliRunner().invoke(main, ["keys", "add", "anthropic"], input=SECRET + "\n")
    assert result.exit_code == 0, result.output
    assert SECRET not in result.output
    assert KeyVault(home).get("anthropic") == SECRET
    assert mode(home / "keys.json") == 0o600

    listed = CliRunner().invoke(main, ["keys", "list"])
    assert "anthropic" in listed.output and "sk-ant-...a1b2" in listed.output
    assert SECRET not in listed.output


def test_keys_add_prompts_hidden_on_a_terminal(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keys_cmd, "stdin_is_terminal", lambda: True)
    result = CliRunner().invoke(main, ["keys", "add", "openai"], input=SECRET + "\n")
    assert result.exit_code == 0, result.output
    assert "API key for openai" in result.output  # the prompt was shown...
    assert SECRET not in result.output  # ...and the typed key was not echoed
    assert KeyVault(home).get("openai") == SECRET


def test_keys_add_empty_is_an_error(home: Path) -> None:
    result = CliRunner().invoke(main, ["keys", "add", "anthropic"], input="\n")
    assert result.exit_code != 0
    assert "No key given" in result.output
    assert not (home / "keys.json").exists()


def test_keys_list_shows_env_fallback_masked(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-proj-0123456789abcdef9f3c")
    result = CliRunner().invoke(main, ["keys", "list"])
    assert result.exit_code == 0
    assert "OPENAI_API_KEY" in result.output and "sk-proj...9f3c" in result.output
    assert "0123456789abcdef" not in result.output


def test_keys_remove_and_path(home: Path) -> None:
    KeyVault(home).set("anthropic", SECRET)
    assert CliRunner().invoke(main, ["keys", "path"]).output.strip() == str(home / "keys.json")
    assert CliRunner().invoke(main, ["keys", "remove", "anthropic"]).exit_code == 0
    missing = CliRunner().invoke(main, ["keys", "remove", "anthropic"])
    assert missing.exit_code == 1 and "No key named 'anthropic'" in missing.output


def test_corrupt_vault_says_what_to_do(home: Path) -> None:
    home.mkdir(parents=True)
    (home / "keys.json").write_text("{not json")
    result = CliRunner().invoke(main, ["keys", "list"])
    assert result.exit_code == 1
    assert "keys.json is not valid JSON" in result.output and "Traceback" not in result.output


# --- gateway token ------------------------------------------------------------------------------


def test_token_created_once_private(home: Path) -> None:
    token = load_or_create_token(home)
    assert len(token) >= 43
    assert mode(token_path(home)) == 0o600
    assert load_or_create_token(home) == token


def test_token_command_and_rotation(home: Path) -> None:
    first = CliRunner().invoke(main, ["token"])
    assert first.exit_code == 0
    token = first.stdout.strip()
    assert token == load_or_create_token(home)
    rotated = CliRunner().invoke(main, ["token", "--rotate"])
    new = rotated.stdout.strip()
    assert new != token and new == load_or_create_token(home)
    assert "Running servers" in rotated.output
    assert mode(token_path(home)) == 0o600


def test_token_file_follows_rotation(home: Path) -> None:
    token_file = TokenFile(home)
    old = token_file.current()
    assert token_matches(token_file.current(), old)
    new = rotate_token(home)
    assert token_file.current() == new
    assert token_matches(token_file.current(), new) and not token_matches(token_file.current(), old)
    token_path(home).unlink()  # a deleted file keeps the last token instead of locking everyone out
    assert token_file.current() == new


def test_token_matches() -> None:
    assert token_matches("abc", "abc")
    assert not token_matches("abc", "abd")
    assert not token_matches("abc", "")
    assert not token_matches("", "")
    assert not token_matches("abc", None)
    assert token_matches("ünï", "ünï")
