"""What the postgres backend promises beyond the contract suite: migrations once under a lock,
retried batches that count nothing twice, retention by whole months, PgBouncer-safe settings, a clear
error and a 503 ``/healthz`` when the database is unreachable, and recovery when it is back."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agentspace.errors import StorageError
from agentspace.storage.postgres import MIGRATIONS, PostgresDatabase, PostgresSessionStore, PostgresUsageStore
from agentspace.types import Cost, TokenUsage, UsageRecord
from scripts.harness import GatewayProcess
from tests.fakes import anthropic_upstream as fa
from tests.scale_servers import Postgres, free_port
from tests.test_storage_contract import record


async def test_migrations_apply_once_when_replicas_start_together(pg_dsn: str) -> None:
    dbs = [PostgresDatabase(pg_dsn, pool_size=2) for _ in range(4)]
    try:
        await asyncio.gather(*(db.start() for db in dbs))
        assert {await db.schema_version() for db in dbs} == {MIGRATIONS[-1][0]}
        async with dbs[0].connection() as conn:
            applied = await conn.fetch("SELECT version FROM agentspace_migrations")
        assert [r[0] for r in applied] == [v for v, _ in MIGRATIONS]
    finally:
        await asyncio.gather(*(db.aclose() for db in dbs))


async def test_batches_and_retries_count_once_across_replicas(pg_dsn: str) -> None:
    a, b = PostgresDatabase(pg_dsn), PostgresDatabase(pg_dsn, statement_cache_size=0)  # b: as behind PgBouncer
    usage_a, usage_b = PostgresUsageStore(a, batch_size=50), PostgresUsageStore(b, batch_size=50)
    try:
        records = [record(n) for n in range(300)]
        await asyncio.gather(*(usage_a.append(r) for r in records))
        # The same records again, from the other replica (a retried batch): nothing doubles.
        await asyncio.gather(*(usage_b.append(r) for r in records[::2]))
        assert await usage_a.count() == 300
        report = await usage_b.report()
        assert report["grandTotal"]["requestCount"] == 300
        assert report["grandTotal"]["inputTokens"] == sum(10 * n for n in range(300))
    finally:
        await usage_a.aclose()
        await usage_b.aclose()
        await a.aclose()
        await b.aclose()


async def test_retention_drops_whole_months(pg_dsn: str) -> None:
    db = PostgresDatabase(pg_dsn)
    usage = PostgresUsageStore(db)
    try:
        for n, ts in enumerate(["2026-09-15T00:00:00.000Z", "2026-10-31T23:59:59.999Z", "2026-11-01T00:00:00.000Z"]):
            await usage.append(record(n, timestamp=ts))
        assert await usage.drop_usage_before(datetime(2026, 11, 15)) == [
            "usage_records_2026_09",
            "usage_records_2026_10",
        ]
        assert [r["timestamp"] for r in await usage.records()] == ["2026-11-01T00:00:00.000Z"]
        await usage.append(record(7, timestamp="2026-10-02T00:00:00.000Z"))  # a late record: its month comes back
        assert len(await usage.records()) == 2
    finally:
        await usage.aclose()
        await db.aclose()


async def test_unreachable_database_is_a_clear_storage_error() -> None:
    port = free_port()  # a port nothing listens on
    db = PostgresDatabase(f"postgresql://postgres@127.0.0.1:{port}/agentspace", connect_timeout=2)
    with pytest.raises(StorageError) as caught:
        await db.start()
    assert "could not use its database" in caught.value.message
    assert await db.health() is not None
    sessions = PostgresSessionStore(db)
    with pytest.raises(StorageError):
        await sessions.get("abc")


async def test_serve_refuses_to_start_without_its_database(tmp_path: Path, fake_anthropic: Any) -> None:
    dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/agentspace"
    server = GatewayProcess(tmp_path / "data", fake_anthropic.url, storage={"backend": "postgres", "dsn": dsn})
    with pytest.raises(RuntimeError, match="did not start"):
        await server.start()
    assert server.process is not None
    assert await server.process.wait() == 1
    assert "could not use its database" in server.log() and "Traceback" not in server.log()


async def test_healthz_503_while_the_database_is_down_and_chats_recover(tmp_path: Path, fake_anthropic: Any) -> None:
    pg = Postgres()  # its own server: this test stops it
    server = GatewayProcess(tmp_path / "data", fake_anthropic.url, storage={"backend": "postgres", "dsn": pg.dsn})
    try:
        url = await server.start()
        headers = {"Authorization": f"Bearer {server.token}"}
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/healthz") as resp:
                assert resp.status == 200
            async with http.post(f"{url}/api/chat", json=_chat("s1", "hello"), headers=headers) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()

            pg.stop()
            async with http.get(url + "/healthz") as resp:
                assert resp.status == 503
                body = await resp.json()
            assert body["status"] == "unavailable" and "could not use its database" in body["storage"]
            async with http.post(f"{url}/api/chat", json=_chat("s2", "hello"), headers=headers) as resp:
                assert resp.status == 503, await resp.text()
                assert (await resp.json())["error"]["code"] == "STORAGE_ERROR"

            pg.start()
            async with http.get(url + "/healthz") as resp:
                assert resp.status == 200
            async with http.post(f"{url}/api/chat", json=_chat("s3", "hello"), headers=headers) as resp:
                assert resp.status == 200
                await resp.read()
            async with http.get(f"{url}/api/usage", headers=headers) as resp:
                report = await resp.json()
        assert report["grandTotal"]["requestCount"] == 2
    finally:
        if server.process is not None and server.process.returncode is None:
            await server.terminate()
        pg.close()


def _chat(session_id: str, text: str) -> dict[str, Any]:
    return {
        "id": session_id,
        "messages": [{"id": f"m-{session_id}", "role": "user", "parts": [{"type": "text", "text": text}]}],
    }


async def test_database_down_mid_load_loses_nothing_acknowledged(tmp_path: Path, fake_anthropic: Any) -> None:
    """Chats while PostgreSQL stops and comes back: those that fail say so (STORAGE_ERROR), every answer a
    client saw finish is stored with its usage record (retried writes included), none twice, and the
    gateway serves again once the database is back."""
    pg = Postgres()
    server = GatewayProcess(tmp_path / "data", fake_anthropic.url, storage={"backend": "postgres", "dsn": pg.dsn})
    for _ in range(40):
        fake_anthropic.enqueue(fa.text_response(chunks=8).with_delay(0.1))
    try:
        url = await server.start()
        headers = {"Authorization": f"Bearer {server.token}"}
        async with aiohttp.ClientSession(headers=headers) as http:

            async def one(n: int) -> tuple[str, int, bytes]:
                await asyncio.sleep(n * 0.08)
                async with http.post(f"{url}/api/chat", json=_chat(f"d{n}", f"q{n}")) as resp:
                    return f"d{n}", resp.status, await resp.read()

            async def outage() -> None:
                await asyncio.sleep(1.0)
                pg.stop()
                await asyncio.sleep(1.5)
                pg.start()

            results, _ = await asyncio.gather(asyncio.gather(*(one(n) for n in range(40))), outage())
            finished = [sid for sid, status, body in results if status == 200 and b'"type":"finish"' in body]
            failed = [(sid, status, body) for sid, status, body in results if sid not in finished]
            assert finished and failed  # the outage was felt, and not by everyone
            for _sid, status, body in failed:  # a clear error: refused up front, or the stream ends saying so
                refused = status == 503 and b"STORAGE_ERROR" in body
                ended = status == 200 and b'"type":"error"' in body and b"could not be stored" in body
                assert refused or ended, body[-300:]

            # Writes refused during the outage are retried (every 5 s): wait for them, bounded.
            async def stored(sid: str) -> bool:
                async with http.get(f"{url}/api/sessions/{sid}") as resp:
                    return resp.status == 200 and len((await resp.json())["session"]["messages"]) == 2

            deadline = asyncio.get_running_loop().time() + 30
            for sid in finished:
                while not await stored(sid):
                    assert asyncio.get_running_loop().time() < deadline, f"answer of {sid} lost"
                    await asyncio.sleep(0.5)
            async with http.post(f"{url}/api/chat", json=_chat("after", "hello")) as resp:
                assert resp.status == 200 and b'"type":"finish"' in await resp.read()

        db = PostgresDatabase(pg.dsn)
        try:
            async with db.connection() as conn:
                rows = await conn.fetch("SELECT id, session_id FROM usage_records")
        finally:
            await db.aclose()
        assert len(rows) == len({r["id"] for r in rows})  # nothing twice
        assert {sid for sid in finished} <= {r["session_id"] for r in rows}  # every acknowledged call counted
    finally:
        if server.process is not None and server.process.returncode is None:
            await server.terminate()
        pg.close()


async def test_reports_per_client_and_of_one_client(pg_dsn: str) -> None:
    """The client queries of the clients feature, in SQL over the client index."""
    db = PostgresDatabase(pg_dsn)
    usage = PostgresUsageStore(db)
    try:
        for n, client in enumerate(["team-a", "team-a", "team-b", "ws", "http", None]):
            await usage.append(record(n + 1, client=client))
        report = await usage.report(by="client")
        assert list(report["perClient"]) == ["admin", "team-a", "team-b"]
        assert report["perClient"]["admin"]["requestCount"] == 3
        assert report["perClient"]["team-a"]["inputTokens"] == 10 + 20
        only_a = await usage.report(client="team-a")
        assert only_a["grandTotal"]["requestCount"] == 2
        assert [r["id"] for r in await usage.records(client="team-b")] == ["u3"]
    finally:
        await usage.aclose()
        await db.aclose()


async def test_rollup_reports_equal_the_scan_of_the_records_on_random_data(pg_dsn: str) -> None:
    # The rollups are kept in the inserts' transactions; every report, with every filter, must give what
    # grouping the records themselves gives (storage.embedded.usage.REPORTS over records).
    import random

    from agentspace.storage.reports import REPORTS
    from tests.test_usage_rollups import FILTERS, random_record, rounded

    rng = random.Random(11)
    db = PostgresDatabase(pg_dsn)
    usage = PostgresUsageStore(db, batch_size=37)
    try:
        await db.start()
        records = [random_record(rng, n, rng.choice(["2026-03-01", "2026-03-02", "2026-03-03"])) for n in range(600)]
        for r in records:
            r["model"] = r["model"] or "unknown"  # the table keeps "unknown" for a record without a model
        await asyncio.gather(*(usage.append_dicts([r]) for r in records))
        await usage.append_dicts(records[:100])  # retried: counted once, in the records and in the rollups
        for where in FILTERS:
            scanned_records = await usage.records(**where)
            for by, grouping in REPORTS.items():
                expected = {**grouping(scanned_records), "damagedFiles": []}
                assert rounded(await usage.report(by=by, **where)) == rounded(expected), (by, where)
        async with db.connection() as conn:
            groups = await conn.fetchval("SELECT count(*) FROM usage_rollups")
        assert 0 < groups < len(records)
        grand = (await usage.report())["grandTotal"]
        assert grand["serverToolCost"] > 0 and grand["serverToolUses"] > 0  # the fees were there to be summed
    finally:
        await usage.aclose()
        await db.aclose()


async def test_the_rollups_stay_the_size_of_their_rows_as_records_keep_coming(pg_dsn: str) -> None:
    # Each insert updates its rollup row; a report scans the rollups, so they must not grow with the records
    # (at a million records they had grown to 112 MB for 7,000 rows, and the report took 10x its time at 100k).
    db = PostgresDatabase(pg_dsn)
    usage = PostgresUsageStore(db)
    try:
        await db.start()

        async def batch(round_: int) -> None:
            await usage.append_dicts([record(round_ * 1000 + n, session_id=f"s{n}").to_dict() for n in range(500)])

        async def size() -> int:
            async with db.connection() as conn:
                return int(await conn.fetchval("SELECT pg_relation_size('usage_rollups')"))

        await batch(0)
        first = await size()
        for round_ in range(1, 21):  # the same 500 groups, 20 times over
            await batch(round_)
        assert (await usage.report())["grandTotal"]["requestCount"] == 21 * 500
        assert await size() <= 3 * first, (first, await size())
    finally:
        await usage.aclose()
        await db.aclose()


async def test_the_migration_to_half_full_pages_shrinks_rollups_already_grown(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A database of the version before: its rollups grown by a row version per record. The migration rewrites
    # them to the size of their rows, and the reports are what they were.
    from agentspace.storage.postgres import database

    # (7 applied too: the inserts of today's store read the table it adds.)
    monkeypatch.setattr(database, "MIGRATIONS", [v for v in MIGRATIONS if v[0] != 6])
    old = PostgresDatabase(pg_dsn)
    usage = PostgresUsageStore(old)
    try:
        await old.start()
        for round_ in range(21):  # the same 500 groups, 21 times over
            await usage.append_dicts([record(round_ * 1000 + n, session_id=f"s{n}").to_dict() for n in range(500)])
        before = await usage.report(by="session")
        async with old.connection() as conn:
            grown = int(await conn.fetchval("SELECT pg_relation_size('usage_rollups')"))
    finally:
        await usage.aclose()
        await old.aclose()
    monkeypatch.setattr(database, "MIGRATIONS", MIGRATIONS)
    db = PostgresDatabase(pg_dsn)
    usage = PostgresUsageStore(db)
    try:
        await db.start()
        async with db.connection() as conn:
            size = int(await conn.fetchval("SELECT pg_relation_size('usage_rollups')"))
        assert size * 4 < grown, (size, grown)
        assert await usage.report(by="session") == before
    finally:
        await usage.aclose()
        await db.aclose()


async def test_the_migration_to_server_tool_fees_recomputes_them_from_the_stored_records(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database of the version before server-tool fees had their own columns: its records (whose JSON has
    ``serverToolCost`` and ``serverToolUse``) and rollups get the fees and uses, and every report equals the
    scan of the records, for the records stored before the migration and after it."""
    import json
    import random

    from agentspace.storage.postgres import database
    from agentspace.storage.postgres import usage as postgres
    from agentspace.storage.reports import REPORTS
    from tests.test_usage_rollups import FILTERS, random_record, rounded

    rng = random.Random(12)
    records = [random_record(rng, n, rng.choice(["2026-03-01", "2026-03-02", "2026-03-03"])) for n in range(300)]
    for r in records:
        r["model"] = r["model"] or "unknown"
    before = [v for v in MIGRATIONS if v[0] < 4]
    monkeypatch.setattr(database, "MIGRATIONS", before[:2])
    old = PostgresDatabase(pg_dsn)
    try:
        await old.start()
        async with old.transaction() as conn:  # the records as version 3 stored them, then its rollups
            await conn.execute(
                "CREATE TABLE usage_records_2026_03 PARTITION OF usage_records "
                "FOR VALUES FROM ('2026-03-01') TO ('2026-04-01')"
            )
            await conn.executemany(
                "INSERT INTO usage_records VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, "
                "$15, $16, $17)",
                [
                    (
                        r["id"],
                        postgres.parse_time(r["timestamp"]),
                        r["model"],
                        r["client"],
                        r["sessionId"],
                        *(int(r.get(k) or 0) for k in postgres._TOKEN_COLUMNS),
                        float(r["totalCost"] or 0.0),
                        r["answered"] is not False,
                        bool(r["error"]) or r["finishReason"] == "error",
                        bool(r["estimated"]),
                        r["priceKnown"] is False,
                        json.dumps(r),
                    )
                    for r in records
                ],
            )
        monkeypatch.setattr(database, "MIGRATIONS", before)
        await old.aclose()
        old = PostgresDatabase(pg_dsn)
        await old.start()  # migration 3: the rollups, without the fees
        assert await old.schema_version() == 3
    finally:
        await old.aclose()

    monkeypatch.undo()
    db = PostgresDatabase(pg_dsn)
    usage = PostgresUsageStore(db)
    try:
        await db.start()
        assert await db.schema_version() == MIGRATIONS[-1][0]
        later = [random_record(rng, n, "2026-03-03") for n in range(300, 400)]
        for r in later:
            r["model"] = r["model"] or "unknown"
        await usage.append_dicts(later)
        for where in FILTERS:
            scanned = await usage.records(**where)
            for by, grouping in REPORTS.items():
                expected = {**grouping(scanned), "damagedFiles": []}
                assert rounded(await usage.report(by=by, **where)) == rounded(expected), (by, where)
        grand = (await usage.report())["grandTotal"]
        everything = records + later
        assert grand["serverToolCost"] == pytest.approx(sum(r.get("serverToolCost") or 0.0 for r in everything))
        assert grand["serverToolUses"] == sum(sum((r.get("serverToolUse") or {}).values()) for r in everything) > 0
        async with db.connection() as conn:  # the rollups of the records before the migration have them
            migrated = await conn.fetchval("SELECT sum(server_tool_cost) FROM usage_rollups WHERE day < '2026-03-03'")
        assert migrated == pytest.approx(
            sum(r.get("serverToolCost") or 0.0 for r in records if r["timestamp"] < "2026-03-03")
        )
        assert migrated > 0
    finally:
        await usage.aclose()
        await db.aclose()


