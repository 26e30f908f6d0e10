"""One usage record per call across replicas, whatever the timestamps (docs/accounting.md): replica A alone
loses the database (a TCP proxy in front of PostgreSQL, cut and restored) for longer than a lease, so replica B
recovers A's calls with estimates; A's own records, as the upstream reported them, then take the estimates'
place -- in the records, the rollups and the client's spend -- instead of being stored beside them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agentspace.storage.postgres import PostgresDatabase, PostgresUsageStore
from scripts.harness import GatewayProcess
from tests.fakes import anthropic_upstream as fa
from tests.scale_servers import TOKEN, Redis, flush_redis
from tests.test_replicas import HEADERS, recorded, stop_running


class CuttableProxy:
    """A TCP proxy on 127.0.0.1: while cut, every connection through it is closed and new ones are dropped."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.cut = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    def sever(self) -> None:
        self.cut = True
        for writer in list(self._writers):
            writer.transport.abort()

    async def aclose(self) -> None:
        self.sever()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def ws_turn(server: GatewayProcess, key: str) -> list[str]:
    """A WebSocket turn: what ended it (the last frame's message, or its type)."""
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(server.ws_url, headers={"Authorization": f"Bearer {key}"}) as ws,
    ):
        await ws.send_json({"type": "chat.send", "id": "r", "content": "Hi"})
        frames: list[dict[str, Any]] = []
        while not frames or frames[-1]["type"] not in ("chat.stream.end", "error"):
            frames.append(json.loads((await ws.receive(timeout=60)).data))
    return [str(f.get("message") or f["type"]) for f in frames[-2:]]


