"""Two ``agentspace serve`` replicas on one PostgreSQL database and one Redis (README.md#running-several-replicas), real processes
against real servers: sessions, streams, locks and aborts work across them, and nothing is counted twice,
also when one replica is killed mid-stream."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from agentspace.cli import main
from agentspace.storage.postgres import PostgresDatabase
from scripts.harness import ROOT, GatewayProcess, child_env
from tests.fakes import anthropic_upstream as fa
from tests.scale_servers import TOKEN, Redis, flush_redis
from tests.support.ledgers import shared_entries, wait_for_notes

SLOW = " ".join(f"w{n}" for n in range(60))
# [storage] lease_seconds of the tests that wait for a dead replica's leases to lapse: its session locks (half a
# lease), pending calls (a lease) and budget reservations (one and a half) lapse as with the default 20 s, sooner.
SHORT_LEASE = 8.0


HEADERS = {"Authorization": f"Bearer {TOKEN}"}


def chat_body(session_id: str, text: str = "hello") -> dict[str, Any]:
    return {
        "id": session_id,
        "messages": [{"id": f"u-{text}", "role": "user", "parts": [{"type": "text", "text": text}]}],
    }


def text_of(body: bytes) -> str:
    chunks = [json.loads(line[6:]) for line in body.decode().split("\n\n") if line.startswith("data: {")]
    return "".join(c["delta"] for c in chunks if c["type"] == "text-delta")


def finish_of(body: bytes) -> list[dict[str, Any]]:
    chunks = [json.loads(line[6:]) for line in body.decode().split("\n\n") if line.startswith("data: {")]
    return [c for c in chunks if c["type"] in ("finish", "error", "abort")]


async def usage_rows(dsn: str) -> list[Any]:
    db = PostgresDatabase(dsn)
    try:
        async with db.connection() as conn:
            return list(await conn.fetch("SELECT id, is_error, answered FROM usage_records"))
    finally:
        await db.aclose()


async def test_a_stream_on_a_is_busy_resumable_and_stoppable_on_b(
    replicas: list[GatewayProcess], fake_anthropic: Any, pg_dsn: str
) -> None:
    a, b = replicas
    fake_anthropic.enqueue(fa.text_response(SLOW, chunks=60).with_delay(0.1))
    async with aiohttp.ClientSession(headers=HEADERS) as http:
        started = await http.post(f"{a.url}/api/chat", json=chat_body("s1"))
        assert started.status == 200
        first = await started.content.readuntil(b"text-delta")
        assert first

        # Busy on B while A streams it.
        async with http.post(f"{b.url}/api/chat", json=chat_body("s1", "again")) as busy:
            assert busy.status == 409
            assert (await busy.json())["error"]["code"] == "STREAM_IN_PROGRESS"

        # Resumed on B from its first chunk; stopped from B.
        resumed = await http.get(f"{b.url}/api/chat/s1/stream")
        assert resumed.status == 200
        resumed_first = await resumed.content.readuntil(b"text-delta")
        assert b'"type":"start"' in resumed_first
        async with http.delete(f"{b.url}/api/chat/s1/stream") as stop:
            assert stop.status == 204
        rest_a = first + await asyncio.wait_for(started.read(), 30)
        rest_b = resumed_first + await asyncio.wait_for(resumed.read(), 30)
        assert rest_b.endswith(b"data: [DONE]\n\n") and rest_a.endswith(b"data: [DONE]\n\n")
        assert len(text_of(rest_a).split()) < 60  # stopped before the end
        assert text_of(rest_b) == text_of(rest_a)  # B relayed the very stream A sent

        # The session, written on A, reads on B: the answer is stored, marked aborted.
        async with http.get(f"{b.url}/api/sessions/s1") as resp:
            session = (await resp.json())["session"]
        assert [m["role"] for m in session["messages"]] == ["user", "assistant"]
        assert session["messages"][1].get("aborted") is True
        # Free again: B takes the next turn; nothing is streaming any more.
        async with http.post(f"{b.url}/api/chat", json=chat_body("s1", "more")) as resp:
            assert resp.status == 200
            assert text_of(await resp.read()) == fa.DEFAULT_TEXT
        async with http.get(f"{a.url}/api/chat/s1/stream") as resp:
            assert resp.status == 204
    rows = await usage_rows(pg_dsn)
    assert len(rows) == 2 and len({r["id"] for r in rows}) == 2


async def test_fifty_clients_over_both_replicas_store_everything_once(
    replicas: list[GatewayProcess], pg_dsn: str
) -> None:
    async with aiohttp.ClientSession(headers=HEADERS) as http:

        async def one(n: int) -> str:
            server = replicas[n % 2]
            async with http.post(f"{server.url}/api/chat", json=chat_body(f"c{n}", f"q{n}")) as resp:
                assert resp.status == 200
                return text_of(await resp.read())

        answers = await asyncio.gather(*(one(n) for n in range(50)))
        assert answers == [fa.DEFAULT_TEXT] * 50
        async with http.get(f"{replicas[0].url}/api/sessions") as resp:
            listed = (await resp.json())["sessions"]
        assert sorted(s["id"] for s in listed) == sorted(f"c{n}" for n in range(50))
        assert all(s["messageCount"] == 2 for s in listed)
        async with http.get(f"{replicas[1].url}/api/usage") as resp:
            report = await resp.json()
    assert report["grandTotal"]["requestCount"] == 50
    rows = await usage_rows(pg_dsn)
    assert len(rows) == 50 and len({r["id"] for r in rows}) == 50


@pytest.mark.parametrize("lease_seconds", [SHORT_LEASE])
async def test_sigkill_of_a_mid_stream_b_serves_and_the_lock_expires(
    replicas: list[GatewayProcess], fake_anthropic: Any, pg_dsn: str
) -> None:
    a, b = replicas
    fake_anthropic.enqueue(fa.text_response(SLOW, chunks=60).with_delay(0.2))
    async with aiohttp.ClientSession(headers=HEADERS) as http:
        started = await http.post(f"{a.url}/api/chat", json=chat_body("k1"))
        assert started.status == 200
        await started.content.readuntil(b"text-delta")
        # The shared ledger has heard that the upstream answered (soon; later under load).
        await wait_for_notes(lambda: shared_entries(pg_dsn), 1, lambda e: bool(e.get("answered")))
        await a.kill()  # SIGKILL: no shutdown, the lock is not released
        started.close()

        # B keeps serving other sessions at once.
        async with http.post(f"{b.url}/api/chat", json=chat_body("k2")) as resp:
            assert resp.status == 200 and text_of(await resp.read()) == fa.DEFAULT_TEXT
        # The dead replica's session is busy until its lock expires, then B takes it.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:
            async with http.post(f"{b.url}/api/chat", json=chat_body("k1", "retry")) as resp:
                if resp.status == 200:
                    assert text_of(await resp.read()) == fa.DEFAULT_TEXT
                    break
                assert resp.status == 409
            assert loop.time() < deadline, "the lock of the killed replica never expired"
            await asyncio.sleep(0.5)
        # A resume of the dead stream on B ends instead of hanging.
        async with http.get(f"{b.url}/api/chat/k1/stream") as resp:
            assert resp.status == 204
        # A's call is not lost with A: once its lease lapses, B posts it from the shared ledger.
        deadline = loop.time() + 60
        while True:
            rows = await usage_rows(pg_dsn)
            if sum(1 for r in rows if r["answered"]) == 3:  # k2, the retry of k1, and A's call recovered
                break
            assert loop.time() < deadline, "the dead replica's call was never recovered"
            await asyncio.sleep(1)
    assert len(rows) == len({r["id"] for r in rows})
    recovered = [r for r in await recorded(pg_dsn) if r.get("recovered")]
    assert len(recovered) == 1 and recovered[0]["endpoint"] == "http" and recovered[0]["inputTokens"] == 25


async def recorded(dsn: str) -> list[dict[str, Any]]:
    db = PostgresDatabase(dsn)
    try:
        async with db.connection() as conn:
            return [json.loads(r["record"]) for r in await conn.fetch("SELECT record FROM usage_records")]
    finally:
        await db.aclose()


@pytest.mark.parametrize("lease_seconds", [SHORT_LEASE])
async def test_a_replica_killed_mid_stream_its_calls_are_recovered_and_its_reservations_released(
    replicas: list[GatewayProcess], fake_anthropic: Any, pg_dsn: str
) -> None:
    a, b = replicas
    # message_start reports 5000 input tokens, then the stream stalls: the replica dies with the calls open.
    fake_anthropic.default = fa.text_response("tok " * 80, chunks=80, usage={"input_tokens": 5000}).stall(120, after=20)
    async with aiohttp.ClientSession(headers=HEADERS) as http:
        async with http.post(f"{a.url}/api/clients", json={"name": "team", "budgetUsd": 1.0}) as resp:
            key = (await resp.json())["key"]
        client_headers = {"Authorization": f"Bearer {key}", "anthropic-version": "2023-06-01"}
        messages = [{"role": "user", "content": "Hi"}]
        model = "anthropic/claude-sonnet-4-5"
        calls = [  # every way in: the path, its body, and a mark that the answer is streaming
            ("/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 1024, "stream": True, "messages": messages},
             b"content_block_delta"),
            ("/v1/chat/completions", {"model": model, "max_tokens": 1024, "stream": True, "messages": messages},
             b'"content"'),
            ("/v1/responses", {"model": model, "max_output_tokens": 1024, "stream": True, "input": "Hi"},
             b"response.output_text.delta"),
            ("/api/chat", chat_body("killed-mid-stream"), b"text-delta"),
        ]  # fmt: skip
        streams = [await http.post(a.url + path, json=body, headers=client_headers) for path, body, _ in calls]
        for resp, (_, _, mark) in zip(streams, calls, strict=True):
            assert resp.status == 200
            await resp.content.readuntil(mark)
        # The reported input and the output relayed reach the shared ledger (within a second, later under load).
        await wait_for_notes(lambda: shared_entries(pg_dsn), len(calls))
        await a.kill()
        for resp in streams:
            resp.close()

        loop = asyncio.get_running_loop()
        killed_at = loop.time()
        while True:
            records = [r for r in await recorded(pg_dsn) if r.get("client") == "team"]
            async with http.get(f"{b.url}/api/clients/team") as resp:
                spend = (await resp.json())["client"]["spend"]["usd"]
            posted = sum(r["totalCost"] for r in records)
            if len(records) == len(calls) and spend == pytest.approx(posted):  # recovered, and nothing held any more
                break
            assert loop.time() - killed_at < 60, (records, spend)
            await asyncio.sleep(1)
    assert sorted(r["endpoint"] for r in records) == ["anthropic", "http", "openai", "responses"]
    for record in records:
        assert record["recovered"] is True and record["inputTokens"] == 5000 and record["answered"] is True
        assert record["estimatedFields"] == ["outputTokens"]


async def test_serve_workers_share_one_port(
    tmp_path: Path, fake_anthropic: Any, pg_dsn: str, redis_srv: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``agentspace serve --workers 2``: two processes on one port (SO_REUSEPORT), every answer stored once."""
    monkeypatch.setenv("AGENTSPACE_GATEWAY_TOKEN", TOKEN)
    await flush_redis(redis_srv)
    storage = {"backend": "postgres", "dsn": pg_dsn, "redis_url": redis_srv.url}
    layout = GatewayProcess(tmp_path / "data", fake_anthropic.url, storage=storage)  # writes the config
    layout.data_dir.mkdir(parents=True)
    with open(layout.log_path, "ab") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agentspace", "serve", "--config", str(layout.config_path),
            "--port", "0", "--workers", "2",
            stdout=asyncio.subprocess.PIPE, stderr=log, env=child_env(layout.data_dir), cwd=ROOT,
        )  # fmt: skip
    try:
        assert process.stdout is not None
        urls = set()
        while len(urls) < 1 or len([line for line in layout.log().splitlines() if "shared through Redis" in line]) < 2:
            line = await asyncio.wait_for(process.stdout.readline(), 60)
            if b"listening on" in line:
                urls.add(line.split()[3].decode())
        assert len(urls) == 1  # one port for both
        [url] = urls
        async with aiohttp.ClientSession(headers=HEADERS) as http:

            async def one(n: int) -> str:
                async with http.post(f"{url}/api/chat", json=chat_body(f"w{n}", f"q{n}")) as resp:
                    assert resp.status == 200
                    return text_of(await resp.read())

            assert await asyncio.gather(*(one(n) for n in range(20))) == [fa.DEFAULT_TEXT] * 20
        rows = await usage_rows(pg_dsn)
        assert len(rows) == 20 and len({r["id"] for r in rows}) == 20
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 60) == 0


