"""The CLI and the limits on the PostgreSQL backend (SPEC 11, 13), real processes against real servers:
``agentspace sessions`` and ``agentspace clients`` act on the configured database, not on the data
directory's files; a client's rate limit and budget hold across two replicas sharing one Redis."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner, Result

from agentspace.cli import main
from scripts.harness import GatewayProcess
from tests.fakes import anthropic_upstream as fa
from tests.test_replicas import chat_body, text_of


async def cli(*args: str) -> Result:
    """The CLI in a thread: its commands run their own event loop (``asyncio.run``)."""
    result = await asyncio.to_thread(CliRunner().invoke, main, list(args), catch_exceptions=False)
    return result


async def cli_ok(*args: str) -> str:
    result = await cli(*args)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture
async def one_gateway(tmp_path: Path, fake_anthropic: Any, pg_dsn: str) -> AsyncIterator[GatewayProcess]:
    server = GatewayProcess(tmp_path / "a", fake_anthropic.url, storage={"backend": "postgres", "dsn": pg_dsn})
    try:
        await server.start()
        yield server
    finally:
        if server.process is not None and server.process.returncode is None:
            await server.terminate()


async def test_sessions_and_clients_cli_use_the_postgres_backend(one_gateway: GatewayProcess) -> None:
    config = str(one_gateway.config_path)
    key = (await cli_ok("clients", "add", "--config", config, "team-a", "--budget", "5")).splitlines()[0]
    assert not (one_gateway.data_dir / "clients.json").exists()  # in the database, not in the data directory

    # The key added by the CLI authenticates on the running gateway: it is in the database the server reads.
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http:
        async with http.post(f"{one_gateway.url}/api/chat", json=chat_body("pg-s1")) as resp:
            assert resp.status == 200, await resp.text()
            assert text_of(await resp.read()) == fa.DEFAULT_TEXT

    shown = json.loads(await cli_ok("clients", "show", "--config", config, "team-a", "--json"))
    assert shown["spend"]["usd"] > 0  # the spend comes from the database's usage records
    listed = json.loads(await cli_ok("clients", "list", "--config", config, "--json"))
    assert [c["name"] for c in listed["clients"]] == ["team-a"]

    # The session the server wrote lists, shows and deletes through the CLI.
    sessions = json.loads(await cli_ok("sessions", "list", "--config", config, "--json"))
    assert [s["id"] for s in sessions] == ["pg-s1"] and sessions[0]["messageCount"] == 2
    session = json.loads(await cli_ok("sessions", "show", "--config", config, "pg-s1", "--json"))
    assert [m["role"] for m in session["messages"]] == ["user", "assistant"]
    assert session["messages"][1]["content"] == fa.DEFAULT_TEXT
    assert "pg-s1" in await cli_ok("sessions", "list", "--config", config)
    assert "Deleted session pg-s1" in await cli_ok("sessions", "delete", "--config", config, "pg-s1", "--yes")
    assert json.loads(await cli_ok("sessions", "list", "--config", config, "--json")) == []
    missing = await cli("sessions", "show", "--config", config, "pg-s1")
    assert missing.exit_code == 1 and "No session with id 'pg-s1'" in missing.output

    # Rotate and remove act on the database too: the server refuses the old key at once.
    new_key = (await cli_ok("clients", "rotate", "--config", config, "team-a")).splitlines()[0]
    async with aiohttp.ClientSession() as http:
        for used, status in ((key, 401), (new_key, 200)):
            async with http.get(f"{one_gateway.url}/api/sessions", headers={"Authorization": f"Bearer {used}"}) as resp:
                assert resp.status == status
    await cli_ok("clients", "remove", "--config", config, "team-a")
    gone = await cli("clients", "show", "--config", config, "team-a")
    assert gone.exit_code == 1 and "No client 'team-a'" in gone.output


async def test_the_cli_says_when_the_database_is_unreachable(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        f'[storage]\ndata_dir = "{tmp_path / "d"}"\nbackend = "postgres"\n'
        'dsn = "postgresql://postgres@127.0.0.1:1/none"\n',
        encoding="utf-8",
    )
    for args in (("sessions", "list"), ("clients", "list")):
        result = await cli(*args, "--config", str(config))
        assert result.exit_code == 1
        assert "Error:" in result.output and "Traceback" not in result.output
