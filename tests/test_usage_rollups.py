"""Usage reports from rollups equal the full scan of the records (on random data), and read only what is open.

The embedded store: closed segments are summed once per (day, model, client, session, endpoint) into
``usage/rollups/<day>.json``; a report adds the open segment's records. Every report, with every filter,
must give what grouping every record gives."""

from __future__ import annotations

import asyncio
import json
import random
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from agentspace.cli import main as cli
from agentspace.storage import reports
from agentspace.storage.embedded import usage as usage_module
from agentspace.storage.embedded.tinydb_file import read_tables
from agentspace.storage.embedded.usage import UsageStore, write_log_segment, write_segment
from agentspace.storage.reports import REPORTS
from agentspace.types import Cost, TokenUsage, UsageRecord
from tests.conftest import wait_until
from tests.fakes.anthropic_upstream import text_response

MODELS = ["anthropic/claude-sonnet-4-5", "anthropic/claude-haiku-4-5", "openai/gpt-4o", None]
CLIENTS = ["alice", "bob", "ws", "http", None]
SESSIONS = ["s1", "s2", "s3", None]
ENDPOINTS = ["ws", "/api/chat", "/v1/messages", None]
DAYS = ["2026-03-01", "2026-03-02", "2026-03-03", "2026-03-05"]


def random_record(rng: random.Random, n: int, day: str) -> dict[str, Any]:
    inp, out = rng.randint(0, 5000), rng.randint(0, 800)
    second = rng.randint(0, 86399)
    # A few records land in the folder of the next day (written just after midnight, timed before it).
    stamp = f"{day}T{second // 3600:02d}:{second // 60 % 60:02d}:{second % 60:02d}.{rng.randint(0, 999):03d}Z"
    record: dict[str, Any] = {
        "id": f"r{n}",
        "timestamp": stamp,
        "model": rng.choice(MODELS),
        "provider": "p",
        "sessionId": rng.choice(SESSIONS),
        "client": rng.choice(CLIENTS),
        "inputTokens": inp,
        "outputTokens": out,
        "cacheReadTokens": rng.choice([0, 0, rng.randint(0, 3000)]),
        "cacheWriteTokens": rng.choice([0, rng.randint(0, 500)]),
        "reasoningTokens": rng.choice([0, None, rng.randint(0, 200)]),
        "totalTokens": inp + out,
        "totalCost": rng.choice([0.0, inp * 3e-6 + out * 1.5e-5, None]),
        "finishReason": rng.choice(["stop", "stop", "length", "error"]),
        "estimated": rng.random() < 0.1,
        "priceKnown": rng.random() > 0.05,
        "error": rng.choice([None, None, None, "UPSTREAM_ERROR"]),
        "answered": rng.random() > 0.1,
        "endpoint": rng.choice(ENDPOINTS),
    }
    if rng.random() < 0.3:  # server tools (web search, web fetch): their fees, part of the total, and uses
        uses = {tool: rng.randint(1, 5) for tool in rng.sample(["web_search", "web_fetch"], rng.randint(1, 2))}
        record["serverToolUse"] = uses
        record["serverToolCost"] = uses.get("web_search", 0) * 0.01
        record["totalCost"] = (record["totalCost"] or 0.0) + record["serverToolCost"]
    return record


def seed(data_dir: Path, rng: random.Random) -> list[dict[str, Any]]:
    """Past days in both formats (earlier versions' segments and logs), several segments each."""
    records: list[dict[str, Any]] = []
    n = 0
    for d, day in enumerate(DAYS):
        for number in range(3):
            batch = [random_record(rng, n + i, DAYS[d - 1] if rng.random() < 0.05 and d else day) for i in range(40)]
            n += len(batch)
            (write_segment if (d + number) % 2 else write_log_segment)(data_dir, day, number, batch)
            records += batch
    return records


