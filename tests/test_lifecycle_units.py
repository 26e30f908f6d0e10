"""The call lifecycle (``calls.ProviderCall``), the checks before a call (``limits.Guard``) and the ledger
(``storage/ledger.py``) on their own, without a server: real stores and journals in ``tmp_path``, a gateway
assembled by the composition root (``gateway.assemble``), no provider asked."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agentspace import pricing
from agentspace.calls import Ceiling, ProviderCall, recovered_record
from agentspace.clients import Client
from agentspace.config import Config
from agentspace.default_plugins.storage import open_storage
from agentspace.errors import ApiError
from agentspace.gateway import assemble
from agentspace.limits import Guard
from agentspace.registry import Registry
from agentspace.storage.embedded.clients import ClientStore
from agentspace.storage.embedded.usage import UsageStore
from agentspace.storage.ledger import Ledger, read_journal, recover
from agentspace.testing import make_config, plugin_manager
from agentspace.types import TokenUsage, now_iso

MODEL = "anthropic/claude-sonnet-4-5"


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path)


@pytest.fixture
async def gw(config: Config) -> AsyncIterator[Registry]:
    with plugin_manager() as pm:
        storage = open_storage(config, pm)
        await storage.start()
        gateway = await assemble(config, pm, storage)
        await gateway.recorder.start()
        yield gateway
        await gateway.aclose()


async def add_client(clients: ClientStore, name: str = "team", **settings: object) -> Client:
    client = Client(name=name, key_hash="", created_at=now_iso(), **settings)  # type: ignore[arg-type]
    await clients.add(client)
    return client


def journal_entries(config: Config) -> list[dict[str, object]]:
    """What the journals on disk still hold pending (as a recovery would read them)."""
    return [e for path in sorted((config.data_dir / "ledger").glob("journal-*.jsonl")) for e in read_journal(path)]


# --- the call lifecycle ---------------------------------------------------------------------------


async def test_a_call_is_written_ahead_then_recorded_once_and_closed(gw: Registry, config: Config) -> None:
    call = ProviderCall(gw, MODEL, session_id="s1", client="admin", endpoint="openai")
    await call.admit(lambda: Ceiling(100, 1000))
    [pending] = journal_entries(config)  # durable before anything is sent upstream
    assert pending["id"] == call.id and pending["model"] == MODEL and pending["sessionId"] == "s1"
    assert pending["reservation"] is None  # the admin has no budget: the ceiling is not even counted

    record = await call.record(TokenUsage(input_tokens=12, output_tokens=34), "stop")
    await call.release()  # after a record: nothing to give back
    stored = await gw.usage.records(session_id="s1")
    assert [r["id"] for r in stored] == [call.id] == [record.id]
    assert stored[0]["inputTokens"] == 12 and stored[0]["outputTokens"] == 34 and stored[0]["estimated"] is False
    assert record.cost.total_cost == pytest.approx(
        pricing.model_info(config, MODEL).input_per_mtok * 12 / 1e6
        + pricing.model_info(config, MODEL).output_per_mtok * 34 / 1e6
    )
    assert len(gw.ledger) == 0
    with pytest.raises(RuntimeError, match="exactly one usage record"):
        call.record(TokenUsage(), "stop")


async def test_a_call_stopped_before_it_was_sent_records_nothing_and_gives_its_reservation_back(
    gw: Registry, config: Config
) -> None:
    client = await add_client(gw.clients, budget_usd=1.0)
    call = ProviderCall(gw, MODEL, session_id=None, client=client.name, endpoint="openai")
    await call.admit(lambda: Ceiling(1000, 10_000))
    assert call.reservation is not None and call.reservation.amount > 0
    await call.release()
    assert await gw.usage.records(client=client.name) == []
    assert len(gw.ledger) == 0
    # The whole budget is there again: a call reserving most of it is admitted.
    again = ProviderCall(gw, MODEL, session_id=None, client=client.name, endpoint="openai")
    info = pricing.model_info(config, MODEL)
    await again.admit(lambda: Ceiling(0, int(0.9 / (info.output_per_mtok / 1e6))))
    await again.release()


async def test_a_refused_call_holds_nothing(gw: Registry, config: Config) -> None:
    client = await add_client(gw.clients, budget_usd=0.001)
    call = ProviderCall(gw, MODEL, session_id=None, client=client.name, endpoint="openai")
    with pytest.raises(ApiError) as refused:
        await call.admit(lambda: Ceiling(1000, 10_000))
    assert refused.value.code == "BUDGET_EXCEEDED"
    assert call.reservation is None and len(gw.ledger) == 0 and journal_entries(config) == []


async def test_a_record_settles_the_clients_spend(gw: Registry) -> None:
    client = await add_client(gw.clients, budget_usd=1.0)
    call = ProviderCall(gw, MODEL, session_id=None, client=client.name, endpoint="openai")
    await call.admit(lambda: Ceiling(10, 100))
    record = await call.record(TokenUsage(input_tokens=10, output_tokens=100), "stop")
    stored = await gw.clients.get(client.name)
    assert stored is not None
    assert await gw.guard.spend(stored) == pytest.approx((record.cost.total_cost, 0.0))  # posted, in flight


# --- the ledger -----------------------------------------------------------------------------------


async def test_the_journal_keeps_notes_and_drops_closed_entries(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    await ledger.pending({"id": "usage_a", "time": now_iso(), "model": MODEL})
    await ledger.pending({"id": "usage_b", "time": now_iso(), "model": MODEL})
    ledger.note("usage_a", usage={"inputTokens": 7}, answered=True)
    ledger.closed("usage_b")
    await ledger.aclose()  # writes what is left; the journal stays: usage_a is still open
    [path] = (tmp_path / "ledger").glob("journal-*.jsonl")
    [entry] = read_journal(path)
    assert entry["id"] == "usage_a" and entry["usage"] == {"inputTokens": 7} and entry["answered"] is True


async def test_a_journal_without_open_entries_is_removed_at_close(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    await ledger.pending({"id": "usage_a", "time": now_iso(), "model": MODEL})
    ledger.closed("usage_a")
    await ledger.aclose()
    assert list((tmp_path / "ledger").glob("journal-*.jsonl")) == []


async def test_a_pending_entry_is_on_its_way_to_the_disk_before_it_is_awaited(tmp_path: Path) -> None:
    """The write starts when the entry is made: the caller prepares its request meanwhile, then awaits the sync."""
    ledger = Ledger(tmp_path)
    durable = ledger.pending({"id": "usage_a", "time": now_iso(), "model": MODEL})
    for _ in range(200):  # not awaited: the line reaches the journal all the same
        journals = list((tmp_path / "ledger").glob("journal-*.jsonl"))
        if journals and read_journal(journals[0]):
            break
        await asyncio.sleep(0.01)
    [path] = (tmp_path / "ledger").glob("journal-*.jsonl")
    assert [e["id"] for e in read_journal(path)] == ["usage_a"]
    await durable
    ledger.closed("usage_a")
    await ledger.aclose()


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "journal-1.jsonl"
    good = json.dumps({"event": "pending", "id": "usage_a", "time": now_iso(), "model": MODEL})
    path.write_text(good + "\n" + '{"event": "pending", "id": "usage_b", "ti', encoding="utf-8")
    assert [e["id"] for e in read_journal(path)] == ["usage_a"]


async def test_recovery_posts_what_a_dead_process_left_pending_once(gw: Registry, config: Config) -> None:
    """A journal of another process (its own lock gone) with one answered call: posted as a recovered record,
    the journal removed; a second recovery finds nothing."""
    dead = config.data_dir / "ledger" / "journal-dead.jsonl"
    dead.parent.mkdir(exist_ok=True)
    entry = {"id": "usage_dead", "time": now_iso(), "client": "admin", "sessionId": "s9", "model": MODEL}
    lines = [
        {"event": "pending", **entry, "reservation": 0.01, "inputTokens": 50},
        {"event": "note", "id": "usage_dead", "usage": {"inputTokens": 50, "outputTokens": 5}, "answered": True},
    ]
    dead.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")

    assert await recover(gw, recovered_record) == 1
    [record] = await gw.usage.records(session_id="s9")
    assert record["id"] == "usage_dead" and record.get("recovered") is True
    assert record["inputTokens"] == 50 and record["outputTokens"] == 5
    assert not dead.exists()
    assert await recover(gw, recovered_record) == 0


# --- the guard ------------------------------------------------------------------------------------


@pytest.fixture
def guard(config: Config) -> Guard:
    return Guard(ClientStore(config.data_dir), UsageStore(config.data_dir), lambda m: pricing.model_info(config, m))


async def test_the_admin_is_never_limited(guard: Guard) -> None:
    assert await guard.admit("admin", MODEL, cost=lambda: 1e9) is None


async def test_rpm_counts_the_calls_of_the_sliding_minute(guard: Guard) -> None:
    await add_client(guard.clients, rpm=2)  # type: ignore[arg-type]
    now = [1000.0]
    guard.monotonic = lambda: now[0]
    await guard.admit("team", MODEL, cost=None)
    await guard.admit("team", MODEL, cost=None)
    with pytest.raises(ApiError) as limited:
        await guard.admit("team", MODEL, cost=None)
    assert limited.value.code == "RATE_LIMITED" and limited.value.retry_after is not None
    now[0] += 61  # the minute has passed
    await guard.admit("team", MODEL, cost=None)


async def test_a_reservation_holds_the_budget_until_settled_or_released(guard: Guard) -> None:
    await add_client(guard.clients, budget_usd=1.0)  # type: ignore[arg-type]
    held = await guard.admit("team", MODEL, cost=lambda: 0.6)
    assert held is not None
    with pytest.raises(ApiError) as refused:
        await guard.admit("team", MODEL, cost=lambda: 0.6)
    assert refused.value.code == "BUDGET_EXCEEDED"
    await guard.release(held)
    again = await guard.admit("team", MODEL, cost=lambda: 0.6)
    await guard.release(again)


async def test_the_model_allowlist_and_a_removed_client(guard: Guard) -> None:
    await add_client(guard.clients, models=["openai/*"])  # type: ignore[arg-type]
    with pytest.raises(ApiError) as refused:
        await guard.admit("team", MODEL, cost=None)
    assert refused.value.code == "MODEL_NOT_ALLOWED"
    await guard.admit("team", "openai/gpt-4o-mini", cost=None)
    await guard.clients.remove("team")
    with pytest.raises(ApiError) as gone:
        await guard.admit("team", "openai/gpt-4o-mini", cost=None)
    assert gone.value.code == "UNAUTHORIZED"


async def test_no_call_is_admitted_once_shutdown_began(config: Config) -> None:
    stopping = asyncio.Event()
    guard = Guard(
        ClientStore(config.data_dir),
        UsageStore(config.data_dir),
        lambda m: pricing.model_info(config, m),
        shutting_down=stopping,
    )
    await guard.admit("admin", MODEL, cost=None)
    stopping.set()
    with pytest.raises(ApiError) as refused:
        await guard.admit("admin", MODEL, cost=None)
    assert refused.value.code == "SERVICE_UNAVAILABLE"