async def api_chat(server: GatewayProcess, key: str) -> list[str]:
    """A turn over POST /api/chat: its last events."""
    body = {"id": "s-http", "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "Hi"}]}]}
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession() as http, http.post(f"{server.url}/api/chat", json=body, headers=headers) as resp:
        assert resp.status == 200
        events = [json.loads(e[6:]) for e in (await resp.read()).decode().split("\n\n") if e.startswith("data: {")]
    return [str(e.get("errorText") or e["type"]) for e in events[-2:]]


async def spend_and_rollups(dsn: str) -> tuple[int, float, int]:
    """How many records are stored, and the rollups' cost and count of estimated records."""
    db = PostgresDatabase(dsn)
    try:
        async with db.connection() as conn:
            rolled = await conn.fetchrow(
                "SELECT coalesce(sum(total_cost), 0), coalesce(sum(estimated), 0) FROM usage_rollups"
            )
            assert rolled is not None
            assert await conn.fetchval("SELECT count(*) FROM usage_recovered") == 0  # no estimate left marked
            return int(await conn.fetchval("SELECT count(*) FROM usage_records")), float(rolled[0]), int(rolled[1])
    finally:
        await db.aclose()


async def test_a_replica_cut_off_longer_than_a_lease_its_reported_records_replace_the_estimates(
    tmp_path: Path, fake_anthropic: Any, pg_dsn: str, redis_srv: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A streams three calls (/v1/messages, /v1/responses, /v1/chat/completions) and two turns (WebSocket,
    /api/chat), B one call; the database is cut off from A alone. Four of A's end while A is cut off (their
    records spooled and retried), the /v1/chat/completions call after.
    B recovers A's calls with estimates once A's leases lapse; when A reaches the database again each call has
    one record, as the upstream reported it, and the estimates are gone from the rollups and from the client's
    spend, on both replicas."""
    monkeypatch.setenv("AGENTSPACE_GATEWAY_TOKEN", TOKEN)
    await flush_redis(redis_srv)
    port = int(pg_dsn.rsplit(":", 1)[1].split("/", 1)[0])
    proxy = CuttableProxy(port)
    await proxy.start()
    a_dsn = pg_dsn.replace(f":{port}/", f":{proxy.port}/")
    # A lease of 8 s, not the default 20: B takes A for dead, and recovers its calls, that much sooner.
    storage = {"redis_url": redis_srv.url, "backend": "postgres", "lease_seconds": 8.0}
    a = GatewayProcess(tmp_path / "a", fake_anthropic.url, storage={**storage, "dsn": a_dsn})
    b = GatewayProcess(tmp_path / "b", fake_anthropic.url, storage={**storage, "dsn": pg_dsn})
    short = fa.text_response(
        "tok " * 80, chunks=80, usage={"input_tokens": 3000}, delta_usages=[{"output_tokens": 500}]
    )
    long = fa.text_response("tok " * 60, chunks=60, usage={"input_tokens": 3000}, delta_usages=[{"output_tokens": 500}])
    messages = [{"role": "user", "content": "Hi"}]
    calls = [  # replica, path, body, what ends its stream; the upstream answers in this order
        (a, "/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 1024, "messages": messages}, b"message_stop"),
        (a, "/v1/responses", {"model": "anthropic/claude-sonnet-4-5", "input": "Hi"}, b"response.completed"),
        (b, "/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 1024, "messages": messages}, b"message_stop"),
        (
            a,
            "/v1/chat/completions",
            {"model": "anthropic/claude-sonnet-4-5", "stream_options": {"include_usage": True}, "messages": messages},
            b"data: [DONE]",
        ),
    ]
    for response in (short, short, short):
        fake_anthropic.enqueue(response.with_delay(0.1))  # 8 s at most: A's end while A is cut off
    fake_anthropic.enqueue(long.with_delay(0.3))  # 18 s at most: ends after A is back, or just before
    try:
        await asyncio.gather(a.start(), b.start())
        async with aiohttp.ClientSession(headers=HEADERS) as http:
            async with http.post(f"{b.url}/api/clients", json={"name": "team", "budgetUsd": 10.0}) as resp:
                key = (await resp.json())["key"]
        headers = {"Authorization": f"Bearer {key}", "anthropic-version": "2023-06-01"}
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession(headers=headers) as http:
            streams = []
            for server, path, body, _ in calls:
                resp = await http.post(server.url + path, json={**body, "stream": True})
                assert resp.status == 200, await resp.text()
                streams.append(asyncio.ensure_future(resp.read()))
            fake_anthropic.default = short.with_delay(0.1)
            turns = [asyncio.ensure_future(ws_turn(a, key)), asyncio.ensure_future(api_chat(a, key))]
            await asyncio.sleep(1.2)  # the reported input reaches the shared ledger
            proxy.sever()
            for stream, (_, _, _, end) in list(zip(streams, calls, strict=True))[:3]:
                assert end in await stream  # A spools the records of its calls that end now
            # The turns of sessions end with the answer relayed, and the session's write kept for a retry.
            for ends in await asyncio.gather(*turns):
                assert "could not be stored" in ends[-1] and "kept in memory" in ends[-1], ends
            deadline = loop.time() + 40
            while len(estimates := [r for r in await recorded(pg_dsn) if r.get("recovered")]) < 5:
                assert loop.time() < deadline, "B never recovered A's lapsed calls"
                await asyncio.sleep(0.5)
            proxy.cut = False  # A reaches the database again
            assert calls[3][3] in await streams[3]
            deadline = loop.time() + 30
            while (records := await recorded(pg_dsn)) and any(r.get("recovered") for r in records):
                assert loop.time() < deadline, records
                await asyncio.sleep(0.5)
            await asyncio.sleep(1.5)  # a duplicate would come now, if at all
        records = await recorded(pg_dsn)
        assert len(records) == 6 and len({r["id"] for r in records}) == 6, records
        assert sorted(r["endpoint"] for r in records) == ["anthropic", "anthropic", "http", "openai", "responses", "ws"]
        assert {r["id"] for r in estimates} < {r["id"] for r in records}
        for record in records:
            assert (record["inputTokens"], record["outputTokens"]) == (3000, 500), record
            assert not record.get("recovered") and not record.get("estimatedFields"), record
        posted = sum(r["totalCost"] for r in records)
        count, rolled_cost, rolled_estimated = await spend_and_rollups(pg_dsn)
        assert (count, rolled_estimated) == (6, 0) and rolled_cost == pytest.approx(posted)
        async with aiohttp.ClientSession(headers=HEADERS) as http:
            for server in (a, b):
                async with http.get(f"{server.url}/api/usage") as resp:
                    total = (await resp.json())["grandTotal"]
                assert total["requestCount"] == 6 and total["totalCost"] == pytest.approx(posted), total
                async with http.get(f"{server.url}/api/clients/team") as resp:
                    assert (await resp.json())["client"]["spend"]["usd"] == pytest.approx(posted)
        assert len(fake_anthropic.requests) == 6  # one record per call the upstream saw
    finally:
        await stop_running(a, b)
        await proxy.aclose()


def _record(n: int, *, recovered: bool) -> dict[str, Any]:
    """Call ``n``'s record: as reported (at its end, 1000 output tokens) or its estimate (at its start)."""
    second = 10 + n % 40
    return {
        "id": f"usage_{n}",
        "timestamp": f"2026-12-06T10:00:{second:02d}.000Z" if recovered else f"2026-12-06T10:01:{second:02d}.500Z",
        "model": "anthropic/claude-sonnet-4-5",
        "client": "team",
        "endpoint": "/v1/messages",
        "inputTokens": 100,
        "outputTokens": 40 if recovered else 1000,
        "totalTokens": 140 if recovered else 1100,
        "totalCost": 0.001 if recovered else 0.02,
        "estimated": recovered,
        "recovered": recovered,
        "finishReason": "error" if recovered else "stop",
        "error": "INTERRUPTED" if recovered else None,
    }


async def test_estimates_and_reported_records_raced_by_two_stores_leave_one_record_per_call(pg_dsn: str) -> None:
    """Two replicas' stores post, at once and in random order, the records as reported of 300 calls and the
    estimates of the same calls (another replica recovering them): each call ends with its reported record
    alone, the rollups hold exactly the records, and every estimate's cost is handed back once."""
    dbs = PostgresDatabase(pg_dsn), PostgresDatabase(pg_dsn, statement_cache_size=0)  # b: as behind PgBouncer
    stores = PostgresUsageStore(dbs[0], batch_size=7), PostgresUsageStore(dbs[1], batch_size=5)
    handed_back: list[tuple[str | None, float]] = []

    async def unsettle(client: str | None, cost: float) -> None:
        handed_back.append((client, cost))

    for store in stores:
        store.unsettle = unsettle
    rng = random.Random(7)
    try:
        calls = list(range(300))
        early = calls[:100]  # some estimates are stored first, so their reported records replace them
        await asyncio.gather(*(stores[1].append_dicts([_record(n, recovered=True)]) for n in early))
        rng.shuffle(calls)
        posts = [(0, _record(n, recovered=False)) for n in calls] + [(1, _record(n, recovered=True)) for n in calls]
        rng.shuffle(posts)

        async def post(n: int) -> None:
            await asyncio.sleep(rng.random() * 0.3)
            await stores[posts[n][0]].append_dicts([posts[n][1]])

        await asyncio.gather(*(post(n) for n in range(len(posts))))
        async with dbs[0].connection() as conn:
            rows = await conn.fetch("SELECT id, record FROM usage_records")
            rolled = await conn.fetchrow(
                "SELECT sum(output_tokens), sum(total_cost), sum(answered), sum(errors), sum(estimated) "
                "FROM usage_rollups"
            )
            marks = await conn.fetchval("SELECT count(*) FROM usage_recovered")
        assert sorted(r["id"] for r in rows) == sorted(f"usage_{n}" for n in range(300))
        assert all(not json.loads(r["record"])["recovered"] for r in rows)
        assert rolled is not None and tuple(rolled) == (300 * 1000, pytest.approx(300 * 0.02), 300, 0, 0)
        assert marks == 0
        # Each estimate was stored and taken out, or never stored: its cost handed back once either way (the
        # recorder settles what it posts, so the spend ends at the reported records' cost).
        assert len(handed_back) == 400 and {c for c, _ in handed_back} == {"team"}
        assert sum(cost for _, cost in handed_back) == pytest.approx(400 * 0.001)
    finally:
        for store in stores:
            await store.aclose()
        for db in dbs:
            await db.aclose()


async def test_a_call_ending_while_its_replica_cannot_reach_redis_still_counts_against_the_budget(
    tmp_path: Path, fake_anthropic: Any, pg_dsn: str, redis_srv: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis cut off from replica A alone while A's call streams: the call ends (its record stored in the
    database) but A cannot settle it in Redis. Once Redis is reachable again and the call's reservation would
    have lapsed, its cost still counts in the spend every replica admits against, so the budget holds."""
    monkeypatch.setenv("AGENTSPACE_GATEWAY_TOKEN", TOKEN)
    await flush_redis(redis_srv)
    proxy = CuttableProxy(redis_srv.port)
    await proxy.start()
    storage = {"backend": "postgres", "dsn": pg_dsn, "lease_seconds": 8.0}
    a = GatewayProcess(
        tmp_path / "a", fake_anthropic.url, storage={**storage, "redis_url": f"redis://127.0.0.1:{proxy.port}/0"}
    )
    b = GatewayProcess(tmp_path / "b", fake_anthropic.url, storage={**storage, "redis_url": redis_srv.url})
    # Each call costs $0.015 (1000 output tokens) and reserves ~$0.0154 (max_tokens 1024); streamed, about 3 s.
    fake_anthropic.default = fa.text_response(
        "tok " * 30, chunks=30, delta_usages=[{"output_tokens": 1000}]
    ).with_delay(0.1)
    body = {"model": "claude-sonnet-4-5", "max_tokens": 1024, "messages": [{"role": "user", "content": "Hi"}]}
    try:
        await asyncio.gather(a.start(), b.start())
        async with aiohttp.ClientSession(headers=HEADERS) as http:
            async with http.post(f"{b.url}/api/clients", json={"name": "team", "budgetUsd": 0.05}) as resp:
                key = (await resp.json())["key"]
            headers = {"Authorization": f"Bearer {key}", "anthropic-version": "2023-06-01"}
            for _ in range(2):  # $0.03 spent
                async with http.post(f"{b.url}/v1/messages", json=body, headers=headers) as resp:
                    assert resp.status == 200, await resp.text()
            async with http.post(f"{a.url}/v1/messages", json={**body, "stream": True}, headers=headers) as resp:
                assert resp.status == 200
                await resp.content.readuntil(b"content_block_delta")
                proxy.sever()  # A loses Redis mid-stream
                assert b"message_stop" in await resp.read()  # and the call ends: $0.045 spent
            proxy.cut = False  # Redis is back for A
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while True:  # A's reservation is no longer renewed: it lapses (1.5 leases)
                async with http.get(f"{b.url}/api/clients/team") as resp:
                    spend = (await resp.json())["client"]["spend"]
                if not spend["inFlightUsd"]:
                    break
                assert loop.time() < deadline, spend
                await asyncio.sleep(0.5)
            statuses = []
            for server in (b, a):  # no call of $0.0154 fits in the $0.005 left
                async with http.post(f"{server.url}/v1/messages", json=body, headers=headers) as resp:
                    statuses.append(resp.status)
            async with http.get(f"{b.url}/api/usage?by=client") as resp:
                spent = (await resp.json())["perClient"]["team"]["totalCost"]
        assert statuses == [429, 429], (statuses, spend)
        assert spent <= 0.05
    finally:
        await stop_running(a, b)
        await proxy.aclose()