def segment_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The segments the reports read from now on, as ``<day>/<file>``."""
    read: list[str] = []
    real = usage_module.read_segment

    def counting(path: Path) -> list[dict[str, Any]]:
        read.append(f"{path.parent.name}/{path.name}")
        return real(path)

    monkeypatch.setattr(usage_module, "read_segment", counting)
    return read


def rounded(report: dict[str, Any]) -> Any:
    """Float sums in another order differ below a nano-dollar: compare costs to 1e-9."""
    if isinstance(report, dict):
        return {k: round(v, 9) if k in ("totalCost", "serverToolCost") else rounded(v) for k, v in report.items()}
    return report


FILTERS: list[dict[str, Any]] = [
    {},
    {"since": datetime(2026, 3, 2, tzinfo=UTC)},
    {"since": datetime(2026, 3, 2, 13, 30, tzinfo=UTC)},  # inside a closed day: that day is scanned
    {"session_id": "s2"},
    {"client": "alice"},
    {"client": "bob", "since": datetime(2026, 3, 3, tzinfo=UTC)},
]


@pytest.mark.parametrize("seed_number", [1, 2, 3])
async def test_rollup_reports_equal_the_full_scan_on_random_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed_number: int
) -> None:
    rng = random.Random(seed_number)
    seed(tmp_path, rng)
    # Today: records through the real writer, three segments of 30: two closed, one open.
    monkeypatch.setattr(usage_module, "_utc_day", lambda: "2026-03-06")
    store = UsageStore(tmp_path, segment_size=30)
    for n in range(75):
        searches = rng.choice([0, 0, rng.randint(1, 4)])
        await store.append(
            UsageRecord(
                f"t{n}",
                f"2026-03-06T0{n // 10}:00:00.000Z",
                rng.choice(["m1", "m2"]),
                "p",
                rng.choice(SESSIONS),
                rng.choice(CLIENTS),
                TokenUsage(rng.randint(0, 99), rng.randint(0, 99), server_tool_use={"web_search": searches} or None),
                Cost(rng.random() / 1000, rng.random() / 1000, server_tool_cost=searches * 0.01),
                1.0,
                "stop",
                endpoint=rng.choice(ENDPOINTS),
            )
        )
    for attempt in ("builds the rollups", "reads them"):
        for where in FILTERS:
            for by, grouping in REPORTS.items():
                scanned = {**grouping(store.records_sync(**where)), "damagedFiles": []}
                assert rounded(store.report_sync(by=by, **where)) == rounded(scanned), (attempt, by, where)
    # Server-tool fees and uses were there to be summed (old days' records and today's through the writer).
    records = list(store.records_sync())
    grand = store.report_sync()["grandTotal"]
    assert grand["serverToolCost"] == pytest.approx(sum(r.get("serverToolCost") or 0.0 for r in records))
    assert grand["serverToolUses"] == sum(sum((r.get("serverToolUse") or {}).values()) for r in records)
    assert grand["serverToolCost"] > 0 and any(r["id"].startswith("t") and r["serverToolCost"] for r in records)
    for path in (tmp_path / "usage" / "rollups").iterdir():  # small whole files, in tinydb's layout like the rest
        read_tables(path)
    assert sorted(p.name for p in (tmp_path / "usage" / "rollups").iterdir()) == sorted(
        [
            *(f"{d}.json" for d in [*DAYS, "2026-03-06"]),
            *(f"{d}.day.json" for d in [*DAYS, "2026-03-06"]),
            *(f"{d}.nosession.json" for d in [*DAYS, "2026-03-06"]),
        ]
    )  # a day's closed segments merged in files of their own (with and without sessions), today's two too
    await store.aclose()


async def test_a_report_reads_only_the_open_segment_once_rollups_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(5)
    seed(tmp_path, rng)
    monkeypatch.setattr(usage_module, "_utc_day", lambda: "2026-03-03")  # a seeded day is today
    store = UsageStore(tmp_path)
    first = store.report_sync()
    read = segment_reads(monkeypatch)
    assert store.report_sync() == first
    # Nothing read whole: today's last segment, still being written, was summed by the first report, and a
    # report reads only what was appended to it since (nothing here).
    assert read == []
    # Today's closed segments count through their groups merged once, like a past day's.
    (tmp_path / "usage" / "rollups" / "2026-03-03.json").unlink()
    read.clear()
    assert store.report_sync() == first and store.report_sync(by="session")["perSession"]
    assert read == []

    # A closed segment that changed after its rollup (here: rewritten by hand) is read again, not trusted.
    path = tmp_path / "usage" / "2026-03-01" / "00000.jsonl"
    raw = path.read_bytes()
    path.write_bytes(raw.split(b"\n", 1)[1])  # its first record gone
    read.clear()
    after = store.report_sync()
    assert "2026-03-01/00000.jsonl" in read
    assert after["grandTotal"] == REPORTS["model"](store.records_sync())["grandTotal"] != first["grandTotal"]


def test_a_past_day_is_counted_through_its_segments_merged_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A report over past days reads one merged list of groups per day, however many segments the day filled:
    its time grows with the groups, not the records. A segment changed since falls back to the segments."""
    rng = random.Random(6)
    records = seed(tmp_path, rng)
    monkeypatch.setattr(usage_module, "_utc_day", lambda: "2026-03-06")  # every seeded day is past
    store = UsageStore(tmp_path)
    first = store.report_sync(by="session")
    rollups = tmp_path / "usage" / "rollups"
    for day in DAYS:
        segments = json.loads((rollups / f"{day}.json").read_text())["segments"]
        merged = json.loads((rollups / f"{day}.day.json").read_text())["day"]["merged"]
        in_folder = [
            r for path in sorted((tmp_path / "usage" / day).iterdir()) for r in usage_module.read_segment(path)
        ]
        assert len(segments) == 3 and merged["sizes"] == {
            name: (tmp_path / "usage" / day / name).stat().st_size for name in segments
        }
        keys = {tuple(row[:6]) for row in merged["groups"]}
        assert len(keys) == len(merged["groups"]) == len(reports.group_records(in_folder))  # one row per group
        # Only the merged groups are read from now on: with the segments' own rollups gone, nothing changes.
        (rollups / f"{day}.json").unlink()
    read = segment_reads(monkeypatch)
    for by in ("session", "model", "day"):
        assert rounded(store.report_sync(by=by)) == rounded({**REPORTS[by](records), "damagedFiles": []})
    assert store.report_sync(by="session") == first and read == []