def calls_of_their_own(rng: Any, count: int, first: int = 0) -> list[dict[str, Any]]:
    """Random records (``tests.test_usage_rollups.random_record``) most of which are a session of their own, as a
    /v1 client labelling each call makes them; a few in session "s2" (a report filters on it) or in none."""
    from tests.test_usage_rollups import random_record

    records = []
    for n in range(first, first + count):
        r = random_record(rng, n, rng.choice(["2026-03-01", "2026-03-02", "2026-03-03"]))
        r["model"] = r["model"] or "unknown"  # the table keeps "unknown" for a record without a model
        r["sessionId"] = rng.choice([f"call-{n}"] * 8 + ["s2", None])
        records.append(r)
    return records


async def replace_estimates(usage: PostgresUsageStore, rng: Any, records: list[dict[str, Any]]) -> None:
    """Append ``records``, some after a recovery's estimate of their call (the record takes its place), and some
    followed by one (not stored): what a replica cut off from the database leaves."""
    from agentspace.storage.postgres.usage import parse_time

    estimated = rng.sample(records, len(records) // 10)
    late = {r["id"] for r in estimated[: len(estimated) // 3]}  # these calls' estimates come after their records
    estimates = []
    for r in estimated:
        start = parse_time(r["timestamp"])
        # The call's start: earlier the same day, with other tokens and cost (a guess from the request).
        start -= min(timedelta(seconds=rng.randint(1, 200)), start - start.replace(hour=0, minute=0, second=0))
        estimates.append(
            {
                **r,
                "timestamp": start.isoformat().replace("+00:00", "Z"),
                "inputTokens": rng.randint(0, 9000),
                "outputTokens": 0,
                "totalCost": rng.random(),
                "estimated": True,
                "recovered": True,
            }
        )
    await usage.append_dicts([e for e in estimates if e["id"] not in late])
    await asyncio.gather(*(usage.append_dicts(records[n : n + 23]) for n in range(0, len(records), 23)))
    await usage.append_dicts([e for e in estimates if e["id"] in late])


async def assert_reports_equal_the_scan(usage: PostgresUsageStore, db: PostgresDatabase) -> None:
    """Every report with every filter, and each client's spend, equal what grouping the records gives; the rollups
    merged without sessions equal ``usage_rollups`` merged."""
    from agentspace.storage.reports import REPORTS
    from tests.test_usage_rollups import FILTERS, rounded

    for where in FILTERS:
        scanned = await usage.records(**where)
        for by, grouping in REPORTS.items():
            expected = {**grouping(scanned), "damagedFiles": []}
            assert rounded(await usage.report(by=by, **where)) == rounded(expected), (by, where)
    for client in ("alice", "bob", "admin"):
        for since in (None, datetime(2026, 3, 2, tzinfo=UTC), datetime(2026, 3, 2, 13, 30, tzinfo=UTC)):
            spent, _ = await usage.spend(client=client, since=since, posting=dict)
            scanned = await usage.records(client=client, since=since)
            assert spent == pytest.approx(sum(float(r.get("totalCost") or 0.0) for r in scanned)), (client, since)
    sums = "sum(input_tokens), sum(output_tokens), sum(total_tokens), sum(cache_read_tokens), sum(cache_write_tokens), "
    sums += "sum(reasoning_tokens), round(sum(total_cost)::numeric, 9), sum(answered), sum(errors), sum(estimated), "
    sums += "bool_or(price_unknown), round(sum(server_tool_cost)::numeric, 9), sum(server_tool_uses)"
    async with db.connection() as conn:
        merged = await conn.fetch(f"SELECT day, model, client, endpoint, {sums} FROM usage_rollups GROUP BY 1, 2, 3, 4")
        kept = await conn.fetch(
            f"SELECT day, model, client, endpoint, {sums} FROM usage_rollups_nosession GROUP BY 1, 2, 3, 4"
        )
    assert sorted(map(tuple, kept)) == sorted(map(tuple, merged))


async def test_reports_without_sessions_equal_the_scan_when_every_call_is_a_session_of_its_own(pg_dsn: str) -> None:
    # The reports that ask for no session read the rollups merged without it (``usage_rollups_nosession``), whose
    # rows are the groups however many sessions there are; they are kept by every insert, by an estimate's
    # replacement by its call's record, and by retention.
    import random

    rng = random.Random(21)
    db = PostgresDatabase(pg_dsn)
    usage = PostgresUsageStore(db, batch_size=37)
    try:
        await db.start()
        records = calls_of_their_own(rng, 600)
        await replace_estimates(usage, rng, records)
        await usage.append_dicts(records[:100])  # retried: counted once, in the records and in both rollups
        assert await usage.count() == len(records)
        await assert_reports_equal_the_scan(usage, db)
        async with db.connection() as conn:
            sessions = await conn.fetchval("SELECT count(*) FROM usage_rollups")
            groups = await conn.fetchval("SELECT count(*) FROM usage_rollups_nosession")
        assert groups * 2 < sessions, (groups, sessions)  # the sessions made most of the rollups' rows
        assert await usage.drop_usage_before(datetime(2026, 4, 1)) == ["usage_records_2026_03"]
        assert (await usage.report())["grandTotal"]["requestCount"] == 0
        async with db.connection() as conn:
            assert await conn.fetchval("SELECT count(*) FROM usage_rollups_nosession") == 0
    finally:
        await usage.aclose()
        await db.aclose()


async def test_a_database_of_the_version_before_gets_the_rollups_without_sessions_from_its_rollups(
    pg_dsn: str,
) -> None:
    """A database of version 7: records and ``usage_rollups`` kept as that version keeps them (its inserts, an
    estimate's replacement), and no rollups merged without sessions. Migration 8 fills them from ``usage_rollups``,
    and every report equals the scan of the records, for the records stored before the migration and after it."""
    import random

    rng = random.Random(22)
    db = PostgresDatabase(pg_dsn)
    usage = PostgresUsageStore(db, batch_size=37)
    try:
        await db.start()
        await replace_estimates(usage, rng, calls_of_their_own(rng, 400))
        async with db.transaction() as conn:  # what version 7 has: this version's usage_rollups, kept alike
            await conn.execute("DROP TABLE usage_rollups_nosession")
            await conn.execute("ALTER TABLE usage_rollups DROP COLUMN records")  # migration 9's
            await conn.execute("DELETE FROM agentspace_migrations WHERE version >= 8")
    finally:
        await usage.aclose()
        await db.aclose()
    db = PostgresDatabase(pg_dsn)
    usage = PostgresUsageStore(db, batch_size=37)
    try:
        await db.start()
        assert await db.schema_version() == MIGRATIONS[-1][0] == 10
        await assert_reports_equal_the_scan(usage, db)
        await replace_estimates(usage, rng, calls_of_their_own(rng, 200, first=400))
        assert await usage.count() == 600
        await assert_reports_equal_the_scan(usage, db)
    finally:
        await usage.aclose()
        await db.aclose()


def call_record(n: int, timestamp: str, model: str, *, recovered: bool = False) -> UsageRecord:
    """Call ``n``'s record: a recovery's estimate (input guessed, no output) or the record as reported."""
    tokens = (
        TokenUsage(900, 0, estimated=True, estimated_fields=("outputTokens",)) if recovered else TokenUsage(1000, 40)
    )
    return UsageRecord(
        id=f"usage_{n}",
        timestamp=timestamp,
        model=model,
        provider=model.split("/")[0],
        session_id="s1",
        client="team",
        usage=tokens,
        cost=Cost(0.003, 0.0) if recovered else Cost(0.003, 0.0006),
        latency_ms=0.0 if recovered else 900.0,
        finish_reason="error" if recovered else "stop",
        error="INTERRUPTED" if recovered else None,
        endpoint="anthropic",
        recovered=recovered,
    )


async def test_an_estimate_replaced_by_its_record_in_another_group_leaves_no_empty_row(
    pg_dsn: str, tmp_path: Path
) -> None:
    """A call recovered by another replica is stamped with its start and the model asked for; its record as
    reported, which takes the estimate's place, with its end and the model that answered (a model group's
    deployment). Call 0 crosses midnight, call 1 changes model, call 2 stays in its group: PostgreSQL's reports,
    by every grouping, are the embedded store's, which stores the records as reported alone -- no empty day or
    model row where an estimate was (docs/accounting.md, "Replicas")."""
    from agentspace.storage.embedded.usage import UsageStore
    from agentspace.storage.reports import REPORTS
    from tests.test_usage_rollups import rounded

    sonnet, haiku = "anthropic/claude-sonnet-4-5", "anthropic/claude-haiku-4-5"
    estimates = [
        call_record(0, "2026-03-01T23:59:58.000Z", sonnet, recovered=True),
        call_record(1, "2026-03-02T10:00:00.000Z", sonnet, recovered=True),
        call_record(2, "2026-03-02T11:00:00.000Z", haiku, recovered=True),
    ]
    reported = [
        call_record(0, "2026-03-02T00:00:04.000Z", sonnet),
        call_record(1, "2026-03-02T10:00:07.000Z", haiku),
        call_record(2, "2026-03-02T11:00:05.000Z", haiku),
        call_record(3, "2026-03-02T11:30:00.000Z", haiku),  # a call of the estimate's group, not recovered
    ]
    db = PostgresDatabase(pg_dsn)
    usage = PostgresUsageStore(db)
    embedded = UsageStore(tmp_path / "embedded")
    try:
        for r in estimates:
            await usage.append(r)
        for r in reported:
            await usage.append(r)
            await embedded.append(r)
        assert len(await usage.records()) == 4
        for by in REPORTS:
            for where in ({}, {"client": "team"}, {"session_id": "s1"}):
                got, expected = await usage.report(by=by, **where), await embedded.report(by=by, **where)
                assert rounded(got) == rounded(expected), (by, where)
        assert list((await usage.report(by="day"))["perDay"]) == ["2026-03-02"]
        async with db.connection() as conn:
            for table in ("usage_rollups", "usage_rollups_nosession"):
                assert await conn.fetchval(f"SELECT count(*) FROM {table} WHERE records = 0") == 0, table
    finally:
        await usage.aclose()
        await embedded.aclose()
        await db.aclose()


async def test_a_database_of_the_version_before_loses_its_empty_rollup_rows_and_counts_records(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database of version 8, whose rollups hold rows an estimate left at zero: migrated, the empty rows are
    gone and the others count their records, so every report is the records' (and a later estimate replaced in
    another group takes its row out)."""
    from agentspace.storage.postgres import database
    from agentspace.storage.postgres import usage as postgres
    from agentspace.storage.reports import REPORTS
    from tests.test_usage_rollups import rounded

    sonnet, haiku = "anthropic/claude-sonnet-4-5", "anthropic/claude-haiku-4-5"
    kept = [call_record(n, f"2026-03-02T1{n}:00:00.000Z", haiku).to_dict() for n in range(3)]
    monkeypatch.setattr(database, "MIGRATIONS", [m for m in MIGRATIONS if m[0] <= 8])
    old = PostgresDatabase(pg_dsn)
    try:
        await old.start()
        assert await old.schema_version() == 8
        async with old.transaction() as conn:  # the records and rollups as version 8 kept them, and empty rows
            await conn.execute(
                "CREATE TABLE usage_records_2026_03 PARTITION OF usage_records "
                "FOR VALUES FROM ('2026-03-01') TO ('2026-04-01')"
            )
            await conn.executemany(
                f"INSERT INTO usage_records ({', '.join(postgres._COLUMNS)}) "
                f"VALUES ({', '.join(f'${n}' for n in range(1, 20))})",
                [postgres._row(r) for r in kept],
            )
            sums = postgres._ROLLUP_SUMS.removesuffix(", count(*)")
            await conn.execute(
                "INSERT INTO usage_rollups SELECT (ts AT TIME ZONE 'UTC')::date, model, coalesce(client, ''), "
                f"coalesce(session_id, ''), coalesce(record::json->>'endpoint', ''), {sums} "
                "FROM usage_records GROUP BY 1, 2, 3, 4, 5"
            )
            zeros = ", ".join(["0"] * 7) + ", 0, 0, 0, false, 0, 0"
            await conn.execute(
                f"INSERT INTO usage_rollups VALUES ('2026-03-01', $1, 'team', 's1', 'anthropic', {zeros})", sonnet
            )
            await conn.execute(
                "INSERT INTO usage_rollups_nosession SELECT day, model, client, endpoint, sum(input_tokens), "
                "sum(output_tokens), sum(total_tokens), sum(cache_read_tokens), sum(cache_write_tokens), "
                "sum(reasoning_tokens), sum(total_cost), sum(answered), sum(errors), sum(estimated), "
                "bool_or(price_unknown), sum(server_tool_cost), sum(server_tool_uses) FROM usage_rollups "
                "GROUP BY 1, 2, 3, 4"
            )
    finally:
        await old.aclose()
    monkeypatch.undo()
    db = PostgresDatabase(pg_dsn)
    usage = PostgresUsageStore(db)
    try:
        await db.start()
        assert await db.schema_version() == MIGRATIONS[-1][0]
        async with db.connection() as conn:
            for table in ("usage_rollups", "usage_rollups_nosession"):
                assert await conn.fetchval(f"SELECT sum(records) FROM {table}") == 3, table
                assert await conn.fetchval(f"SELECT count(*) FROM {table} WHERE records = 0") == 0, table
        # An estimate of another call, then its record in another group: its row goes too.
        await usage.append(call_record(9, "2026-03-01T23:59:59.000Z", sonnet, recovered=True))
        await usage.append(call_record(9, "2026-03-02T00:00:03.000Z", haiku))
        scanned = await usage.records()
        assert len(scanned) == 4
        for by, grouping in REPORTS.items():
            assert rounded(await usage.report(by=by)) == rounded({**grouping(scanned), "damagedFiles": []}), by
    finally:
        await usage.aclose()
        await db.aclose()


async def test_the_migration_to_seen_message_counts_leaves_out_the_answers_set_aside(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database of the version before: its sessions counted the answers a regenerate set aside. The migration
    counts the messages their clients see; a message that only mentions the word is counted still."""
    import json

    from agentspace.storage.postgres import database

    monkeypatch.setattr(database, "MIGRATIONS", [v for v in MIGRATIONS if v[0] < 10])
    old = PostgresDatabase(pg_dsn)
    bodies = [
        {"id": "u1", "role": "user", "content": 'say "replaced"'},
        {"id": "a1", "role": "assistant", "content": "first", "replaced": True},
        {"id": "a2", "role": "assistant", "content": '"replaced": true'},
    ]
    try:
        await old.start()
        async with old.transaction() as conn:  # as that version wrote them: every message counted
            for session_id, messages in (("s1", bodies), ("s2", bodies[:1])):
                await conn.execute(
                    "INSERT INTO sessions (id, model, created_at, last_activity_at, message_count) "
                    "VALUES ($1, 'm', '2026-12-01', '2026-12-01', $2)",
                    session_id,
                    len(messages),
                )
                await conn.executemany(
                    "INSERT INTO messages (session_id, seq, id, body) VALUES ($1, $2, $3, $4)",
                    [(session_id, n, m["id"], json.dumps(m)) for n, m in enumerate(messages, 1)],
                )
    finally:
        await old.aclose()
    monkeypatch.undo()
    db = PostgresDatabase(pg_dsn)
    try:
        await db.start()
        listed = await PostgresSessionStore(db).summaries()
        assert {s["id"]: s["messageCount"] for s in listed} == {"s1": 2, "s2": 1}
    finally:
        await db.aclose()
