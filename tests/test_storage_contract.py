"""The storage contract (the stores' protocols): one suite, run unchanged against every storage backend.

Each test gets a ``storage`` opened through the backend hook as the server opens it: tinydb in a fresh
data directory, postgres in a fresh database on a real PostgreSQL server (tests/scale_servers.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import pytest

from agentspace.config import parse_config
from agentspace.default_plugins.storage import open_storage
from agentspace.plugins import create_plugin_manager
from agentspace.stores import InvalidSessionId, MessageNotFound, SessionExists, SessionNotFound
from agentspace.stores.base import SessionStoreAPI, Storage, UsageStoreAPI
from agentspace.types import Cost, TokenUsage, UsageRecord

BACKENDS = ["tinydb", "postgres"]


@pytest.fixture(params=BACKENDS)
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    settings: dict[str, object] = {"data_dir": str(tmp_path), "backend": request.param}
    if request.param == "postgres":
        settings["dsn"] = request.getfixturevalue("pg_dsn")
    config = parse_config({"storage": settings})
    opened = open_storage(config, create_plugin_manager(load_entry_points=False))
    await opened.start()
    yield opened
    await opened.sessions.aclose()
    await opened.usage.aclose()
    await opened.aclose()


def record(
    n: int,
    *,
    model: str = "anthropic/claude-sonnet-4-6",
    timestamp: str = "2026-12-03T10:00:00.000Z",
    session_id: str | None = "s1",
    client: str | None = None,
    error: str | None = None,
    answered: bool = True,
    price_known: bool = True,
    estimated: bool = False,
) -> UsageRecord:
    tokens = TokenUsage(10 * n, 5 * n, 2, 1, 3, estimated) if answered else TokenUsage()
    return UsageRecord(
        id=f"u{n}",
        timestamp=timestamp,
        model=model,
        provider=model.split("/")[0],
        session_id=session_id,
        client=client,
        usage=tokens,
        cost=Cost(0.001 * n, 0.002 * n) if answered else Cost(),
        latency_ms=12.5,
        finish_reason="error" if error else "stop",
        price_known=price_known,
        error=error,
        answered=answered,
    )


async def test_backends_speak_the_protocols(storage: Storage) -> None:
    assert isinstance(storage.sessions, SessionStoreAPI)
    assert isinstance(storage.usage, UsageStoreAPI)
    assert await storage.health() is None


async def test_create_get_exists(storage: Storage) -> None:
    sessions = storage.sessions
    summary = await sessions.create(model="m/x", session_id="abc", client="cli")
    assert summary["id"] == "abc" and summary["model"] == "m/x" and summary["client"] == "cli"
    assert summary["messageCount"] == 0 and summary["title"] is None
    assert summary["createdAt"] == summary["lastActivityAt"]
    assert await sessions.exists("abc") and not await sessions.exists("nope")
    got = await sessions.get("abc")
    assert got == {**summary, "messages": []}
    assert await sessions.get("nope") is None
    assert await sessions.get("../bad") is None
    with pytest.raises(SessionExists):
        await sessions.create(model="m/x", session_id="abc")
    with pytest.raises(InvalidSessionId):
        await sessions.create(model="m/x", session_id="a b")
    fresh = await sessions.create(model="m/y")
    assert fresh["id"].startswith("s_")


async def test_create_with_messages_takes_title_from_first_user_message(storage: Storage) -> None:
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "  Hello   there \x00 world "}]
    summary = await storage.sessions.create(model="m/x", session_id="t", messages=messages)
    assert summary["messageCount"] == 2
    assert summary["title"].startswith("Hello there")
    stored = await storage.sessions.messages("t")
    assert [m["role"] for m in stored] == ["system", "user"]
    assert all(m["id"] and m["createdAt"] for m in stored)
    assert stored[1]["content"] == "  Hello   there \x00 world "  # stored exactly as given


async def test_append_update_messages_limit(storage: Storage) -> None:
    sessions = storage.sessions
    await sessions.create(model="m/x", session_id="s")
    await sessions.append_message("s", {"role": "assistant", "content": "not a title", "id": "a0"})
    await sessions.append_message("s", {"role": "user", "content": "The title", "id": "u1", "n": [1, {"k": None}]})
    await sessions.append_message("s", {"role": "assistant", "content": "answer", "id": "a1"})
    got = await sessions.get("s")
    assert got is not None
    assert got["title"] == "The title" and got["messageCount"] == 3
    assert [m["id"] for m in got["messages"]] == ["a0", "u1", "a1"]
    assert got["messages"][1]["n"] == [1, {"k": None}]
    assert [m["id"] for m in await sessions.messages("s", limit=2)] == ["u1", "a1"]
    assert await sessions.messages("s", limit=0) == []
    assert await sessions.messages("unknown") == []

    await sessions.update_message("s", "u1", {"interrupted": True, "content": "changed"})
    after = await sessions.messages("s")
    assert after[1]["interrupted"] is True and after[1]["content"] == "changed" and after[1]["role"] == "user"
    with pytest.raises(MessageNotFound):
        await sessions.update_message("s", "zzz", {"x": 1})
    with pytest.raises(SessionNotFound):
        await sessions.update_message("nope", "u1", {"x": 1})
    with pytest.raises(SessionNotFound):
        await sessions.append_message("nope", {"role": "user", "content": "x"})
    with pytest.raises(SessionNotFound):
        await sessions.touch("nope")


async def test_concurrent_appends_keep_every_message_in_order_of_arrival(storage: Storage) -> None:
    await storage.sessions.create(model="m/x", session_id="c")
    await asyncio.gather(
        *(storage.sessions.append_message("c", {"role": "user", "content": f"m{n}", "id": f"m{n}"}) for n in range(20))
    )
    got = await storage.sessions.get("c")
    assert got is not None and got["messageCount"] == 20
    assert sorted(m["id"] for m in got["messages"]) == sorted(f"m{n}" for n in range(20))


async def test_listing_most_recent_first_touch_delete(storage: Storage) -> None:
    sessions = storage.sessions
    for name in ("a", "b", "c"):
        await sessions.create(model="m/x", session_id=name)
        await asyncio.sleep(0.002)
    await sessions.touch("a")
    listing = await sessions.listing()
    assert [s["id"] for s in listing.sessions] == ["a", "c", "b"]
    assert listing.damaged_files == []
    assert [s["id"] for s in await sessions.summaries()] == ["a", "c", "b"]
    assert await sessions.delete("c") is True
    assert await sessions.delete("c") is False
    assert await sessions.delete("bad id") is False
    assert await sessions.get("c") is None
    assert [s["id"] for s in (await sessions.listing()).sessions] == ["a", "b"]
    await sessions.flush()


async def test_usage_append_is_idempotent_by_id(storage: Storage) -> None:
    usage = storage.usage
    await usage.append(record(1))
    await usage.append(record(1))  # a retried write
    await asyncio.gather(*(usage.append(record(n)) for n in range(2, 12)))
    await asyncio.gather(*(usage.append(record(n)) for n in range(2, 12)))
    report = await usage.areport()
    assert report["grandTotal"]["requestCount"] == 11
    assert len(await usage.arecords()) == 11


async def test_usage_reports(storage: Storage) -> None:
    usage = storage.usage
    await usage.append(record(1, timestamp="2026-11-30T23:59:59.999Z"))
    await usage.append(record(2, model="openai/gpt-4o", timestamp="2026-12-01T00:00:00.000Z", session_id="s2"))
    await usage.append(record(3, error="UPSTREAM_ERROR", answered=False, timestamp="2026-12-01T01:00:00.000Z"))
    await usage.append(record(4, error="STREAM_INTERRUPTED", timestamp="2026-12-02T01:00:00.000Z", estimated=True))
    await usage.append(record(5, model="zz/unpriced", price_known=False, timestamp="2026-12-02T02:00:00.000Z"))

    by_model = await usage.areport()
    assert sorted(by_model["perModel"]) == ["anthropic/claude-sonnet-4-6", "openai/gpt-4o", "zz/unpriced"]
    sonnet = by_model["perModel"]["anthropic/claude-sonnet-4-6"]
    assert sonnet["requestCount"] == 2 and sonnet["errorCount"] == 2 and sonnet["estimatedCount"] == 1
    assert sonnet["inputTokens"] == 50 and sonnet["outputTokens"] == 25 and sonnet["reasoningTokens"] == 6
    assert sonnet["totalCost"] == pytest.approx(0.015)
    assert "priceKnown" not in sonnet
    assert by_model["perModel"]["zz/unpriced"]["priceKnown"] is False
    grand = by_model["grandTotal"]
    assert grand["requestCount"] == 4 and grand["errorCount"] == 2
    assert grand["inputTokens"] == 10 * (1 + 2 + 4 + 5)
    assert by_model["damagedFiles"] == []

    by_day = await usage.areport(by="day")
    assert list(by_day["perDay"]) == ["2026-11-30", "2026-12-01", "2026-12-02"]
    assert by_day["perDay"]["2026-12-01"]["requestCount"] == 1
    assert by_day["perDay"]["2026-12-01"]["errorCount"] == 1
    assert by_day["grandTotal"] == grand

    since = await usage.areport(since=datetime(2026, 12, 1, 0, 30))
    assert since["grandTotal"]["errorCount"] == 2 and since["grandTotal"]["requestCount"] == 2
    only_s2 = await usage.areport(session_id="s2")
    assert list(only_s2["perModel"]) == ["openai/gpt-4o"]

    records = await usage.arecords(session_id="s2")
    assert [r["id"] for r in records] == ["u2"]
    assert (
        records[0] == record(2, model="openai/gpt-4o", timestamp="2026-12-01T00:00:00.000Z", session_id="s2").to_dict()
    )
    assert {r["id"] for r in await usage.arecords(since=datetime(2026, 12, 2))} == {"u4", "u5"}


async def test_set_title_renames_and_keeps_the_messages(storage: Storage) -> None:
    sessions = storage.sessions
    await sessions.create(model="m/x", session_id="t", messages=[{"id": "u1", "role": "user", "content": "Hi"}])
    await sessions.set_title("t", "A better title")
    session = await sessions.get("t")
    assert session is not None and session["title"] == "A better title"
    assert [m["id"] for m in session["messages"]] == ["u1"]
    assert [s["title"] for s in await sessions.summaries() if s["id"] == "t"] == ["A better title"]
    with pytest.raises(SessionNotFound):
        await sessions.set_title("nope", "x")
    with pytest.raises(SessionNotFound):
        await sessions.set_title("bad id", "x")
