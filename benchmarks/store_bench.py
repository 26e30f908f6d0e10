"""Store write latency at growing sizes, listing 10k sessions, and cold `agentspace usage --by-model` at 100k records.

    python benchmarks/store_bench.py [--data-dir DIR]

What it shows: a UsageStore.append costs the same at 1k, 10k and 100k stored records (it writes the one
current segment, at most ``SEGMENT_SIZE`` records); a SessionStore.append_message the same however many
sessions are stored, and more in a long session (the session's file is written whole); and what listing
10k sessions and a cold usage report over 100k records cost without summary copies or totals caches.
Every measured write is fsynced. Seeding is setup, not measured: usage history is written as whole
segments (``write_segment``), sessions go through the store with fsync switched off.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from agentspace.stores import SessionStore, UsageStore, usage_report
from agentspace.stores.usage import SEGMENT_SIZE, write_segment
from agentspace.types import Cost, TokenUsage, UsageRecord, new_id, now_iso

USAGE_LEVELS = (1_000, 10_000, 100_000)
APPENDS = 500  # per level: fills a fresh segment from 0 to 500 records, the same work at every level
BATCH = 25
SESSIONS = 10_000
SESSION_APPENDS = 300
LONG_SESSION = 2_000  # messages in the long session: a write must not grow with them
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
    real = os.fsync
    os.fsync = lambda fd: None
    try:
        yield
    finally:
        os.fsync = real


def seed_usage(data_dir: Path, total: int, rng: random.Random) -> None:
    """``total`` records in full segments of today's folder: the writer's first append must look at them."""
    day = time.strftime("%Y-%m-%d", time.gmtime())
    for number in range(total // SEGMENT_SIZE):
        write_segment(data_dir, day, number, [usage_record(rng).to_dict() for _ in range(SEGMENT_SIZE)])


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
    long_size = (data_dir / "sessions" / "long.json").stat().st_size
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
    await store.aclose()
    cold = SessionStore(data_dir)
    start = time.perf_counter()
    count = len(cold.summaries_sync())
    assert count == SESSIONS + 1
    rows.append(("SessionStore.summaries_sync, cold", f"{SESSIONS:,} sessions", [(time.perf_counter() - start) * 1000]))


def bench_reports(usage_dir: Path, rows: list[tuple[str, str, list[float]]]) -> str | None:
    """In-process read + report, then the real CLI in a new process. Returns the CLI error, if any."""
    existing = f"{USAGE_LEVELS[-1] + APPENDS:,} records"
    start = time.perf_counter()
    usage_report(UsageStore(usage_dir).records())
    rows.append(("usage_report(UsageStore.records())", existing, [(time.perf_counter() - start) * 1000]))

    env = {**os.environ, "AGENTSPACE_HOME": str(usage_dir), "AGENTSPACE_LOAD_PLUGINS": ""}
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "agentspace", "usage", "--by-model"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        return "`agentspace usage --by-model` did not finish within 120 s"
    elapsed = (time.perf_counter() - start) * 1000
    if done.returncode != 0:
        return f"`agentspace usage --by-model` failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()[-600:]}"
    rows.append(("agentspace usage --by-model, cold process", existing, [elapsed]))
    return None


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="keep the generated data here (default: a temp folder, removed)")
    args = parser.parse_args()
    root = args.data_dir or Path(tempfile.mkdtemp(prefix="agentspace-bench-"))
    rng = random.Random(7)
    rows: list[tuple[str, str, list[float]]] = []
    try:
        usage_dir = await bench_usage(root, rng, rows)
        await bench_sessions(root, rng, rows)
        cli_error = bench_reports(usage_dir, rows)
        print_table(rows)
        print(
            f"\nUsage segments hold {SEGMENT_SIZE} records (the store's default); each level's {APPENDS} appends "
            "start a new segment, so the figures cover every fill level of a segment."
        )
        if cli_error:
            print(f"\n{cli_error}")
    finally:
        if args.data_dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
