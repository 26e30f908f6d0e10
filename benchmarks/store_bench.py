"""Store write latency at growing sizes, listing 10k sessions, and usage reports over 100k and 1M records.

    python benchmarks/store_bench.py [--data-dir DIR] [--postgres] [--reports-only] [--postgres-only]
        [--calls-per-session N]

What it shows: a UsageStore.append costs the same at 1k, 10k and 100k stored records (it appends one line to
the current segment); a SessionStore.append_message the same however many sessions are stored, and the same
on an empty session and a 10 MB one (it appends two lines: the message and the summary); what listing 10k
sessions costs (each session's summary read from the end of its log); what a new session costs (one append to
the session journal) and its first message (which writes the session's file), beside what the disk takes to
make a new file or to append to one; and a usage report over 100k and 1M
records spread over 30 days (rollups of closed segments plus the open one): in process, and as a cold
``agentspace usage --by-model`` process, once the rollups exist (the first report, which writes them, is
timed apart; wall time, and the process's CPU time, which a loaded machine inflates less; the package is
byte-compiled first, as an install does, so that no run compiles it). ``--reports-only`` runs the reports
alone (no write latencies). ``--postgres`` adds the PostgreSQL backend's report (``report(by="model")``, what
``/api/usage?by=model`` runs) and a client's spend at 100k and 1M records, on a throwaway server
(``tests/scale_servers.py``), with what its inserts cost there (``copy_in`` in batches of 5,000, and single
records through the writer); ``--postgres-only`` runs that alone. ``--calls-per-session N`` sets the records'
sessions (default 200; 1: every call a session of its own, as a /v1 client labelling each call makes them).

Every measured write is durable (``fdatasync``). Seeding is setup, not measured: usage history is written
as whole segments (``write_log_segment``), sessions go through the store with syncs switched off.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import contextlib
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agentspace.storage import SessionStore, UsageStore, usage_report
from agentspace.storage.embedded.usage import SEGMENT_SIZE, write_log_segment
from agentspace.types import Cost, TokenUsage, UsageRecord, new_id, now_iso

USAGE_LEVELS = (1_000, 10_000, 100_000)
APPENDS = 500  # per level: fills a fresh segment from 0 to 500 records, the same work at every level
BATCH = 25
SESSIONS = 10_000
SESSION_APPENDS = 300
LONG_SESSION = 2_000  # messages in the long session: a write must not grow with them
BIG_SESSION_BYTES = 10_000_000  # the 10 MB session a 1 KB message is appended to, against an empty one
REPORT_LEVELS = (100_000, 1_000_000)
REPORT_DAYS = 30
CALLS_PER_SESSION = 200  # a report's groups: an agent session makes many calls, on one day, with one model
MODELS = (
    "anthropic/claude-sonnet-4-5",
    "anthropic/claude-haiku-4-5",
    "openai/gpt-4o",
    "openai/gpt-4o-mini",
    "gemini/gemini-2.5-pro",
)


def usage_record(rng: random.Random) -> UsageRecord:
    inp, out = rng.randint(100, 20_000), rng.randint(10, 4_000)
    return UsageRecord(
        id=new_id("u_"),
        timestamp=now_iso(),
        model=rng.choice(MODELS),
        provider="bench",
        session_id=f"s{rng.randint(0, SESSIONS - 1)}",
        client="bench",
        usage=TokenUsage(inp, out, rng.randint(0, 5_000), 0, rng.randint(0, 1_000)),
        cost=Cost(inp * 3e-6, out * 15e-6),
        latency_ms=rng.uniform(200, 9000),
        finish_reason="stop",
    )


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def timed(n: int, op: Callable[[int], Awaitable[Any]]) -> list[float]:
    out = []
    for i in range(n):
        start = time.perf_counter()
        await op(i)
        out.append((time.perf_counter() - start) * 1000)
    return out


@contextlib.contextmanager
def no_fsync() -> Iterator[None]:
    real, real_data = os.fsync, os.fdatasync
    os.fsync = os.fdatasync = lambda fd: None
    try:
        yield
    finally:
        os.fsync, os.fdatasync = real, real_data


def seed_usage(data_dir: Path, total: int, rng: random.Random) -> None:
    """``total`` records in segments of today's folder (the last one partly full: the writer continues it)."""
    day = time.strftime("%Y-%m-%d", time.gmtime())
    for number, start in enumerate(range(0, total, SEGMENT_SIZE)):
        count = min(SEGMENT_SIZE, total - start)
        write_log_segment(data_dir, day, number, [usage_record(rng).to_dict() for _ in range(count)])