def test_a_report_without_sessions_grows_with_the_groups_it_shows_not_the_sessions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One call per session (a /v1 client labelling each call) makes as many groups as records: a report by model,
    client, day or endpoint, and a budget's spend, read the past days merged without the session instead."""
    rng = random.Random(12)
    records: list[dict[str, Any]] = []
    for day in DAYS:
        for number in range(2):
            batch = [random_record(rng, len(records) + i, day) for i in range(60)]
            for i, record in enumerate(batch):
                record["sessionId"] = f"s{len(records) + i}"  # every call a session of its own
            write_log_segment(tmp_path, day, number, batch)
            records += batch
    monkeypatch.setattr(usage_module, "_utc_day", lambda: "2026-03-06")  # every seeded day is past
    store = UsageStore(tmp_path)
    rollups = tmp_path / "usage" / "rollups"

    def scan(by: str, chosen: list[dict[str, Any]]) -> Any:
        return rounded({**REPORTS[by](chosen), "damagedFiles": []})

    assert rounded(store.report_sync(by="model")) == scan("model", records)
    for day in DAYS:
        bare = json.loads((rollups / f"{day}.nosession.json").read_text())["day"]["merged"]
        merged = json.loads((rollups / f"{day}.day.json").read_text())["day"]["merged"]
        assert {row[3] for row in bare["groups"]} == {None} and len(merged["groups"]) == 120  # a group per record
        assert len(bare["groups"]) == len({tuple(row[:3] + row[4:6]) for row in merged["groups"]}) < 120
    # From now on those reports read only the merged files without sessions: the others can go.
    for day in DAYS:
        (rollups / f"{day}.json").unlink()
        (rollups / f"{day}.day.json").unlink()
    read = segment_reads(monkeypatch)
    for by in ("model", "client", "day", "endpoint", "day-model", "deployment"):
        assert rounded(store.report_sync(by=by)) == scan(by, records), by
    assert rounded(store.report_sync(by="client", client="alice")) == scan(
        "client", [r for r in records if r["client"] == "alice"]
    )
    spent, _ = asyncio.run(store.spend(client="bob", since=None, posting=dict))
    assert spent == pytest.approx(sum(r["totalCost"] or 0.0 for r in records if r["client"] == "bob"))
    assert read == []
    # A report per session, or of one session, needs the sessions: counted from the segments (rollups rebuilt).
    assert rounded(store.report_sync(by="session")) == scan("session", records)
    assert rounded(store.report_sync(session_id="s7")) == scan("model", [r for r in records if r["sessionId"] == "s7"])
    assert len(read) == 8 and (rollups / f"{DAYS[0]}.day.json").exists()

    # A segment changed after its day was merged (here: rewritten by hand) is read again, not trusted.
    path = tmp_path / "usage" / DAYS[1] / "00001.jsonl"
    path.write_bytes(path.read_bytes().split(b"\n", 1)[1])  # its first record gone
    records = [
        r for day in DAYS for p in sorted((tmp_path / "usage" / day).iterdir()) for r in usage_module.read_segment(p)
    ]
    read.clear()
    assert rounded(store.report_sync(by="model")) == scan("model", records)
    assert f"{DAYS[1]}/00001.jsonl" in read
    # A merged file damaged from outside is moved aside and made again.
    bare_path = rollups / f"{DAYS[2]}.nosession.json"
    bare_path.write_text("{not json")
    assert rounded(store.report_sync(by="model")) == scan("model", records)
    assert json.loads(bare_path.read_text())["day"]["merged"]["groups"]
    assert [p.name for p in rollups.iterdir() if p.name.startswith(f"{DAYS[2]}.nosession.json.damaged-")]