def test_workers_need_a_shared_backend(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["--data-dir", str(tmp_path / "d"), "serve", "--workers", "2"])
    assert result.exit_code == 1
    assert "--workers needs a storage backend several processes can share" in result.output


async def test_delete_stops_the_running_answer_in_one_process(
    make_client: Any, fake_anthropic: Any, auth_headers: dict[str, str]
) -> None:
    """``DELETE /api/chat/{id}/stream`` without Redis: the one process stops its own turn."""
    client = await make_client()
    fake_anthropic.enqueue(fa.text_response(SLOW, chunks=60).with_delay(0.1))
    started = await client.post("/api/chat", json=chat_body("one"), headers=auth_headers)
    assert started.status == 200
    first = await started.content.readuntil(b"text-delta")
    stop = await client.delete("/api/chat/one/stream", headers=auth_headers)
    assert stop.status == 204
    body = first + await started.read()
    assert len(text_of(body).split()) < 60 and body.endswith(b"data: [DONE]\n\n")
    nothing = await client.delete("/api/chat/one/stream", headers=auth_headers)
    assert nothing.status == 404 and (await nothing.json())["error"]["code"] == "NOT_FOUND"


async def test_redis_losing_its_state_mid_stream_does_not_let_budgets_be_exceeded(
    replicas: list[GatewayProcess], fake_anthropic: Any, redis_srv: Redis
) -> None:
    """Redis restarted without persistence while two calls stream: the reservations of the calls in flight
    are rebuilt before any new reservation is admitted, so the budget holds."""
    import redis.asyncio as aioredis

    a, b = replicas
    # Each call reports 1000 output tokens ($0.015) and takes about 4 s; max_tokens 1024 reserves ~$0.0154.
    fake_anthropic.default = fa.text_response(
        "tok " * 40, chunks=40, delta_usages=[{"output_tokens": 1000}]
    ).with_delay(0.1)
    async with aiohttp.ClientSession(headers=HEADERS) as http:
        async with http.post(f"{a.url}/api/clients", json={"name": "team", "budgetUsd": 0.05}) as resp:
            key = (await resp.json())["key"]
        headers = {"Authorization": f"Bearer {key}", "anthropic-version": "2023-06-01"}
        body = {
            "model": "claude-sonnet-4-5",
            "max_tokens": 1024,
            "stream": True,
            "messages": [{"role": "user", "content": "Hi"}],
        }

        async def call(server: GatewayProcess, admitted: asyncio.Event | None = None) -> int:
            async with http.post(f"{server.url}/v1/messages", json=body, headers=headers) as resp:
                if admitted is not None:
                    admitted.set()  # the answer's headers follow the admission
                await resp.read()
                return resp.status

        admitted = [asyncio.Event(), asyncio.Event()]
        in_flight = [asyncio.ensure_future(call(s, e)) for s, e in zip((a, b), admitted, strict=True)]
        # Both admitted and streaming (a fixed sleep let a loaded machine admit the second after the loss).
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in admitted)), 30)
        redis = aioredis.from_url(redis_srv.url)
        await redis.flushall()  # Redis lost its state, mid-stream
        await redis.aclose()
        after = await asyncio.gather(*(call(s) for s in (a, b, a)))
        assert await asyncio.gather(*in_flight) == [200, 200]
        assert all(status in (200, 503) for status in after), after
        async with http.get(f"{b.url}/api/usage?by=client") as resp:
            spent = (await resp.json())["perClient"]["team"]["totalCost"]
    assert spent <= 0.05  # without the rebuild, the three calls after the loss were admitted: $0.075