def history_records(total: int, rng: random.Random, batch: str = "") -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """``total`` records over the last ``REPORT_DAYS`` days (today included), as (day, records) per segment.

    Like a year of one busy developer's agent traffic: sessions of ``CALLS_PER_SESSION`` calls, each on one
    day and one model. ``batch`` sets records added to a store apart from those seeded before (their sessions
    are new ones, not the same numbers again)."""
    now = time.time()
    per_day = total // REPORT_DAYS
    for back in range(REPORT_DAYS - 1, -1, -1):
        day_start = (int(now) // 86400 - back) * 86400
        day = time.strftime("%Y-%m-%d", time.gmtime(day_start))
        records = []
        for n in range(per_day):
            session = n // CALLS_PER_SESSION
            second = (
                min(day_start + n * 86400 // per_day, int(now) - 1) if back == 0 else day_start + n * 86400 // per_day
            )
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(second))
            record = usage_record(rng)
            data = {**record.to_dict(), "timestamp": stamp, "sessionId": f"s{day}-{batch}{session}"}
            data["model"] = MODELS[(session + back) % len(MODELS)]
            data["endpoint"] = "ws"
            records.append(data)
        for start in range(0, len(records), SEGMENT_SIZE):
            yield day, records[start : start + SEGMENT_SIZE]


async def bench_usage(root: Path, rng: random.Random, rows: list[tuple[str, str, list[float]]]) -> Path:
    stores: dict[int, UsageStore] = {}
    for total in USAGE_LEVELS:
        seed_usage(root / f"usage-{total}", total, rng)
        stores[total] = UsageStore(root / f"usage-{total}", segment_size=SEGMENT_SIZE)
    os.sync()  # the seed's write-back must not slow the measured fsyncs
    latencies: dict[int, list[float]] = {total: [] for total in USAGE_LEVELS}
    # Levels take turns in small batches, so load from elsewhere on the machine hits them alike.
    for _ in range(APPENDS // BATCH):
        for total, store in stores.items():
            records = [usage_record(rng) for _ in range(BATCH)]
            latencies[total] += await timed(BATCH, lambda i: store.append(records[i]))
    for total, store in stores.items():
        await store.aclose()
        rows.append(("UsageStore.append", f"{total:,} records", latencies[total]))
    return root / f"usage-{USAGE_LEVELS[-1]}"


async def bench_sessions(root: Path, rng: random.Random, rows: list[tuple[str, str, list[float]]]) -> None:
    data_dir = root / "sessions"
    store = SessionStore(data_dir)
    started = time.perf_counter()
    with no_fsync():
        for i in range(SESSIONS):
            sid = f"s{i}"
            await store.create(model=MODELS[i % len(MODELS)], session_id=sid)
            await store.append_message(sid, {"role": "user", "content": f"question {i} " + "lorem ipsum " * 20})
            await store.append_message(sid, {"role": "assistant", "content": "answer " * 120, "model": MODELS[0]})
        await store.create(model=MODELS[0], session_id="long")
        for i in range(LONG_SESSION // 2):
            await store.append_message("long", {"role": "user", "content": f"question {i} " + "lorem ipsum " * 20})
            await store.append_message("long", {"role": "assistant", "content": "answer " * 120, "model": MODELS[0]})
    await store.aclose()
    os.sync()
    print(f"(seeded {SESSIONS:,} sessions in {time.perf_counter() - started:.1f} s)", file=sys.stderr)

    store = SessionStore(data_dir)  # a fresh server: sessions are parsed from disk on first use
    targets = [f"s{rng.randrange(SESSIONS)}" for _ in range(SESSION_APPENDS)]
    message = {"role": "user", "content": "one more question " * 10}
    rows.append(
        (
            "SessionStore.append_message, random session",
            f"{SESSIONS:,} sessions",
            await timed(SESSION_APPENDS, lambda i: store.append_message(targets[i], message)),
        )
    )
    rows.append(
        (
            "SessionStore.append_message, one session",
            f"{SESSIONS:,} sessions",
            await timed(SESSION_APPENDS, lambda i: store.append_message("s0", message)),
        )
    )
    long_size = (data_dir / "sessions" / "long.jsonl").stat().st_size
    rows.append(
        (
            "SessionStore.append_message, long session",
            f"{LONG_SESSION:,} messages, {long_size / 1e6:.1f} MB",
            await timed(SESSION_APPENDS, lambda i: store.append_message("long", message)),
        )
    )
    rows.append(
        ("SessionStore.summaries (async)", f"{SESSIONS:,} sessions", await timed(3, lambda i: store.summaries()))
    )
    # A 1 KB message on an empty session and on a 10 MB one, taking turns (the same load on both).
    turn = "word " * 2000  # 10 KB
    with no_fsync():
        await store.create(model=MODELS[0], session_id="empty")
        await store.create(
            model=MODELS[0],
            session_id="big",
            messages=[{"role": "user", "content": turn} for _ in range(BIG_SESSION_BYTES // len(turn))],
        )
        for sid in ("empty", "big"):  # their files written (a new session is in the session journal until then)
            await store.touch(sid)
    big_size = (data_dir / "sessions" / "big.jsonl").stat().st_size
    kilobyte = {"role": "user", "content": "x" * 1000}
    empty_ms: list[float] = []
    big_ms: list[float] = []
    for _ in range(SESSION_APPENDS // BATCH):
        empty_ms += await timed(BATCH, lambda i: store.append_message("empty", kilobyte))
        big_ms += await timed(BATCH, lambda i: store.append_message("big", kilobyte))
    rows.append(("SessionStore.append_message 1 KB, empty session", "0 messages", empty_ms))
    rows.append(("SessionStore.append_message 1 KB, 10 MB session", f"{big_size / 1e6:.1f} MB", big_ms))
    # A new session (one append to the session journal), then its first message (which writes its file), against
    # what the disk does for each: a new file, and an append to a file that exists.
    new_ids = [f"new{i}" for i in range(SESSION_APPENDS)]
    first = {"role": "user", "content": "lorem ipsum " * 50}
    rows.append(
        (
            "SessionStore.create",
            "the session journal",
            await timed(
                SESSION_APPENDS, lambda i: store.create(model=MODELS[0], session_id=new_ids[i], messages=[first])
            ),
        )
    )
    rows.append(
        (
            "SessionStore.append_message, a new session's first",
            "writes its file",
            await timed(SESSION_APPENDS, lambda i: store.append_message(new_ids[i], first)),
        )
    )
    raw = data_dir / "raw"
    raw.mkdir()
    payload = b"x" * 600 + b"\n"
    rows.append(
        (
            "os: a new file, fsync, folder fsync",
            "600 bytes",
            timed_sync(SESSION_APPENDS, lambda: _new_file(raw, payload)),
        )
    )
    fd = os.open(raw / "log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        rows.append(
            ("os: an append and its fdatasync", "600 bytes", timed_sync(SESSION_APPENDS, lambda: _append(fd, payload)))
        )
    finally:
        os.close(fd)
    await store.aclose()
    cold = SessionStore(data_dir)
    start = time.perf_counter()
    count = len(cold.summaries_sync())
    assert count == SESSIONS + 3 + SESSION_APPENDS
    rows.append(("SessionStore.summaries_sync, cold", f"{SESSIONS:,} sessions", [(time.perf_counter() - start) * 1000]))


def _new_file(folder: Path, payload: bytes) -> None:
    fd = os.open(folder / new_id("f_"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, payload)
        os.fsync(fd)
    finally:
        os.close(fd)
    folder_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(folder_fd)
    finally:
        os.close(folder_fd)


def _append(fd: int, payload: bytes) -> None:
    os.write(fd, payload)
    os.fdatasync(fd)


def cold_cli_report(data_dir: Path) -> tuple[float, str | None, float]:
    """``agentspace usage --by-model`` in a new process: its wall time in ms, or the error, and its CPU ms."""
    env = {**os.environ, "AGENTSPACE_HOME": str(data_dir), "AGENTSPACE_LOAD_PLUGINS": ""}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "agentspace", "usage", "--by-model"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired:
        return 0.0, "`agentspace usage --by-model` did not finish within 300 s", 0.0
    elapsed = (time.perf_counter() - start) * 1000
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) * 1000
    if done.returncode != 0:
        return (
            0.0,
            f"`agentspace usage --by-model` failed (exit {done.returncode}): {(done.stderr or done.stdout)[-600:]}",
            cpu,
        )
    return elapsed, None, cpu


def cli_startup_ms(root: Path) -> tuple[float, float]:
    """The same command on an empty data directory: what a cold process costs before any record is read (wall
    and CPU ms, the best of 5)."""
    empty = root / "empty"
    empty.mkdir(exist_ok=True)
    runs = [cold_cli_report(empty) for _ in range(5)]
    return min(r[0] for r in runs), min(r[2] for r in runs)


async def bench_reports(root: Path, rows: list[tuple[str, str, list[float]]], rng: random.Random) -> str | None:
    """Reports over 100k and 1M records spread over 30 days: the first (writes the rollups), then in-process
    and cold-process runs. Returns the CLI error, if any."""
    # Byte-compiled as an install leaves it (PYTHONDONTWRITEBYTECODE, set on some machines, would otherwise make
    # every cold run compile the package anew).
    compileall.compile_dir(Path(__file__).resolve().parent.parent / "agentspace", quiet=1)
    wall, cpu = cli_startup_ms(root)
    rows.append(("agentspace usage --by-model, empty data dir", "0 records", [wall]))
    rows.append(("  the same, CPU time of the process", "0 records", [cpu]))
    for total in REPORT_LEVELS:
        data_dir = root / f"report-{total}"
        for number, (day, records) in enumerate(history_records(total, rng)):
            write_log_segment(data_dir, day, number, records)
        os.sync()
        label = f"{total:,} records, {REPORT_DAYS} days"
        store = UsageStore(data_dir)
        start = time.perf_counter()
        first = store.report_sync(by="model")
        rows.append(("UsageStore.report, first (writes rollups)", label, [(time.perf_counter() - start) * 1000]))
        assert first["grandTotal"]["requestCount"] == total // REPORT_DAYS * REPORT_DAYS
        rows.append(
            ("UsageStore.report (rollups + open segment)", label, timed_sync(5, lambda: store.report_sync(by="model")))
        )
        start = time.perf_counter()
        usage_report(store.records_sync())
        rows.append(("usage_report(records()), the full scan", label, [(time.perf_counter() - start) * 1000]))
        # A budget's spend (the client's first call after a start): the month of the one client the records have.
        since = datetime.now(UTC) - timedelta(days=REPORT_DAYS)
        start = time.perf_counter()
        sum(float(r.get("totalCost") or 0.0) for r in store.records_sync(since=since, client="bench"))
        rows.append(("a client's spend summed from records() (before)", label, [(time.perf_counter() - start) * 1000]))
        rows.append(
            (
                "UsageStore.spend, a client's month (rollups)",
                label,
                await timed(5, lambda i: store.spend(client="bench", since=since, posting=dict)),
            )
        )
        cold: list[float] = []
        cpu: list[float] = []
        for _ in range(5):
            elapsed, error, used = cold_cli_report(data_dir)
            if error:
                return error
            cold.append(elapsed)
            cpu.append(used)
        rows.append(("agentspace usage --by-model, cold process", label, cold))
        rows.append(("  the same, CPU time of the process", label, cpu))
    return None


def timed_sync(n: int, op: Callable[[], Any]) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        op()
        out.append((time.perf_counter() - start) * 1000)
    return out


async def bench_postgres(rows: list[tuple[str, str, list[float]]], rng: random.Random) -> None:
    """The PostgreSQL backend's report (what ``/api/usage?by=model`` runs) at 100k and 1M records."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from agentspace.storage.postgres import PostgresDatabase, PostgresUsageStore
    from tests.scale_servers import Postgres

    server = Postgres()
    try:
        db = PostgresDatabase(server.dsn)
        await db.start()
        usage = PostgresUsageStore(db)
        stored = 0
        for total in REPORT_LEVELS:
            started = time.perf_counter()
            batches: list[float] = []  # ms per 1,000 records, inserted 5,000 at a time
            for _, records in history_records(total - stored, rng, batch=f"{total}-"):
                for start in range(0, len(records), 5000):
                    began = time.perf_counter()
                    await usage.copy_in(records[start : start + 5000])
                    batches.append((time.perf_counter() - began) * 1000 * 1000 / len(records[start : start + 5000]))
            stored = total
            print(f"(seeded PostgreSQL to {total:,} records in {time.perf_counter() - started:.0f} s)", file=sys.stderr)
            label = f"{total:,} records, {REPORT_DAYS} days"
            rows.append(("postgres copy_in, ms per 1,000 records", label, batches))
            # Single records through the writer (one transaction each), sessions of CALLS_PER_SESSION calls.
            singles = [usage_record(rng) for _ in range(APPENDS)]
            for n, record in enumerate(singles):
                record.session_id = f"w{total}-{n // CALLS_PER_SESSION}"
            rows.append(
                ("postgres append, one record", label, await timed(APPENDS, lambda i: usage.append(singles[i])))
            )
            async with db.connection() as conn:
                await conn.execute("VACUUM ANALYZE usage_rollups")
                if await conn.fetchval("SELECT to_regclass('usage_rollups_nosession')") is not None:
                    await conn.execute("VACUUM ANALYZE usage_rollups_nosession")
            rows.append(("postgres report(by=model)", label, await timed(5, lambda i: usage.report(by="model"))))
            since = datetime.now(UTC) - timedelta(days=REPORT_DAYS)
            rows.append(
                (
                    "postgres spend, a client's month (rollups)",
                    label,
                    await timed(5, lambda i: usage.spend(client="bench", since=since, posting=dict)),
                )
            )
        await usage.aclose()
        await db.aclose()
    finally:
        server.close()


def print_table(rows: list[tuple[str, str, list[float]]]) -> None:
    headers = ("operation", "stored", "n", "p50 ms", "p99 ms", "max ms")
    cells = [
        (op, size, str(len(v)), f"{percentile(v, 50):.2f}", f"{percentile(v, 99):.2f}", f"{max(v):.2f}")
        for op, size, v in rows
    ]
    widths = [max(len(r[i]) for r in [headers, *cells]) for i in range(len(headers))]
    line = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print(line(row))


async def main() -> None:
    global CALLS_PER_SESSION
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="keep the generated data here (default: a temp folder, removed)")
    parser.add_argument("--postgres", action="store_true", help="also the PostgreSQL report at 100k and 1M records")
    parser.add_argument("--reports-only", action="store_true", help="only the usage reports (no write latencies)")
    parser.add_argument("--postgres-only", action="store_true", help="only the PostgreSQL reports and writes")
    parser.add_argument(
        "--calls-per-session",
        type=int,
        default=CALLS_PER_SESSION,
        help=f"the reports' records per session (default {CALLS_PER_SESSION}; 1: every call a session of its own)",
    )
    args = parser.parse_args()
    CALLS_PER_SESSION = max(1, args.calls_per_session)
    root = args.data_dir or Path(tempfile.mkdtemp(prefix="agentspace-bench-"))
    rng = random.Random(7)
    rows: list[tuple[str, str, list[float]]] = []
    try:
        if not (args.reports_only or args.postgres_only):
            await bench_usage(root, rng, rows)
            await bench_sessions(root, rng, rows)
        cli_error = None if args.postgres_only else await bench_reports(root, rows, rng)
        if args.postgres or args.postgres_only:
            await bench_postgres(rows, rng)
        print_table(rows)
        print(
            f"\nUsage segments hold {SEGMENT_SIZE:,} records (the store's default); a report reads the rollups of "
            "closed segments and scans the open one."
        )
        if cli_error:
            print(f"\n{cli_error}")
    finally:
        if args.data_dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
