"""Crashes tried from outside (on the embedded store, and a spool on PostgreSQL), where the earlier crash tests did not look: a real
``agentspace serve`` SIGKILLed with a tool loop in its second step, a compaction, ``/v1/responses`` (streamed and
not) and a non-streamed ``/v1/chat/completions`` call in flight, then started again with a changed config (the
custom price changed, the client removed). What a user sees afterwards: each upstream request has exactly one
usage record (the first step's as reported, the calls cut short recovered with the input the upstream reported,
priced as they were when they were made, a compaction still a compaction), the sessions show their user messages
and no half answer, the reports and the budgets count each call once, and the start says what it recovered. A call
whose answer comes whole at its end (a non-streamed pass-through, an embedding) killed while it waits is billed its
input, as the upstream bills it (its input counted while it waits when no budget counted it before); one the upstream
refused just before the kill keeps its one record."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from agentspace.cli import main as cli
from agentspace.storage import UsageStore
from scripts import harness
from scripts.harness import GatewayProcess
from tests.conftest import wait_until
from tests.fakes import anthropic_upstream as fa
from tests.fakes import openai_upstream as fo
from tests.support.ledgers import journal_entries, shared_entries, wait_for_notes

MODEL = "anthropic/claude-sonnet-4-5"
# Tools run in the served gateway: registered as a plugin before the CLI starts it (as tests/test_web_app.py does).
WITH_TOOLS = (
    "import sys; from agentspace.plugins import get_plugin_manager; import tests.fixtures.web_app_tools as tools; "
    "get_plugin_manager().register(tools); from agentspace.cli import main; sys.argv[0] = 'agentspace'; main()"
)
# A model of its own, served and priced in the first config only (removed before the restart).
IN_HOUSE = "anthropic/claude-in-house"
PRICED = {
    f'pricing."{MODEL}"': {"input_per_mtok": 100.0, "output_per_mtok": 200.0},
    f'pricing."{IN_HOUSE}"': {"input_per_mtok": 100.0, "output_per_mtok": 300.0},
    "providers.anthropic": {"models": [IN_HOUSE]},
}


def stalled(input_tokens: int) -> fa.FakeResponse:
    """An answer whose upstream reports its input, streams a little, and goes quiet."""
    return fa.text_response("word " * 50, chunks=50, usage={"input_tokens": input_tokens}).stall(120, after=8)


async def ws_turn(ws: aiohttp.ClientWebSocketResponse, content: str, **fields: Any) -> list[dict[str, Any]]:
    await ws.send_json({"type": "chat.send", "id": content, "content": content, **fields})
    frames = []
    while True:
        frame = json.loads((await ws.receive(timeout=30)).data)
        frames.append(frame)
        if frame["type"] in ("chat.stream.end", "error"):
            return frames


async def wait_for_requests(fake: fa.FakeAnthropic, n: int) -> None:
    for _ in range(600):
        if len(fake.requests) >= n:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{len(fake.requests)} upstream requests, expected {n}")


async def test_killed_mid_tool_loop_compaction_and_responses_then_restarted_with_another_config(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    env = {"AGENTSPACE_HOME": str(data_dir)}
    added = CliRunner().invoke(cli, ["clients", "add", "team", "--budget", "50", "--period", "total"], env=env)
    assert added.exit_code == 0, added.output
    key = added.stdout.strip()
    bearer = {"Authorization": f"Bearer {key}"}
    # A model group whose one deployment is the model of its own (removed before the restart too).
    group = {'models.groups."cheap"': {"deployments": [{"model": IN_HOUSE, "base_url": fake_anthropic.url}]}}
    server = GatewayProcess(data_dir, fake_anthropic.url, **PRICED, **group)
    server.launch = ["-c", WITH_TOOLS]
    try:
        await server.start()
        async with aiohttp.ClientSession() as http:
            # A session with two answered turns, to compact below.
            compacted = await http.ws_connect(server.ws_url, headers=bearer)
            fake_anthropic.enqueue(fa.text_response("one", usage={"input_tokens": 10}))
            frames = await ws_turn(compacted, "first")
            compacted_id = frames[0]["sessionId"]
            fake_anthropic.enqueue(fa.text_response("two", usage={"input_tokens": 20}))
            await ws_turn(compacted, "second", sessionId=compacted_id)
            # A tool loop: its first step calls the tool (recorded as reported), its second stalls.
            fake_anthropic.enqueue(
                fa.tool_use_response("get_weather", {"city": "Oslo"}, usage={"input_tokens": 1000}),
                stalled(2000),
            )
            looping = await http.ws_connect(server.ws_url, headers=bearer)
            await looping.send_json({"type": "chat.send", "id": "w", "content": "weather?"})
            await wait_for_requests(fake_anthropic, 4)
            fake_anthropic.enqueue(stalled(3000))
            await compacted.send_json({"type": "session.compact", "id": "c1", "sessionId": compacted_id})
            await wait_for_requests(fake_anthropic, 5)
            fake_anthropic.enqueue(stalled(4000), stalled(5000), stalled(6000))
            headers = {**bearer, "X-Agentspace-Session": "v1-calls"}
            streamed = await http.post(
                server.url + "/v1/responses", json={"model": MODEL, "input": "r1", "stream": True}, headers=headers
            )
            await wait_for_requests(fake_anthropic, 6)
            whole = asyncio.ensure_future(
                http.post(server.url + "/v1/responses", json={"model": MODEL, "input": "r2"}, headers=headers)
            )
            await wait_for_requests(fake_anthropic, 7)
            completion = asyncio.ensure_future(
                http.post(
                    server.url + "/v1/chat/completions",
                    json={"model": "cheap", "messages": [{"role": "user", "content": "c1"}]},
                    headers=headers,
                )
            )
            await wait_for_requests(fake_anthropic, 8)
            await asyncio.sleep(2)  # the ledger's notes are written within a second (a loaded machine: slack)
            await server.kill()
            for pending in (whole, completion):
                with pytest.raises(aiohttp.ClientError):
                    await pending
            streamed.close()
    finally:
        await server.aclose()
    before = list(UsageStore(data_dir).records_sync())
    assert len(before) == 3  # the two answered turns, the tool loop's first step

    removed = CliRunner().invoke(cli, ["clients", "remove", "team"], env=env)
    assert removed.exit_code == 0, removed.output
    # The price is the cost map's again; the model of its own is neither served nor priced.
    restarted = GatewayProcess(data_dir, fake_anthropic.url)
    try:
        await restarted.start()
        await restarted.wait_for_log("posted 5 usage records of calls a stopped process left unfinished")
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {restarted.token}"}) as http:
            async with http.get(restarted.url + "/api/usage?by=session") as resp:
                report = await resp.json()
            async with http.get(f"{restarted.url}/api/sessions/{compacted_id}") as resp:
                session = (await resp.json())["session"]
            looped_id = next(r["sessionId"] for r in UsageStore(data_dir).records_sync() if r["inputTokens"] == 2000)
            async with http.get(f"{restarted.url}/api/sessions/{looped_id}") as resp:
                looped = (await resp.json())["session"]
        assert await restarted.terminate() == 0
    finally:
        await restarted.aclose()
    records = list(UsageStore(data_dir).records_sync())
    assert len(records) == len(fake_anthropic.requests) == 8
    recovered = {r["inputTokens"]: r for r in records if r["recovered"]}
    assert sorted(recovered) == [2000, 3000, 4000, 5000, 6000]
    for tokens, record in recovered.items():
        assert record["estimatedFields"] == ["outputTokens"] and record["client"] == "team", record
        # Priced at the rates of the call's time ($100 / $200 per million), not the cost map's of the restart.
        assert record["inputCost"] == pytest.approx(tokens * 100 / 1e6), record
        assert record["priceKnown"] is True
    # The group's call is recorded as the deployment's, chosen after its entry was written ahead.
    assert (recovered[6000]["model"], recovered[6000]["deployment"]) == (IN_HOUSE, "cheap/anthropic")
    assert "no price known" not in restarted.log()
    assert recovered[3000]["purpose"] == "compact"
    assert {r["endpoint"] for r in recovered.values()} == {"ws", "compact", "responses", "openai"}
    assert report["grandTotal"]["requestCount"] == 8
    assert report["grandTotal"]["totalCost"] == pytest.approx(sum(r["totalCost"] for r in records))
    # The compaction never finished: the session is as it was, its turns whole.
    assert [m["role"] for m in session["messages"]] == ["user", "assistant", "user", "assistant"]
    # The tool loop's turn never ended: its question is there (durable before the first call), and no answer.
    assert [(m["role"], m["content"]) for m in looped["messages"]] == [("user", "weather?")]
    assert {r["sessionId"] for r in records if r["inputTokens"] in (1000, 2000)} == {looped_id}
    assert restarted.log_problems() == []


async def test_killed_while_whole_answers_are_awaited_their_input_is_billed_once(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic, fake_openai: fo.FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    openai_key = "sk-openai-test-0123456789"
    child_env = harness.child_env
    monkeypatch.setattr(harness, "child_env", lambda *a: {**child_env(*a), "OPENAI_API_KEY": openai_key})
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    env = {"AGENTSPACE_HOME": str(data_dir)}
    added = CliRunner().invoke(cli, ["clients", "add", "team", "--budget", "5", "--period", "total"], env=env)
    assert added.exit_code == 0, added.output
    headers = {"Authorization": f"Bearer {added.stdout.strip()}", "anthropic-version": "2023-06-01"}
    sections = {"providers.openai": {"base_url": fake_openai.url}}
    server = GatewayProcess(data_dir, fake_anthropic.url, **sections)
    question = [{"role": "user", "content": "a question of some length, to count"}]
    try:
        await server.start()
        async with aiohttp.ClientSession(headers=headers) as http:
            fake_anthropic.enqueue(
                fa.error_status(429), fa.text_response("late", usage={"input_tokens": 9}).silent_for(60)
            )
            body = {"model": MODEL, "max_tokens": 100, "messages": question}
            async with http.post(server.url + "/v1/messages", json=body) as refused:
                assert refused.status == 429
            whole = asyncio.ensure_future(http.post(server.url + "/v1/messages", json=body))
            fake_openai.enqueue(fo.text_response().with_delay(60))
            # With the gateway token: no budget counts its input before the call (counted while it runs).
            embedding = asyncio.ensure_future(
                http.post(
                    server.url + "/v1/embeddings",
                    json={"model": "openai/text-embedding-3-small", "input": "x y z"},
                    headers={"Authorization": f"Bearer {server.token}"},
                )
            )
            await wait_for_requests(fake_anthropic, 2)
            for _ in range(600):
                if fake_openai.requests:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(2.5)  # the notes reach the journal (within a second and a half; a loaded machine)
            await server.kill()
            for pending in (whole, embedding):
                with pytest.raises(aiohttp.ClientError):
                    await pending
    finally:
        await server.aclose()
    restarted = GatewayProcess(data_dir, fake_anthropic.url, **sections)
    try:
        await restarted.start()
        await restarted.wait_for_log("posted 2 usage records of calls a stopped process left unfinished")
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {restarted.token}"}) as http:
            async with http.get(restarted.url + "/api/clients/team") as resp:
                spend = (await resp.json())["client"]["spend"]
    finally:
        await restarted.aclose()
    records = {r["endpoint"] + ("" if r["answered"] else "-refused"): r for r in UsageStore(data_dir).records_sync()}
    assert sorted(records) == ["anthropic", "anthropic-refused", "embeddings"]
    assert (
        records["anthropic-refused"]["recovered"] is False and records["anthropic-refused"]["error"] == "RATE_LIMITED"
    )
    for endpoint in ("anthropic", "embeddings"):
        record = records[endpoint]
        assert record["recovered"] is True and record["inputTokens"] > 0, record
        assert record["estimatedFields"] == ["inputTokens", "outputTokens"] and record["totalCost"] > 0
    assert records["embeddings"]["client"] == "admin" and records["embeddings"]["inputTokens"] == 3
    spent = sum(r["totalCost"] for r in records.values() if r["client"] == "team")
    assert spend["usd"] == pytest.approx(spent)
    assert spend["inFlightUsd"] == 0


async def _nothing_open(data_dir: Path, dsn: str) -> bool:
    return not await journal_entries(data_dir) and not await shared_entries(dsn)


async def test_a_spooled_record_stored_by_a_retry_closes_its_entry(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic
) -> None:
    """PostgreSQL stops while a call streams: its record is spooled and retried; the database returns and a retry
    stores it. The call is settled then: a graceful stop leaves no pending row for another replica to "recover"
    (logging a call as lost) and no journal for the next start to read."""
    from tests.scale_servers import Postgres, pg_bindir
    from tests.test_replicas import recorded

    if pg_bindir() is None:
        pytest.skip("PostgreSQL is not installed")
    pg = Postgres()
    data_dir = tmp_path / "data"
    storage = {"backend": "postgres", "dsn": pg.dsn}
    fake_anthropic.default = fa.text_response("tok " * 10, chunks=10, usage={"input_tokens": 77}).with_delay(0.2)
    try:
        server = GatewayProcess(data_dir, fake_anthropic.url, storage=storage)
        try:
            await server.start()
            headers = {"Authorization": f"Bearer {server.token}", "anthropic-version": "2023-06-01"}
            body = {"model": MODEL, "max_tokens": 64, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
            async with aiohttp.ClientSession(headers=headers) as http:
                async with http.post(server.url + "/v1/messages", json=body) as resp:
                    await resp.content.readany()
                    pg.stop()  # the database goes away mid-stream
                    assert (await resp.read()).rstrip().endswith(b'{"type":"message_stop"}')
            pg.start()
            for _ in range(300):  # retried every few seconds
                if await recorded(pg.dsn):
                    break
                await asyncio.sleep(0.1)
            # The closing reaches the journal and the shared ledger (within a second, later under load).
            await wait_until(lambda: _nothing_open(data_dir, pg.dsn), timeout=30)
            assert await server.terminate() == 0
        finally:
            await server.aclose()
        (record,) = await recorded(pg.dsn)
        assert record["inputTokens"] == 77 and not record["recovered"]
        from agentspace.storage.postgres.database import PostgresDatabase

        db = PostgresDatabase(pg.dsn)
        try:
            async with db.connection() as conn:
                assert await conn.fetchval("SELECT count(*) FROM ledger_pending") == 0
        finally:
            await db.aclose()
        assert list((data_dir / "ledger").glob("journal-*.jsonl")) == []
    finally:
        pg.close()


async def test_killed_again_and_again_while_it_recovers(tmp_path: Path, fake_anthropic: fa.FakeAnthropic) -> None:
    """Thirty streams in flight when the server is killed; each of the next two starts is killed as soon as it
    logs its first recovered call (before it finished recovering). The third start finishes: one record per
    stream, with the input the upstream reported, none twice, and it says how many it posted."""
    fake_anthropic.default = stalled(4321)
    data_dir = tmp_path / "data"
    server = GatewayProcess(data_dir, fake_anthropic.url)
    headers = {"anthropic-version": "2023-06-01"}
    try:
        await server.start()
        headers["Authorization"] = f"Bearer {server.token}"
        async with aiohttp.ClientSession(headers=headers) as http:
            body = {"model": MODEL, "max_tokens": 100, "stream": True}
            await asyncio.gather(
                *(
                    http.post(
                        server.url + "/v1/messages", json={**body, "messages": [{"role": "user", "content": f"q{i}"}]}
                    )
                    for i in range(30)
                )
            )
            await wait_for_requests(fake_anthropic, 30)
            # The reported input reaches the journal.
            await wait_for_notes(lambda: journal_entries(data_dir), 30, lambda e: isinstance(e.get("usage"), dict))
            await server.kill()
    finally:
        await server.aclose()
    for _ in range(2):
        starting = GatewayProcess(data_dir, fake_anthropic.url)
        starting.log_path.write_text("")
        start = asyncio.ensure_future(starting.start())
        logged = asyncio.ensure_future(starting.wait_for_log("recovered the usage of call", timeout=60))
        try:
            # Killed once it recovered a call; a start an earlier one left nothing to recover (it finished before
            # its kill landed) comes up, and is killed all the same.
            await asyncio.wait([logged, start], timeout=60, return_when=asyncio.FIRST_COMPLETED)
            await starting.kill()
        finally:
            for task in (logged, start):
                task.cancel()
            await asyncio.gather(logged, start, return_exceptions=True)
            await starting.aclose()
    restarted = GatewayProcess(data_dir, fake_anthropic.url)
    restarted.log_path.write_text("")
    try:
        await restarted.start()
        assert await restarted.terminate() == 0
    finally:
        await restarted.aclose()
    records = list(UsageStore(data_dir).records_sync())
    assert len(records) == len({r["id"] for r in records}) == 30
    assert all(r["inputTokens"] == 4321 and r["recovered"] for r in records)
    posted = [line for line in restarted.log().splitlines() if "left unfinished (recovered: true)" in line]
    assert len(posted) <= 1 and restarted.log_problems() == []
    assert list((data_dir / "ledger").glob("journal-*.jsonl")) == []


async def calls_by_worker(dsn: str, workers: list[int]) -> dict[int, int]:
    """How many calls in flight each worker (by pid) owns in the shared ledger (its rows' ``replica`` names the
    process: ``host-pid-random``)."""
    from agentspace.storage.postgres.database import PostgresDatabase

    db = PostgresDatabase(dsn)
    try:
        async with db.connection() as conn:
            replicas = [r["replica"] for r in await conn.fetch("SELECT replica FROM ledger_pending")]
    finally:
        await db.aclose()
    return {pid: sum(1 for r in replicas if f"-{pid}-" in f"{r}-") for pid in workers}


async def test_a_killed_worker_is_replaced_and_its_whole_answers_billed(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic, pg_dsn: str, redis_srv: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``serve --workers 2``: non-streamed calls from the gateway token (no budget counts their input before they
    leave) wait for their whole answers when a worker is SIGKILLed. The supervisor says so and starts another
    worker (two serve again); every call the upstream received has one record, the killed worker's billed
    their input (counted while they waited) and the survivor's as reported."""
    import os
    import signal

    from tests.scale_servers import TOKEN, flush_redis
    from tests.test_replicas import recorded
    from tests.test_worker_crash import HEADERS, start_workers, stop, workers_of

    monkeypatch.setenv("AGENTSPACE_GATEWAY_TOKEN", TOKEN)
    await flush_redis(redis_srv)
    fake_anthropic.default = fa.text_response("tok", usage={"input_tokens": 5000}).silent_for(6)
    storage = {"backend": "postgres", "dsn": pg_dsn, "redis_url": redis_srv.url}
    layout = GatewayProcess(tmp_path / "data", fake_anthropic.url, storage=storage)
    layout.data_dir.mkdir(parents=True)
    process, url = await start_workers(layout)
    try:
        body = {"model": MODEL, "max_tokens": 100, "messages": [{"role": "user", "content": "Hi there you"}]}
        async with aiohttp.ClientSession(headers=HEADERS) as http:
            calls = [asyncio.ensure_future(http.post(url + "/v1/messages", json=body)) for _ in range(6)]
            await wait_for_requests(fake_anthropic, 6)
            # The input counted while they wait reaches the shared ledger (within seconds, later under load).
            await wait_for_notes(lambda: shared_entries(pg_dsn), 6, lambda e: (e.get("inputTokens") or 0) > 0)
            # The kernel spreads the connections between the workers: the one killed holds at least one of them
            # (all six, at times), and the other's answer.
            held = await calls_by_worker(pg_dsn, workers_of(process))
            killed = max(held, key=lambda pid: held[pid])
            os.kill(killed, signal.SIGKILL)
            answered = 0
            for call in calls:
                with contextlib.suppress(aiohttp.ClientError):
                    answered += (await call).status == 200
            assert answered == 6 - held[killed] and held[killed] > 0
            assert process.stdout is not None
            while b"listening on" not in await asyncio.wait_for(process.stdout.readline(), 60):
                pass  # the new worker starts
            assert f"worker {killed} stopped (killed by SIGKILL); starting another" in layout.log()
            assert len(workers_of(process)) == 2 and killed not in workers_of(process)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60  # leases lapse 20 s after the kill; replicas look every 5 s
            while len(records := await recorded(pg_dsn)) < 6:
                assert loop.time() < deadline, records
                await asyncio.sleep(1)
            fake_anthropic.default = fa.text_response("tok", usage={"input_tokens": 5000})
            async with http.post(url + "/v1/messages", json=body) as resp:  # both workers serve
                assert resp.status == 200
    finally:
        assert await stop(process) == 0
    assert len({r["id"] for r in records}) == 6 == len(records)
    recovered = [r for r in records if r["recovered"]]
    assert len(recovered) == 6 - answered
    for record in recovered:
        assert record["answered"] and record["inputTokens"] > 0, record
        assert record["estimatedFields"] == ["inputTokens", "outputTokens"]
    assert all(r["inputTokens"] == 5000 for r in records if not r["recovered"])