async def stop_running(*servers: GatewayProcess) -> None:
    """Stop the gateways a test started that still run (one may have been killed on purpose)."""
    for server in servers:
        if server.process is not None and server.process.returncode is None:
            await server.terminate()


async def own_database(
    redis_srv: Redis, monkeypatch: pytest.MonkeyPatch, lease_seconds: float
) -> tuple[Any, dict[str, Any]]:
    """A PostgreSQL of the test's own (it stops and starts it), and the storage config of replicas using it."""
    from tests.scale_servers import Postgres, pg_bindir

    if pg_bindir() is None:
        pytest.skip("PostgreSQL is not installed")
    monkeypatch.setenv("AGENTSPACE_GATEWAY_TOKEN", TOKEN)
    await flush_redis(redis_srv)
    pg = Postgres()
    return pg, {"backend": "postgres", "dsn": pg.dsn, "redis_url": redis_srv.url, "lease_seconds": lease_seconds}


async def test_database_down_then_a_replica_killed_every_call_seen_to_end_has_its_record_as_reported(
    tmp_path: Path, fake_anthropic: Any, redis_srv: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two replicas under mixed /v1 load; the database stops for half a lease and replica A is SIGKILLed before
    it returns. Every call a client saw end successfully has its record, with the usage the upstream reported:
    the other replica recovering A's lapsed calls must not replace what A's spool kept with an estimate."""
    pg, storage = await own_database(redis_srv, monkeypatch, SHORT_LEASE)
    # Each stream reports 3000 input tokens at its start and 500 output tokens at its end, about 3 s long.
    fake_anthropic.default = fa.text_response(
        "tok " * 30, chunks=30, usage={"input_tokens": 3000}, delta_usages=[{"output_tokens": 500}]
    ).with_delay(0.1)
    a, b = (GatewayProcess(tmp_path / name, fake_anthropic.url, storage=storage) for name in ("a", "b"))
    restarted = GatewayProcess(tmp_path / "a", fake_anthropic.url, storage=storage)
    messages = [{"role": "user", "content": "Hi"}]
    bodies = {
        "/v1/messages": {"model": "claude-sonnet-4-5", "max_tokens": 1024, "stream": True, "messages": messages},
        "/v1/chat/completions": {
            "model": "anthropic/claude-sonnet-4-5",
            "max_tokens": 1024,
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": messages,
        },
        "/v1/responses": {"model": "anthropic/claude-sonnet-4-5", "stream": True, "input": "Hi"},
    }
    ends = {
        "/v1/messages": b"event: message_stop",
        "/v1/chat/completions": b"data: [DONE]",
        "/v1/responses": b"response.completed",
    }
    try:
        await asyncio.gather(a.start(), b.start())
        async with (
            aiohttp.ClientSession(headers=HEADERS) as http,
            http.post(f"{a.url}/api/clients", json={"name": "team", "budgetUsd": 10.0}) as resp,
        ):
            key = (await resp.json())["key"]
        headers = {"Authorization": f"Bearer {key}", "anthropic-version": "2023-06-01"}
        async with aiohttp.ClientSession(headers=headers) as http:
            streams = []
            for n in range(12):
                server, path = (a, b)[n % 2], list(bodies)[n % 3]
                resp = await http.post(server.url + path, json=bodies[path])
                assert resp.status == 200, await resp.text()
                streams.append((server, path, resp))
            firsts = [await resp.content.readany() for _, _, resp in streams]  # streaming: message_start relayed
            await asyncio.sleep(1.2)  # the reported input reaches the shared ledger's notes
            pg.stop()  # the database goes away mid-stream
            stopped_at = asyncio.get_running_loop().time()
            for first, (_, path, resp) in zip(firsts, streams, strict=True):
                body = first + await resp.read()
                assert ends[path] in body, (path, body[-300:])  # each client saw its call end successfully
            for server in (a, b):  # a new call cannot write its pending entry: refused before it is sent
                refused = await http.post(server.url + "/v1/messages", json={**bodies["/v1/messages"], "stream": False})
                assert refused.status == 503, await refused.text()
            assert len(fake_anthropic.requests) == 12
            await a.kill()  # before the database returns
            await asyncio.sleep(max(0.0, SHORT_LEASE / 2 - (asyncio.get_running_loop().time() - stopped_at)))
            pg.start()

            # B posts its own spooled records, and recovers A's calls once their leases lapse.
            deadline = asyncio.get_running_loop().time() + 60
            while len(await recorded(pg.dsn)) < 12:
                assert asyncio.get_running_loop().time() < deadline, await recorded(pg.dsn)
                await asyncio.sleep(1)
            await restarted.start()  # A comes back: its spool holds the records as the upstream reported them
            await asyncio.sleep(2)
        records = await recorded(pg.dsn)
        assert len(records) == 12 and len({r["id"] for r in records}) == 12
        for record in records:
            assert (record["inputTokens"], record["outputTokens"]) == (3000, 500), record
            assert not record.get("recovered") and not record.get("estimatedFields"), record
        posted = sum(r["totalCost"] for r in records)
        async with aiohttp.ClientSession(headers=HEADERS) as http:
            async with http.get(f"{b.url}/api/usage") as resp:
                report = await resp.json()
            for server in (b, restarted):  # the estimates' cost is out of the spend again, on every replica
                async with http.get(f"{server.url}/api/clients/team") as resp:
                    assert (await resp.json())["client"]["spend"]["usd"] == pytest.approx(posted)
        assert report["grandTotal"]["requestCount"] == 12 and report["grandTotal"]["totalCost"] == pytest.approx(posted)
        assert report["grandTotal"]["outputTokens"] == 12 * 500 and report["grandTotal"]["estimatedCount"] == 0
    finally:
        await stop_running(a, b, restarted)
        pg.close()


async def test_redis_killed_and_restarted_mid_stream_refuses_while_away_and_budgets_hold(
    tmp_path: Path, fake_anthropic: Any, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis SIGKILLed while a call streams on each replica, then started again, empty: while it is away, and
    while the replicas put their calls in flight back, a new call is refused (503, nothing sent); after that,
    the calls still in flight count against the budget, so it holds."""
    monkeypatch.setenv("AGENTSPACE_GATEWAY_TOKEN", TOKEN)
    redis_srv = Redis()
    # The short lease: the rebuild window is 5 s (two renewals of 2 s, and one), not 11.
    storage = {"backend": "postgres", "dsn": pg_dsn, "redis_url": redis_srv.url, "lease_seconds": SHORT_LEASE}
    a, b = (GatewayProcess(tmp_path / name, fake_anthropic.url, storage=storage) for name in ("a", "b"))
    # Each call reports 1000 output tokens ($0.015) and takes about 10 s, longer than the rebuild window;
    # max_tokens 1024 reserves ~$0.0154.
    fake_anthropic.default = fa.text_response(
        "tok " * 40, chunks=40, delta_usages=[{"output_tokens": 1000}]
    ).with_delay(0.25)
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "stream": True,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    try:
        await asyncio.gather(a.start(), b.start())
        async with aiohttp.ClientSession(headers=HEADERS) as http:
            async with http.post(f"{a.url}/api/clients", json={"name": "team", "budgetUsd": 0.05}) as resp:
                key = (await resp.json())["key"]
            headers = {"Authorization": f"Bearer {key}", "anthropic-version": "2023-06-01"}

            async def call(server: GatewayProcess, admitted: asyncio.Event | None = None) -> int:
                async with http.post(f"{server.url}/v1/messages", json=body, headers=headers) as resp:
                    if admitted is not None:
                        admitted.set()
                    await resp.read()
                    return resp.status

            later: list[asyncio.Future[int]] = []

            async def admission(server: GatewayProcess) -> int:
                """The answer's status, which follows the admission; an admitted call reads on meanwhile."""
                started = asyncio.Event()
                later.append(asyncio.ensure_future(call(server, started)))
                await asyncio.wait([asyncio.ensure_future(started.wait()), later[-1]], return_when="FIRST_COMPLETED")
                return 200 if not later[-1].done() else later[-1].result()

            admitted = [asyncio.Event(), asyncio.Event()]
            in_flight = [asyncio.ensure_future(call(s, e)) for s, e in zip((a, b), admitted, strict=True)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in admitted)), 30)
            redis_srv.kill()  # mid-stream
            async with http.post(f"{b.url}/v1/messages", json={**body, "stream": False}, headers=headers) as resp:
                assert resp.status == 503 and "Redis" in (await resp.json())["error"]["message"]
            assert len(fake_anthropic.requests) == 2  # the refused call sent nothing
            redis_srv.start()  # back, empty
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while (first := await admission(a)) == 503:  # the rebuild window: refused, nothing sent
                assert loop.time() < deadline
                await asyncio.sleep(0.5)
            assert not any(f.done() for f in in_flight)  # still streaming: their reservations were put back
            after = [first, await admission(b), await admission(a)]
            assert await asyncio.gather(*in_flight) == [200, 200]
            await asyncio.gather(*later)
            async with http.get(f"{b.url}/api/usage?by=client") as resp:
                spent = (await resp.json())["perClient"]["team"]["totalCost"]
        # $0.0308 still reserved by the calls in flight: one more call fits in $0.05, not three.
        assert sorted(after) == [200, 429, 429], after
        assert spent <= 0.05, (spent, after)
    finally:
        await stop_running(a, b)
        redis_srv.close()


