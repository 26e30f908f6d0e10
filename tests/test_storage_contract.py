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

from agentspace.clients import Client
from agentspace.config import parse_config
from agentspace.default_plugins.storage import open_storage
from agentspace.plugins import create_plugin_manager
from agentspace.storage import InvalidSessionId, MessageNotFound, SessionExists, SessionNotFound
from agentspace.storage.errors import ClientExists, ClientNotFound
from agentspace.storage.protocols import (
    ClientStoreAPI,
    ClientStoreSync,
    SessionStoreAPI,
    SessionStoreSync,
    Storage,
    UsageStoreAPI,
    UsageStoreSink,
    UsageStoreSync,
    spend_of,
)
from agentspace.storage.shapes import SessionSummary, StoredUsageRecord
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
    assert isinstance(storage.clients, ClientStoreAPI)
    # The sink of record writes into the storage's own usage store: one usage store per process.
    assert isinstance(storage.sink, UsageStoreSink) and storage.sink.store is storage.usage
    assert (storage.shared_ledger is not None) == storage.shared  # replicas that share data share the ledger
    assert await storage.health() is None


async def test_stored_documents_have_the_shapes_the_typed_dicts_name(storage: Storage) -> None:
    summary = await storage.sessions.create(model="m/x", session_id="shape")
    assert set(summary) == set(SessionSummary.__annotations__)
    session = await storage.sessions.get("shape")
    assert session is not None and set(session) == {*SessionSummary.__annotations__, "messages"}
    await storage.usage.append(record(1))
    [stored] = await storage.usage.records()
    assert set(stored) == set(StoredUsageRecord.__annotations__)


async def test_the_client_store(storage: Storage) -> None:
    clients = storage.clients
    assert clients is not None
    key = await clients.add(Client(name="team", key_hash="", created_at="2026-12-03T00:00:00.000Z", budget_usd=5.0))
    with pytest.raises(ClientExists):
        await clients.add(Client(name="team", key_hash="", created_at="2026-12-03T00:00:00.000Z"))
    found = await clients.get_by_key(key)
    assert found is not None and found.name == "team" and found.budget_usd == 5.0 and found.key_hash != key
    assert await clients.get_by_hash(found.key_hash) == found and await clients.get_by_key(key + "x") is None

    def raise_budget(client: Client) -> None:
        client.budget_usd = 9.0

    assert (await clients.update("team", raise_budget)).budget_usd == 9.0
    new_key = await clients.rotate("team")
    assert await clients.get_by_key(key) is None and (await clients.get_by_key(new_key) or found).name == "team"
    assert clients.should_touch("team", 100.0) and not clients.should_touch("team", 101.0)
    await clients.touch("team")
    assert (await clients.get("team") or found).last_used_at
    assert [c.name for c in await clients.list()] == ["team"]
    await clients.remove("team")
    with pytest.raises(ClientNotFound):
        await clients.remove("team")
    with pytest.raises(ClientNotFound):
        await clients.update("team", raise_budget)
    assert await clients.list() == [] and await clients.get("team") is None


async def test_a_store_that_reads_without_an_event_loop_answers_as_its_async_api(storage: Storage) -> None:
    """What the CLI reads through the sync protocols is what the server reads through the async ones."""
    await storage.sessions.create(model="m/x", session_id="s1", messages=[{"role": "user", "content": "hi"}])
    for n in (1, 2):
        await storage.usage.append(record(n, client="team"))
    await storage.usage.flush()
    sessions, usage, clients = storage.sessions, storage.usage, storage.clients
    if isinstance(sessions, SessionStoreSync):
        assert sessions.get_sync("s1") == await sessions.get("s1")
        assert sessions.listing_sync() == await sessions.listing()
    if isinstance(usage, UsageStoreSync):
        assert list(usage.records_sync(client="team")) == await usage.records(client="team")
        for by in ("model", "day", "client"):
            assert usage.report_sync(by=by) == await usage.report(by=by)
    if isinstance(clients, ClientStoreSync):
        await clients.add(Client(name="team", key_hash="", created_at="2026-12-03T00:00:00.000Z"))
        assert clients.list_sync() == await clients.list()
    # The embedded backend's files are read without an event loop; a database is not.
    speaks = [
        isinstance(s, p) for s, p in ((sessions, SessionStoreSync), (usage, UsageStoreSync), (clients, ClientStoreSync))
    ]
    assert speaks == [storage.uses_data_dir_lock] * 3


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


