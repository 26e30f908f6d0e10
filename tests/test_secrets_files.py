"""Secrets files (issue 15 item 9): a damaged, foreign or loosened ``keys.json`` / ``gateway-token`` or data
directory, met by a real ``agentspace serve`` and by the CLI.

A refusal is one line naming the file and the fix, before anything binds (never a traceback, never a server
that starts and then fails every chat). A mode that is merely too open on something of ours is tightened with
a warning; what may hold someone else's content (a symlink, another owner, writable by others) is refused.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient
from click.testing import CliRunner

from agentspace.cli import main as cli
from agentspace.gateway_token import rotate_token
from scripts.harness import GatewayProcess, child_env, write_config

NOBODY = 65534


def serve(tmp_path: Path, data: Path) -> subprocess.CompletedProcess[str]:
    """``agentspace serve`` on a free port; it must stop by itself (a server that starts is killed at the timeout)."""
    config = tmp_path / "agentspace.toml"
    write_config(config, {"storage": {"data_dir": str(data)}})
    return subprocess.run(
        [sys.executable, "-m", "agentspace", "serve", "--config", str(config), "--port", "0"],
        env=child_env(data),
        capture_output=True,
        text=True,
        timeout=30,
    )


def refused(result: subprocess.CompletedProcess[str], *parts: str) -> str:
    """The one error line of a refused start, after checking that nothing was served."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "listening" not in result.stdout and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    for part in parts:
        assert part in errors[0], errors[0]
    return errors[0]


def private_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    return data


def write(path: Path, content: bytes, mode: int = 0o600) -> None:
    path.write_bytes(content)
    os.chmod(path, mode)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b'{"keys": ["a"]}',
        b'{"keys": {"anthropic": null}}',
        b"[" * 5000,
        b'{"keys": {"anthropic": "sk-\xff\xfe"}}',
    ],
)
def test_serve_refuses_a_damaged_keys_json(tmp_path: Path, content: bytes) -> None:
    data = private_dir(tmp_path)
    write(data / "keys.json", content)
    refused(serve(tmp_path, data), str(data / "keys.json"), "agentspace keys add")
    listed = CliRunner().invoke(cli, ["keys", "list"], env={"AGENTSPACE_HOME": str(data)})
    assert listed.exit_code == 1 and str(data / "keys.json") in listed.output
    assert listed.exception is None or isinstance(listed.exception, SystemExit)  # no traceback


def test_serve_refuses_a_gateway_token_that_is_not_utf8(tmp_path: Path) -> None:
    data = private_dir(tmp_path)
    write(data / "gateway-token", b"\xff\xfe\x00garbage\n")
    line = refused(serve(tmp_path, data), str(data / "gateway-token"), "not UTF-8", "agentspace token --rotate")
    assert "garbage" not in line
    token = CliRunner().invoke(cli, ["token"], env={"AGENTSPACE_HOME": str(data)})
    assert token.exit_code == 1 and "not UTF-8" in token.output
    # The fix the line names works: a new token, and the server starts.
    assert CliRunner().invoke(cli, ["token", "--rotate"], env={"AGENTSPACE_HOME": str(data)}).exit_code == 0
    write(data / "gateway-token", b"two words\n")
    refused(serve(tmp_path, data), str(data / "gateway-token"), "usable token")


def test_gateway_token_is_not_followed_through_a_symlink(tmp_path: Path) -> None:
    data = private_dir(tmp_path)
    elsewhere = tmp_path / "planted-token"
    write(elsewhere, b"attacker-known-token-0123456789abcdef\n")
    (data / "gateway-token").symlink_to(elsewhere)
    refused(serve(tmp_path, data), str(data / "gateway-token"), "symbolic link")
    (data / "keys.json").symlink_to(elsewhere)
    (data / "gateway-token").unlink()
    refused(serve(tmp_path, data), str(data / "keys.json"), "symbolic link")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="giving a file away needs root")
def test_secrets_and_data_dir_of_another_owner_are_refused(tmp_path: Path) -> None:
    data = private_dir(tmp_path)
    write(data / "gateway-token", b"attacker-known-token-0123456789abcdef\n")
    os.chown(data / "gateway-token", NOBODY, NOBODY)
    refused(serve(tmp_path, data), str(data / "gateway-token"), "belongs to another user")
    (data / "gateway-token").unlink()
    os.chown(data, NOBODY, NOBODY)
    refused(serve(tmp_path, data), str(data), "belongs to another user")


def test_secrets_writable_by_others_are_refused(tmp_path: Path) -> None:
    data = private_dir(tmp_path)
    write(data / "gateway-token", b"someone-may-have-written-this-0123456789\n", mode=0o666)
    refused(serve(tmp_path, data), str(data / "gateway-token"), "writable by other users", "chmod 600")
    os.chmod(data / "gateway-token", 0o600)
    write(data / "keys.json", b'{"keys": {}}', mode=0o620)
    refused(serve(tmp_path, data), str(data / "keys.json"), "writable by other users")


async def test_loose_modes_of_our_own_are_tightened_with_a_warning(tmp_path: Path, fake_anthropic: object) -> None:
    data = tmp_path / "data"
    data.mkdir()
    os.chmod(data, 0o777)
    write(data / "gateway-token", b"readable-by-others-token-0123456789abcdef\n", mode=0o644)
    write(data / "keys.json", b'{"keys": {"openai": "sk-readable-0123456789"}}', mode=0o644)
    server = GatewayProcess(data, fake_anthropic.url)  # type: ignore[attr-defined]
    try:
        await server.start()
        assert server.token == "readable-by-others-token-0123456789abcdef"
        log = server.log()
        assert f"{data} was writable by other users" in log
        assert f"{data / 'gateway-token'} was readable by other users" in log
        assert f"{data / 'keys.json'} was readable by other users" in log
        assert (mode(data), mode(data / "gateway-token"), mode(data / "keys.json")) == (0o700, 0o600, 0o600)
    finally:
        await server.aclose()


async def test_running_server_keeps_its_token_when_the_file_is_damaged(
    client: TestClient, token: str, isolated_env: Path
) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    assert (await client.get("/api/sessions", headers=headers)).status == 200
    path = isolated_env / "gateway-token"
    path.unlink()
    write(path, b"\xff\xfe not a token")
    assert (await client.get("/api/sessions", headers=headers)).status == 200  # not a 500, not locked out
    path.unlink()
    path.symlink_to(tmp := isolated_env.parent / "planted")
    write(tmp, b"planted-token-0123456789abcdef0123\n")
    assert (await client.get("/api/sessions", headers=headers)).status == 200
    assert (
        await client.get("/api/sessions", headers={"Authorization": "Bearer planted-token-0123456789abcdef0123"})
    ).status == 401
    path.unlink()
    new = rotate_token(isolated_env)  # a good file is picked up again
    assert (await client.get("/api/sessions", headers={"Authorization": f"Bearer {new}"})).status == 200