async def test_redis_restarted_from_an_older_snapshot_does_not_let_budgets_be_exceeded(
    tmp_path: Path, fake_anthropic: Any, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis with persistence (Debian's default) killed and started again: it loads its last snapshot, which
    holds the epoch but a spend older than the records posted since. The restart is a loss of state too: the
    spend is read back from the database, not taken from the snapshot, so the budget holds."""
    import redis.asyncio as aioredis

    monkeypatch.setenv("AGENTSPACE_GATEWAY_TOKEN", TOKEN)
    redis_srv = Redis(snapshot_dir=tmp_path)
    storage = {"backend": "postgres", "dsn": pg_dsn, "redis_url": redis_srv.url, "lease_seconds": SHORT_LEASE}
    a, b = (GatewayProcess(tmp_path / name, fake_anthropic.url, storage=storage) for name in ("a", "b"))
    # Each call costs $0.015 (1000 output tokens) and reserves ~$0.0154 (max_tokens 1024).
    fake_anthropic.default = fa.text_response("tok", delta_usages=[{"output_tokens": 1000}])
    body = {"model": "claude-sonnet-4-5", "max_tokens": 1024, "messages": [{"role": "user", "content": "Hi"}]}
    try:
        await asyncio.gather(a.start(), b.start())
        async with aiohttp.ClientSession(headers=HEADERS) as http:
            async with http.post(f"{a.url}/api/clients", json={"name": "team", "budgetUsd": 0.05}) as resp:
                key = (await resp.json())["key"]
            headers = {"Authorization": f"Bearer {key}", "anthropic-version": "2023-06-01"}

            async def call(server: GatewayProcess) -> int:
                async with http.post(f"{server.url}/v1/messages", json=body, headers=headers) as resp:
                    await resp.read()
                    return resp.status

            assert await call(a) == 200
            redis = aioredis.from_url(redis_srv.url)
            await redis.save()  # the snapshot: the epoch, and $0.015 spent
            await redis.aclose()
            assert [await call(b), await call(a)] == [200, 200]  # $0.045 spent: no call of $0.0154 fits any more
            redis_srv.kill()
            redis_srv.start()  # back, with the snapshot's $0.015
            after = [await call(s) for s in (a, b, a, b)]
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while (status := await call(a)) == 503:  # a rebuild, if any, ends
                assert loop.time() < deadline
                await asyncio.sleep(0.5)
            after.append(status)
            async with http.get(f"{b.url}/api/usage?by=client") as resp:
                spent = (await resp.json())["perClient"]["team"]["totalCost"]
        assert all(status in (429, 503) for status in after), after
        assert spent <= 0.05, (spent, after)
    finally:
        await stop_running(a, b)
        redis_srv.close()


async def test_a_database_outage_longer_than_a_lease_does_not_recover_the_calls_of_live_replicas(
    tmp_path: Path, fake_anthropic: Any, redis_srv: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database stops for 12 s, longer than a lease (10 s here), while calls stream on A: no replica could
    renew meanwhile, so the lapsed leases do not mean A died, even when B gets to the database first. A's
    calls end with the figures the upstream reported, not with estimates B recovered while A streamed them."""
    lease = 10.0  # renewed every 2.5 s
    pg, storage = await own_database(redis_srv, monkeypatch, lease)
    # About 24 s each: they outlast the outage and the first scans after it.
    fake_anthropic.default = fa.text_response(
        "tok " * 60, chunks=60, usage={"input_tokens": 3000}, delta_usages=[{"output_tokens": 500}]
    ).with_delay(0.4)
    a, b = (GatewayProcess(tmp_path / name, fake_anthropic.url, storage=storage) for name in ("a", "b"))
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "stream": True,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    try:
        await asyncio.gather(a.start(), b.start())
        async with aiohttp.ClientSession(headers={**HEADERS, "anthropic-version": "2023-06-01"}) as http:

            async def call() -> bytes:
                async with http.post(f"{a.url}/v1/messages", json=body) as resp:
                    assert resp.status == 200
                    return await resp.read()

            streams = [asyncio.ensure_future(call()) for _ in range(2)]
            await asyncio.sleep(2)
            pg.stop()
            await asyncio.sleep(lease + 2)
            assert a.process is not None
            # A is slow to come back (paused for 4 s, longer than B takes to retry): B, which could reach nothing
            # either, is there first.
            a.process.send_signal(signal.SIGSTOP)
            try:
                pg.start()
                await asyncio.sleep(4)
            finally:
                a.process.send_signal(signal.SIGCONT)
            for body_seen in await asyncio.gather(*streams):
                assert b"event: message_stop" in body_seen
            deadline = asyncio.get_running_loop().time() + 30
            while len(records := await recorded(pg.dsn)) < 2:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(1)
        assert len(records) == 2
        for record in records:
            assert (record["inputTokens"], record["outputTokens"]) == (3000, 500), record
            assert not record["recovered"], record
        # Nor were they recovered meanwhile (A's records, as reported, would have taken the estimates' places).
        assert "left pending by a replica that stopped" not in b.log() + a.log()
    finally:
        await stop_running(a, b)
        pg.close()