async def test_set_aside_sets_every_message_named_aside_or_none(storage: Storage) -> None:
    """``set_aside`` (an edit or a regenerate): the messages named are ``replaced`` and counted out, each once; a
    name the session does not hold sets none aside."""
    sessions = storage.sessions
    given = [{"role": "user", "content": str(n), "id": f"m{n}"} for n in range(6)]
    await sessions.create(model="m/x", session_id="s", messages=[*given, {"id": "r", "role": "user", "replaced": True}])
    with pytest.raises(MessageNotFound):
        await sessions.set_aside("s", ["m1", "nope", "m2"])
    with pytest.raises(SessionNotFound):
        await sessions.set_aside("none", ["m1"])
    assert (await sessions.get("s") or {})["messageCount"] == 6
    await sessions.set_aside("s", ["m2", "m3", "r", "m5"])
    got = await sessions.get("s")
    assert got is not None and got["messageCount"] == 3
    assert [m["id"] for m in got["messages"] if m.get("replaced")] == ["m2", "m3", "m5", "r"]
    assert got["messages"][2] == {**given[2], "createdAt": got["messages"][2]["createdAt"], "replaced": True}
    assert [s["messageCount"] for s in await sessions.summaries()] == [3]
    if isinstance(sessions, SessionStoreSync):  # read again from the file
        assert (sessions.get_sync("s") or {})["messageCount"] == 3
        assert len([m for m in (sessions.get_sync("s") or {})["messages"] if m.get("replaced")]) == 4


async def test_the_message_count_leaves_out_the_answers_set_aside(storage: Storage) -> None:
    """``messageCount`` is of the messages the session's client sees: an answer set aside (``replaced``) is kept
    and not counted, in the session, the listing and (the embedded files) a reading without the server's cache."""
    sessions = storage.sessions
    given = [{"role": "user", "content": "q", "id": "u1"}, {"role": "assistant", "content": "a", "id": "a1"}]
    await sessions.create(model="m/x", session_id="s", messages=[*given, {**given[1], "id": "a0", "replaced": True}])

    async def counts() -> list[int]:
        got = await sessions.get("s")
        assert got is not None
        found = [got["messageCount"], *(s["messageCount"] for s in await sessions.summaries())]
        if isinstance(sessions, SessionStoreSync):
            found += [
                (sessions.get_sync("s") or {}).get("messageCount"),
                sessions.listing_sync().sessions[0]["messageCount"],
            ]
        return found

    assert set(await counts()) == {2}
    await sessions.update_message("s", "a1", {"replaced": True})
    await sessions.update_message("s", "a1", {"replaced": True})  # once set aside, counted out once
    await sessions.append_message("s", {"role": "assistant", "content": "again", "id": "a2"})
    assert set(await counts()) == {2}
    await sessions.update_message("s", "a0", {"replaced": False})
    assert set(await counts()) == {3}
    got = await sessions.get("s")
    assert got is not None and len(got["messages"]) == 4


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
    report = await usage.report()
    assert report["grandTotal"]["requestCount"] == 11
    assert len(await usage.records()) == 11