def test_the_cli_report_reads_rollups_and_names_damaged_segments(
    isolated_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(9)
    records = seed(isolated_env, rng)
    bad = isolated_env / "usage" / "2026-03-02" / "00000.json"  # an earlier version's segment
    bad.write_bytes(bad.read_bytes()[:-20])  # damaged: its records are not counted, the report says so
    read = segment_reads(monkeypatch)
    counted = [r for r in records if r["id"] not in {f"r{n}" for n in range(120, 160)}]
    for run in range(2):  # the first run builds the rollups (the damaged segment's too), the second reads them
        read.clear()
        result = CliRunner().invoke(cli, ["usage", "--by-model", "--json"])
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["damagedFiles"] == [str(bad)]
        assert report["grandTotal"]["requestCount"] == sum(r["answered"] is not False for r in counted)
        assert rounded(report["perModel"]) == rounded(REPORTS["model"](counted)["perModel"])
        # Every seeded day is past: once the rollups exist, the report reads no segment at all.
        assert len(read) == (12 if run == 0 else 0), read


def test_the_cli_reports_per_session_client_and_endpoint_equal_the_scan(
    isolated_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(11)
    records = seed(isolated_env, rng)
    monkeypatch.setattr(usage_module, "_utc_day", lambda: "2026-03-05")  # the last seeded day is today
    for args, since in (([], None), (["--since", "2026-03-02"], "2026-03-02")):
        argv = ["usage", "--by-session", "--by-client", "--by-endpoint", "--json", *args]
        result = CliRunner().invoke(cli, argv)
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        chosen = [r for r in records if since is None or r["timestamp"] >= since]
        assert rounded(report["perSession"]) == rounded(REPORTS["session"](chosen)["perSession"])
        assert rounded(report["perClient"]) == rounded(REPORTS["client"](chosen)["perClient"])
        assert rounded(report["perEndpoint"]) == rounded(REPORTS["endpoint"](chosen)["perEndpoint"])
        assert rounded(report["grandTotal"]) == rounded(REPORTS["model"](chosen)["grandTotal"])
    table = CliRunner().invoke(cli, ["usage", "--by-session"])
    assert table.exit_code == 0, table.output
    header, _, *rows = table.stdout.split("\n\n")[0].splitlines()  # the footnote of fallback prices after it
    assert header.split()[0] == "session"
    labels = [row.split()[0].rstrip("*") for row in rows]
    assert labels == [*sorted({str(r["sessionId"] or "none") for r in records}), "TOTAL"]


def test_rollups_of_an_earlier_version_are_rebuilt_with_the_server_tool_fees(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rollups written before server-tool fees were summed (version 2: no fee, no uses in a group's totals)
    # are not trusted: the first report rebuilds them from the segments and counts the fees.
    rng = random.Random(4)
    seed(tmp_path, rng)
    monkeypatch.setattr(usage_module, "_utc_day", lambda: "2026-03-06")
    store = UsageStore(tmp_path)
    rollups = tmp_path / "usage" / "rollups"
    rollups.mkdir(parents=True)
    version_2 = (*reports.TOKEN_FIELDS, "totalCost", *reports.COUNTS)  # a group's totals then
    for day in DAYS:
        segments = {}
        for path in sorted((tmp_path / "usage" / day).iterdir()):
            records = usage_module.read_segment(path)
            groups = [
                [*key, [*(t[f] for f in version_2), 0 if t.get("priceKnown") is False else 1]]
                for key, t in reports.group_records(records).items()
            ]
            first = min(str(r.get("timestamp") or "") for r in records)
            segments[path.name] = {"version": 2, "size": path.stat().st_size, "first": first, "groups": groups}
        (rollups / f"{day}.json").write_text(json.dumps({"segments": segments}))

    report = store.report_sync(by="day")
    assert rounded(report) == rounded({**REPORTS["day"](store.records_sync()), "damagedFiles": []})
    assert report["grandTotal"]["serverToolCost"] > 0 and report["grandTotal"]["serverToolUses"] > 0
    for day in DAYS:  # saved again, in the current version, and read from then on
        saved = json.loads((rollups / f"{day}.json").read_text())["segments"]
        assert {entry["version"] for entry in saved.values()} == {usage_module._ROLLUP_VERSION} != {2}
    assert rounded(store.report_sync(by="day")) == rounded(report)


async def test_postgres_usage_reports_answer_from_the_rollups_not_the_records(
    tmp_path: Path, fake_anthropic: Any, pg_dsn: str
) -> None:
    # A real `serve` on PostgreSQL: /api/usage?by=model (and day, client, session) and `agentspace usage` read the
    # rollups kept with the inserts. Shown by changing the records behind the store's back: a report that
    # scanned them would count the change; the rollups still give what the fake upstream reported.
    import aiohttp
    import asyncpg

    from scripts.harness import GatewayProcess
    from tests.fakes import anthropic_upstream as fa

    server = GatewayProcess(tmp_path / "data", fake_anthropic.url, storage={"backend": "postgres", "dsn": pg_dsn})
    for n in range(3):
        fake_anthropic.enqueue(
            fa.text_response("ok", usage={"input_tokens": 100 + n}, delta_usages=[{"output_tokens": 7}])
        )
    try:
        url = await server.start()
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {server.token}"}) as http:
            for n in range(3):
                body = {
                    "id": f"pg{n}",
                    "messages": [{"id": "u", "role": "user", "parts": [{"type": "text", "text": "q"}]}],
                }
                async with http.post(f"{url}/api/chat", json=body) as resp:
                    assert resp.status == 200 and (await resp.read()).endswith(b"data: [DONE]\n\n")
            conn = await asyncpg.connect(pg_dsn)
            try:
                assert await conn.fetchval("SELECT count(*) FROM usage_records") == 3
                await conn.execute("UPDATE usage_records SET input_tokens = input_tokens + 1000000")
            finally:
                await conn.close()

            async def report(by: str) -> dict[str, Any]:
                async with http.get(f"{url}/api/usage?by={by}") as resp:
                    assert resp.status == 200, await resp.text()
                    return dict(await resp.json())

            for by, key in (
                ("model", "perModel"),
                ("day", "perDay"),
                ("client", "perClient"),
                ("session", "perSession"),
                ("endpoint", "perEndpoint"),
            ):
                answer = await report(by)
                assert answer["grandTotal"]["inputTokens"] == 303 and answer["grandTotal"]["outputTokens"] == 21, by
                assert answer["grandTotal"]["requestCount"] == 3 and len(answer[key]) == (3 if by == "session" else 1)
            assert list((await report("endpoint"))["perEndpoint"]) == ["http"]
            # The records were changed (a scan of them sees it): what proves the reports above did not scan.
            assert (await report("deployment"))["grandTotal"]["inputTokens"] == 3_000_303
        cli_result = await asyncio.to_thread(
            CliRunner().invoke, cli, ["usage", "--by-model", "--json", "--config", str(server.config_path)]
        )
        assert cli_result.exit_code == 0, cli_result.output
        assert json.loads(cli_result.stdout)["perModel"]["anthropic/claude-sonnet-4-5"]["inputTokens"] == 303
    finally:
        await server.aclose()


async def test_a_server_report_sums_only_what_was_appended_to_the_open_segment_since_the_last(
    make_client: Any,
    auth_headers: dict[str, str],
    fake_anthropic: Any,
    isolated_env: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Budget alerts report a client's spend after each of its records: a report that parsed the whole open
    segment each time grew with the day's records (up to 10,000). The server's reports read the segment's lines
    once and equal the scan of every record after each call, with every grouping, from the day's start or from a
    time inside it (scanned), and name a line of junk appended from outside as the scan does."""
    client = await make_client()
    read = segment_reads(monkeypatch)
    store = UsageStore(isolated_env)
    headers = {**auth_headers, "anthropic-version": "2023-06-01"}
    today = datetime.now(UTC).strftime("%Y-%m-%d")

    async def report(query: str) -> dict[str, Any]:
        resp = await client.get(f"/api/usage?{query}", headers=auth_headers)
        assert resp.status == 200, await resp.text()
        return dict(await resp.json())

    for n in range(6):
        fake_anthropic.enqueue(text_response("Ok.", usage={"input_tokens": 100 + n}))
        body = {
            "model": "anthropic/claude-sonnet-4-5",
            "max_tokens": 16,
            "messages": [{"role": "user", "content": "hi"}],
        }
        session = {"X-Agentspace-Session": f"label-{n % 2}"}
        resp = await client.post("/v1/messages", json=body, headers={**headers, **session})
        assert resp.status == 200, await resp.text()
        await resp.read()
        await wait_until(partial(_stored, store, n + 1))
        records = list(store.records_sync())
        middle = records[len(records) // 2]["timestamp"]
        read.clear()  # the reads of the reports below only
        for by in ("model", "session", "client", "day"):
            assert rounded(await report(f"by={by}")) == rounded({**REPORTS[by](records), "damagedFiles": []})
        assert rounded(await report(f"since={today}")) == rounded({**REPORTS["model"](records), "damagedFiles": []})
        later = [r for r in records if r["timestamp"] >= middle]
        assert rounded(await report(f"since={middle}")) == rounded({**REPORTS["model"](later), "damagedFiles": []})
        # Read whole only for the report from inside the day; every other one summed the lines added since.
        assert read == [f"{today}/00000.jsonl"]

    segment = next((isolated_env / "usage" / today).glob("*.jsonl"))
    with open(segment, "ab") as f:
        f.write(b"not a record\n")
    damaged = await report("by=model")
    assert damaged["damagedFiles"] == [str(segment)] and damaged["grandTotal"]["requestCount"] == 0


async def _stored(store: UsageStore, count: int) -> bool:
    return sum(1 for _ in store.records_sync()) == count


def test_a_report_after_the_writer_cut_off_a_record_and_went_on_counts_what_is_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record whose sync failed is cut off by the writer, which then appends the next ones where it was: a
    report that summed the cut record reads the segment whole again (its last line summed is no longer there),
    as it does for a segment shortened or replaced."""
    rng = random.Random(8)
    monkeypatch.setattr(usage_module, "_utc_day", lambda: "2026-03-03")
    write_log_segment(tmp_path, "2026-03-03", 0, [random_record(rng, n, "2026-03-03") for n in range(20)])
    segment = tmp_path / "usage" / "2026-03-03" / "00000.jsonl"
    store = UsageStore(tmp_path)

    def check() -> None:
        for by in ("model", "session"):
            scanned = REPORTS[by](usage_module.read_segment(segment))
            assert rounded(store.report_sync(by=by)) == rounded({**scanned, "damagedFiles": []})

    check()
    kept = segment.read_bytes()
    cut = json.dumps({**random_record(rng, 20, "2026-03-03"), "model": "anthropic/claude-sonnet-4-5"}).encode()
    with open(segment, "ab") as f:
        f.write(cut + b"\n")
    check()  # the record counted, then cut off as after a failed sync, and two others written where it was
    instead = cut.replace(b'"r20"', b'"r21"').replace(b"sonnet-4-5", b"sonnet-4-6")  # a line as long
    segment.write_bytes(kept + instead + b"\n" + json.dumps(random_record(rng, 22, "2026-03-03")).encode() + b"\n")
    check()
    segment.write_bytes(kept.replace(b"claude-sonnet-4-5", b"claude-sonnet-4-6"))  # shortened, and changed
    check()
