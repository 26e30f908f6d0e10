"""Issue 25 (the embedded store at the physical limit) tried from outside once more: what the disk keeps of the
writes that must be durable before a call leaves, and of the files a crash leaves behind."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anthropic
import pytest
from aiohttp.test_utils import TestClient
from click.testing import CliRunner, Result

from agentspace.cli import main
from agentspace.storage.embedded.usage import ROLLUPS, write_log_segment
from agentspace.storage.postgres import PostgresDatabase, PostgresUsageStore
from agentspace.types import Cost, TokenUsage, UsageRecord, now_iso
from scripts.harness import write_config
from tests.fakes.anthropic_upstream import FakeAnthropic, text_response
from tests.support.ws import connect, receive_after
from tests.test_audit28s_outside import ui_chat, user


class _Arrivals(list[Any]):
    """The fake upstream's request list, noting in ``events`` when a request arrived."""

    def __init__(self, events: list[tuple[str, str]]) -> None:
        super().__init__()
        self.events = events

    def append(self, item: Any) -> None:
        self.events.append(("upstream", item.path))
        super().append(item)


async def test_the_ledger_journal_is_named_durably_before_the_first_call_leaves(
    client: TestClient,
    token: str,
    fake_anthropic: FakeAnthropic,
    isolated_env: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """docs/accounting.md: the pending entry is synced before the request leaves, so that a server that stops
    mid-call leaves what it owes. A server's first call makes its journal (and the ``ledger`` folder): an
    ``fdatasync`` of the new file makes its lines durable, not its name in the folder, so after a power cut the
    journal, and the call's entry with it, may be gone. The folders are synced before the call goes out."""
    events: list[tuple[str, str]] = []

    def spy(name: str) -> Any:
        real = getattr(os, name)

        def call(fd: int) -> None:
            events.append((name, os.readlink(f"/proc/self/fd/{fd}")))
            real(fd)

        return call

    for name in ("fsync", "fdatasync"):
        monkeypatch.setattr(os, name, spy(name))
    real_rename = os.rename

    def rename(src: Any, dst: Any) -> None:
        events.append(("rename", os.fspath(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    real_mkdir = os.mkdir

    def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        events.append(("mkdir", os.fspath(path)))
        real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    fake_anthropic.requests = _Arrivals(events)
    fake_anthropic.enqueue(text_response("counted"))

    sdk = anthropic.AsyncAnthropic(api_key=token, base_url=str(client.make_url("")), max_retries=0)
    message = await sdk.messages.create(
        model="claude-sonnet-4-5", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.content[0].text == "counted"  # type: ignore[union-attr]

    ledger = isolated_env.resolve() / "ledger"
    sent = events.index(("upstream", "/v1/messages"))
    made = events.index(("mkdir", str(ledger)))
    named = next(n for n, (kind, path) in enumerate(events) if kind == "rename" and Path(path).parent == ledger)
    assert made < named < sent, events
    assert ("fsync", str(isolated_env.resolve())) in events[made:sent], events[made:sent]  # the folder's name
    assert ("fsync", str(ledger)) in events[named:sent], events[named:sent]  # the journal's


def test_the_clients_spend_and_a_names_earlier_usage_come_from_the_rollups_on_postgres(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Issue 25: reports read the rollups on both backends, so that their time grows with the groups, not the
    records. ``agentspace clients list`` and ``show`` give each client's spend in its period, and ``clients add``
    says whether the name had usage before: on PostgreSQL both read every record of the client (of its period;
    of all time) where ``agentspace usage --by-client`` reads the rollups. Shown by changing the records behind the
    store's back: a scan of them sees the change, the rollups do not."""
    config = tmp_path / "agentspace.toml"
    write_config(config, {"storage": {"data_dir": str(tmp_path / "data"), "backend": "postgres", "dsn": pg_dsn}})

    def cli(*args: str) -> Result:
        result = CliRunner().invoke(main, [*args, "--config", str(config)])
        assert result.exit_code == 0, result.output
        return result

    cli("clients", "add", "ann", "--budget", "10")
    cli("clients", "add", "bob")

    async def behind_the_stores_back(statement: str) -> None:
        db = PostgresDatabase(pg_dsn)
        try:
            async with db.connection() as conn:
                await conn.execute(statement)
        finally:
            await db.aclose()

    async def seed() -> None:
        db = PostgresDatabase(pg_dsn)
        try:
            usage = PostgresUsageStore(db)
            for n, client in enumerate(["ann", "ann", "ann", "bob"]):
                tokens = TokenUsage(10, 5)
                await usage.append(
                    UsageRecord(f"r{n}", now_iso(), "m", "p", None, client, tokens, Cost(0.25, 0.0), 1.0, "stop")
                )
        finally:
            await db.aclose()

    asyncio.run(seed())
    # The records' documents (what a scan of them reads; the reports sum the rollups and the columns).
    asyncio.run(
        behind_the_stores_back("UPDATE usage_records SET record = jsonb_set(record::jsonb, '{totalCost}', '100')::text")
    )
    assert json.loads(cli("usage", "--by-client", "--json").stdout)["perClient"]["ann"]["totalCost"] == 0.75
    listed = {c["name"]: c["spend"]["usd"] for c in json.loads(cli("clients", "list", "--json").stdout)["clients"]}
    assert listed == {"ann": 0.75, "bob": 0.25}, listed
    assert json.loads(cli("clients", "show", "ann", "--json").stdout)["spend"]["usd"] == 0.75
    # bob's records renamed: the rollups (every report over all time) still hold bob's usage.
    asyncio.run(behind_the_stores_back("UPDATE usage_records SET client = 'zed' WHERE client = 'bob'"))
    assert "bob" in json.loads(cli("usage", "--by-client", "--json").stdout)["perClient"]
    cli("clients", "remove", "bob")
    added = cli("clients", "add", "bob")
    assert "A removed client was called 'bob' before" in added.stderr


def test_temp_files_a_killed_writer_left_beside_the_rollups_and_the_clients_table_are_removed(
    isolated_env: Path,
) -> None:
    """docs/architecture.md, storage/atomic.py: a file written whole goes to a temp file renamed into place; a kill
    mid-write leaves the temp file, and "writers remove the temp files of processes that no longer run". The
    rollups (written by every report, the CLI's included) and the clients table (``clients add``) are written so,
    and their temp files stayed for good."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    rollups = isolated_env / "usage" / ROLLUPS
    rollups.mkdir(parents=True)
    left = [
        rollups / f".2026-11-30.json.{dead.pid}.0.tmp",
        isolated_env / f".clients.json.{dead.pid}.0.tmp",
    ]
    for path in left:
        path.write_text("{}")
    mine = isolated_env / f".clients.json.{os.getpid()}.9999.tmp"  # a live writer's: kept
    mine.write_text("{}")
    past = (datetime.now(UTC) - timedelta(days=3)).strftime("%Y-%m-%d")
    write_log_segment(
        isolated_env,
        past,
        0,
        [
            UsageRecord(
                "r1", f"{past}T10:00:00.000Z", "m", "p", None, None, TokenUsage(1, 1), Cost(0.5), 1.0, "stop"
            ).to_dict()
        ],
    )

    for args in (["usage", "--json"], ["clients", "add", "ann"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
    assert (rollups / f"{past}.json").exists()  # the report saved its rollups
    assert [path for path in left if path.exists()] == []
    assert mine.exists()


async def test_an_edit_early_in_a_long_session_sets_the_later_answers_aside_with_a_few_syncs(
    client: TestClient,
    auth_headers: dict[str, str],
    fake_anthropic: FakeAnthropic,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 25: writes that arrive together share one sync (group commit), and adding to a session costs the same
    whatever its size. An edit of (or a regenerate from) an early message sets every later message aside before the
    call; each was its own write waiting for its own sync, one after the other: 0.2 s before the first token at 200
    later messages on this machine's disk, 0.8 s at 1,200, seconds on a disk with slower syncs. They are written
    together now, sharing the group commit's syncs."""
    later = 60
    messages = [{"id": "u0", "role": "user", "parts": [{"type": "text", "text": "first"}]}]
    fake_anthropic.enqueue(text_response("one"))
    async with client.post("/api/chat", json={"id": "long", "messages": messages}, headers=auth_headers) as resp:
        assert resp.status == 200 and (await resp.read()).endswith(b"data: [DONE]\n\n")
    for n in range(1, later // 2):
        fake_anthropic.enqueue(text_response(f"answer {n}"))
        turn = {
            "id": "long",
            "messages": [{"id": f"u{n}", "role": "user", "parts": [{"type": "text", "text": f"q{n}"}]}],
        }
        async with client.post("/api/chat", json=turn, headers=auth_headers) as resp:
            assert resp.status == 200 and (await resp.read()).endswith(b"data: [DONE]\n\n")

    syncs: list[int] = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda fd, real=real: (syncs.append(fd), real(fd))[1])
    fake_anthropic.requests = _Arrivals([])  # (a list again: the syncs counted are the ones before the call)
    arrived: list[int] = []
    fake_anthropic.requests.append = lambda item: (
        arrived.append(len(syncs)),
        list.append(fake_anthropic.requests, item),
    )[1]  # type: ignore[method-assign]
    fake_anthropic.enqueue(text_response("edited answer"))
    edit = {
        "id": "long",
        "messages": [{"id": "u0", "role": "user", "parts": [{"type": "text", "text": "first, edited"}]}],
    }
    async with client.post("/api/chat", json=edit, headers=auth_headers) as resp:
        assert resp.status == 200 and (await resp.read()).endswith(b"data: [DONE]\n\n")
    async with client.get("/api/sessions/long", headers=auth_headers) as resp:
        shown = (await resp.json())["session"]["messages"]
    assert [m["content"] for m in shown] == ["first, edited", "edited answer"]
    assert arrived and arrived[0] <= 6, f"{arrived[0]} syncs before the call for {later - 1} messages set aside"


def answer(message_id: str, text: str) -> dict[str, Any]:
    return {"id": message_id, "role": "assistant", "parts": [{"type": "text", "text": text}]}


async def edit_count(client: TestClient, token: str, headers: dict[str, str], session_id: str) -> tuple[Any, Any]:
    """What the session shows after its edit: its messages' texts, and its ``messageCount`` as GET
    /api/sessions/{id}, the listing and the WebSocket's ``session.list`` give it."""
    session = (await (await client.get(f"/api/sessions/{session_id}", headers=headers)).json())["session"]
    listed = (await (await client.get("/api/sessions", headers=headers)).json())["sessions"]
    ws = await connect(client, token)
    over_ws = (await receive_after(ws, {"type": "session.list", "id": "l"}))["sessions"]
    await ws.close()
    counts = {session["messageCount"], *(s["messageCount"] for s in [*listed, *over_ws] if s["id"] == session_id)}
    return [m["content"] for m in session["messages"]], counts


@pytest.mark.parametrize("backend", ["tinydb", "postgres"])
async def test_an_edit_of_the_first_message_of_a_long_session_sets_every_later_one_aside_in_one_write(
    make_client: Any,
    token: str,
    auth_headers: dict[str, str],
    fake_anthropic: FakeAnthropic,
    request: pytest.FixtureRequest,
    backend: str,
) -> None:
    """The messages after an edited one are set aside in one write (``set_aside``): one log entry and one summary
    on the embedded store, one transaction on PostgreSQL. The count follows at once and after a restart."""
    storage = {"backend": "postgres", "dsn": request.getfixturevalue("pg_dsn")} if backend == "postgres" else {}
    first = await make_client(storage=storage) if storage else await make_client()
    history: list[dict[str, Any]] = []
    for n in range(300):  # imported by the first request: 599 messages, then the answer to the last
        history += [user(f"u{n}", f"question {n}"), answer(f"a{n}", f"answer {n}")]
    fake_anthropic.enqueue(text_response("to the last"))
    await ui_chat(first, auth_headers, {"id": "long", "messages": history[:-1]})
    assert (await edit_count(first, token, auth_headers, "long"))[1] == {600}

    fake_anthropic.enqueue(text_response("edited answer"))
    await ui_chat(first, auth_headers, {"id": "long", "messages": [user("u0", "first, edited")]})
    shown = (["first, edited", "edited answer"], {2})
    assert await edit_count(first, token, auth_headers, "long") == shown
    await first.close()

    again = await make_client(storage=storage) if storage else await make_client()
    assert await edit_count(again, token, auth_headers, "long") == shown
    if backend == "tinydb":  # one write: the aside entry of the 599 and its summary
        lines = (Path(os.environ["AGENTSPACE_HOME"]) / "sessions" / "long.jsonl").read_text().splitlines()
        asides = [json.loads(line)["aside"]["ids"] for line in lines if line.startswith('{"aside"')]
        assert asides == [[m["id"] for m in history[1:-1]] + [asides[0][-1]]]