async def test_usage_reports(storage: Storage) -> None:
    usage = storage.usage
    await usage.append(record(1, timestamp="2026-11-30T23:59:59.999Z"))
    await usage.append(record(2, model="openai/gpt-4o", timestamp="2026-12-01T00:00:00.000Z", session_id="s2"))
    await usage.append(record(3, error="UPSTREAM_ERROR", answered=False, timestamp="2026-12-01T01:00:00.000Z"))
    await usage.append(record(4, error="STREAM_INTERRUPTED", timestamp="2026-12-02T01:00:00.000Z", estimated=True))
    await usage.append(record(5, model="zz/unpriced", price_known=False, timestamp="2026-12-02T02:00:00.000Z"))

    by_model = await usage.report()
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

    by_day = await usage.report(by="day")
    assert list(by_day["perDay"]) == ["2026-11-30", "2026-12-01", "2026-12-02"]
    assert by_day["perDay"]["2026-12-01"]["requestCount"] == 1
    assert by_day["perDay"]["2026-12-01"]["errorCount"] == 1
    assert by_day["grandTotal"] == grand

    since = await usage.report(since=datetime(2026, 12, 1, 0, 30))
    assert since["grandTotal"]["errorCount"] == 2 and since["grandTotal"]["requestCount"] == 2
    only_s2 = await usage.report(session_id="s2")
    assert list(only_s2["perModel"]) == ["openai/gpt-4o"]

    records = await usage.records(session_id="s2")
    assert [r["id"] for r in records] == ["u2"]
    assert (
        records[0] == record(2, model="openai/gpt-4o", timestamp="2026-12-01T00:00:00.000Z", session_id="s2").to_dict()
    )
    assert {r["id"] for r in await usage.records(since=datetime(2026, 12, 2))} == {"u4", "u5"}


async def test_a_clients_spend_is_what_its_records_cost_and_names_the_records_being_stored_it_counts(
    storage: Storage,
) -> None:
    # What a budget reads: from the rollups, equal to the client's records since the period's start, and which
    # records being stored right now (id: timestamp) it has already, so that settling them does not add them again.
    usage = storage.usage
    await usage.append(record(1, client="ann", timestamp="2026-11-30T23:00:00.000Z"))  # before the period
    await usage.append(record(2, client="ann", timestamp="2026-12-01T00:00:00.000Z"))
    await usage.append(record(3, client="ann", timestamp="2026-12-02T09:30:00.000Z"))
    await usage.append(record(4, client="bob", timestamp="2026-12-02T09:30:00.000Z"))
    await usage.append(record(5, client="ann", timestamp="2026-12-03T10:00:00.000Z"))
    posting = {"u5": "2026-12-03T10:00:00.000Z", "u9": "2026-12-03T10:00:01.000Z"}  # u9: not stored yet
    for since in (datetime(2026, 12, 1), datetime(2026, 12, 2, 9, 0)):  # a whole day; a day cut inside
        expected = sum(r["totalCost"] for r in await usage.records(since=since, client="ann"))
        spend, counted = await usage.spend(client="ann", since=since, posting=lambda: posting)
        assert spend == pytest.approx(expected) and expected > 0, since
        assert counted == {"u5"}
        # A backend written before ``spend`` (records only) gives the same through ``spend_of``.
        assert await spend_of(RecordsOnly(usage), client="ann", since=since, posting=lambda: posting) == (
            pytest.approx(expected),
            {"u5"},
        )


class RecordsOnly:
    """A usage store as a third-party backend written before ``spend`` would have it: records and reports."""

    def __init__(self, usage: UsageStoreAPI) -> None:
        self.records = usage.records


async def test_the_admins_records_include_those_that_name_no_client(storage: Storage) -> None:
    # Records of the gateway token from before records named their client name none (or "ws"/"http"): a
    # filter on "admin" (the gateway token's session) takes them, a client's filter never does.
    usage = storage.usage
    for n, client in enumerate((None, "ws", "http", "admin", "alice"), start=1):
        await usage.append(record(n, session_id="x", client=client))
    await usage.append(record(6, session_id="y"))
    for since in (None, datetime(2026, 12, 3, 9, 0)):  # from the rollups; that day's part from the records
        admin = await usage.report(session_id="x", client="admin", since=since)
        assert admin["grandTotal"]["requestCount"] == 4, since
        alice = await usage.report(session_id="x", client="alice", since=since)
        assert alice["grandTotal"]["requestCount"] == 1 and alice["grandTotal"]["inputTokens"] == 50
    assert sorted(r["id"] for r in await usage.records(session_id="x", client="admin")) == ["u1", "u2", "u3", "u4"]
    assert len(await usage.records(client="admin")) == 5
    by_client = await usage.report(by="client", session_id="x", client="admin")
    assert set(by_client["perClient"]) == {"admin"}


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
