"""The CLI, the limits and the storage errors on the PostgreSQL backend (docs/deploy.md), real processes
against real servers: ``agentspace sessions`` and ``agentspace clients`` act on the configured database,
not on the data directory's files; a client's rate limit and budget hold across two replicas sharing one
Redis; a failed write names the database, not a disk."""

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
from tests.scale_servers import Postgres
from tests.test_replicas import chat_body, finish_of, text_of


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


# --- limits across two replicas -----------------------------------------------------------------


async def post_chat(http: aiohttp.ClientSession, server: GatewayProcess, key: str, session_id: str) -> Any:
    """One /api/chat call with a client key: (status, Retry-After, error code or the answer's text)."""
    async with http.post(
        f"{server.url}/api/chat", json=chat_body(session_id), headers={"Authorization": f"Bearer {key}"}
    ) as resp:
        if resp.status == 200:
            body = await resp.read()
            errors = [c for c in finish_of(body) if c["type"] == "error"]
            return resp.status, None, errors[0] if errors else text_of(body)
        return resp.status, resp.headers.get("Retry-After"), (await resp.json())["error"]["code"]


async def test_a_rate_limit_holds_across_two_replicas(replicas: list[GatewayProcess]) -> None:
    a, b = replicas
    config = str(a.config_path)
    key = (await cli_ok("clients", "add", "--config", config, "bot", "--rpm", "3")).splitlines()[0]
    async with aiohttp.ClientSession() as http:
        for n, server in enumerate((a, b, a)):
            assert (await post_chat(http, server, key, f"r{n}"))[0] == 200
        # The 4th request within the minute is refused on whichever replica gets it.
        for n, server in enumerate((b, a)):
            status, retry_after, code = await post_chat(http, server, key, f"over{n}")
            assert (status, code) == (429, "RATE_LIMITED")
            assert retry_after is not None and 1 <= int(retry_after) <= 60

        # Concurrent requests over both replicas: the window admits no more than its limit either.
        await cli_ok("clients", "add", "--config", config, "burst", "--rpm", "3")
        burst = (await cli_ok("clients", "rotate", "--config", config, "burst")).splitlines()[0]
        results = await asyncio.gather(*(post_chat(http, replicas[n % 2], burst, f"b{n}") for n in range(40)))
        answered = [r for r in results if r[2] == fa.DEFAULT_TEXT]
        # The others are refused: 429 before the stream starts, or the error in the stream when the check at
        # the provider call (the one that counts the request) finds the window full.
        refused = [r for r in results if r[0] == 429 or "3 requests per minute" in str(r[2])]
        assert (len(answered), len(refused)) == (3, 37), results

        # The same on /v1/messages, where little happens before the check: 60 calls at once.
        key = (await cli_ok("clients", "add", "--config", config, "v1-burst", "--rpm", "3")).splitlines()[0]

        async def message(n: int) -> int:
            body = {"model": "claude-sonnet-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
            headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
            async with http.post(f"{replicas[n % 2].url}/v1/messages", json=body, headers=headers) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(message(n) for n in range(60)))
    assert sorted(statuses) == [200] * 3 + [429] * 57, statuses


async def test_a_budget_holds_across_two_replicas(replicas: list[GatewayProcess], fake_anthropic: Any) -> None:
    a, b = replicas
    config = str(a.config_path)
    key = (await cli_ok("clients", "add", "--config", config, "alice", "--budget", "1")).splitlines()[0]

    async def spend() -> float:
        shown = json.loads(await cli_ok("clients", "show", "--config", config, "alice", "--json"))
        return float(shown["spend"]["usd"])

    async with aiohttp.ClientSession() as http:
        assert (await post_chat(http, a, key, "first"))[0] == 200
        one_call = await spend()
        assert one_call > 0
        # Nearly spent: room for one call's reservation ([chat] max_tokens 4096 at $15 per million output
        # tokens, about $0.061, and its input), not for two.
        budget = one_call + 0.07
        await cli_ok("clients", "set", "--config", config, "alice", "--budget", f"{budget:.12f}")
        fake_anthropic.default = fa.text_response().with_delay(0.3)  # the calls overlap
        results = await asyncio.gather(*(post_chat(http, replicas[n % 2], key, f"c{n}") for n in range(20)))
    answered = [r for r in results if r[2] == fa.DEFAULT_TEXT]
    # The others are refused: 429 before the stream starts, or the error in the stream when the reservation
    # at the provider call finds the budget taken.
    refused = [r for r in results if r[2] == "BUDGET_EXCEEDED" or "budget" in str(r[2])]
    assert len(answered) + len(refused) == 20, results
    assert len(answered) == 1  # the one admitted while spend + reservations + its own fit, on either replica
    assert await spend() <= budget


# --- storage errors name the store --------------------------------------------------------------


async def test_storage_errors_name_the_database_not_a_disk(tmp_path: Path, fake_anthropic: Any) -> None:
    pg = Postgres()  # its own server: this test stops it
    server = GatewayProcess(tmp_path / "data", fake_anthropic.url, storage={"backend": "postgres", "dsn": pg.dsn})
    fake_anthropic.enqueue(fa.text_response(" ".join(f"w{n}" for n in range(20)), chunks=20).with_delay(0.1))
    try:
        url = await server.start()
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {server.token}"}) as http:
            # The database goes away mid-answer: the stream ends with STORAGE_ERROR naming the database.
            async with http.post(f"{url}/api/chat", json=chat_body("mid")) as resp:
                assert resp.status == 200
                first = await resp.content.readuntil(b"text-delta")
                await asyncio.to_thread(pg.stop)
                body = first + await resp.read()
            errors = [c for c in finish_of(body) if c["type"] == "error"]
            assert len(errors) == 1, body[-500:]
            text = errors[0]["errorText"]
            assert "could not be stored" in text and "database" in text and "disk" not in text, text

            # A new message while it is down: refused up front, naming the database too.
            async with http.post(f"{url}/api/chat", json=chat_body("down")) as resp:
                assert resp.status == 503
                error = (await resp.json())["error"]
            assert error["code"] == "STORAGE_ERROR"
            assert "database" in error["message"] and "disk" not in error["message"], error
    finally:
        if server.process is not None and server.process.returncode is None:
            await server.terminate()
        pg.close()
