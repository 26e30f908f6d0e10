"""Storage backends side by side: usage append throughput and `usage --by-model` report time at
100k and 1M records, PostgreSQL vs tinydb; requests per second at 50 clients with 1, 2 and 4 replicas
(`agentspace serve --workers N` on PostgreSQL + Redis).

    python benchmarks/storage_bench.py [--sizes 100000,1000000] [--tinydb-max 100000] [--seconds 10]
                                       [--replicas 1,2,4] [--skip-rps] [--json]

PostgreSQL and Redis are started from the distribution's packages (as the tests do: tests/scale_servers.py),
on free ports, with fsync off for PostgreSQL (the numbers compare the code paths, not the disk). tinydb at
1M records takes minutes to seed and to report: it is bounded by ``--tinydb-max`` (100k by default), and
the table says so.

- append: ``UsageStore.append`` (the embedded store, labelled ``tinydb``: one JSON line appended per record,
  one caller at a time, so each waits for its own ``fdatasync``) and ``PostgresUsageStore.append`` (batched:
  1000 concurrent callers, each returning once its batch committed), records per second, measured over a
  fresh store after the seeding.
- report: ``report(by="model")`` over the seeded records, seconds, twice. The embedded store's first report
  summarises the closed segments the seeding wrote into per-day rollups (what a server's reports do once per
  closed segment); the next one reads the rollups. PostgreSQL keeps its rollups in the transaction of each
  insert, so both of its reports read them.
- rps: 50 clients chatting over HTTP (``POST /api/chat``) against a fake upstream with zero latency,
  completed chats per second, for each replica count.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agentspace.storage.embedded.usage import SEGMENT_SIZE, UsageStore, write_segment  # noqa: E402
from agentspace.storage.postgres import PostgresDatabase, PostgresUsageStore  # noqa: E402
from agentspace.types import Cost, TokenUsage, UsageRecord  # noqa: E402
from tests.scale_servers import free_port, postgres_server, redis_server  # noqa: E402

MODELS = ["anthropic/claude-sonnet-4-6", "anthropic/claude-haiku-4-5", "openai/gpt-4o", "openai/gpt-4o-mini"]
TOKEN = "storage-bench-token-0123456789abcdef"


def record(n: int, prefix: str = "u") -> UsageRecord:
    day = 1 + n % 28
    return UsageRecord(
        id=f"{prefix}{n}",
        timestamp=f"2026-11-{day:02d}T10:{n % 60:02d}:00.000Z",
        model=MODELS[n % len(MODELS)],
        provider="anthropic",
        session_id=f"s{n % 1000}",
        client=f"c{n % 7}",
        usage=TokenUsage(100 + n % 50, 20 + n % 10),
        cost=Cost(0.0003, 0.0004),
        latency_ms=100.0,
        finish_reason="stop",
    )


# --- usage: tinydb --------------------------------------------------------------------------------


async def tinydb_numbers(size: int, folder: Path, append_count: int) -> dict[str, float]:
    data_dir = folder / f"tinydb-{size}"
    started = time.perf_counter()
    per_day: dict[str, list[dict[str, Any]]] = {}
    for n in range(size):
        rec = record(n).to_dict()
        per_day.setdefault(rec["timestamp"][:10], []).append(rec)
    for day, records in per_day.items():
        for number, start in enumerate(range(0, len(records), SEGMENT_SIZE)):
            write_segment(data_dir, day, number, records[start : start + SEGMENT_SIZE])
    seed_s = time.perf_counter() - started
    del per_day  # a million records kept alive would make the reports below pay for the collector's passes
    gc.collect()

    store = UsageStore(data_dir)
    started = time.perf_counter()
    report = await store.report(by="model")
    report_s = time.perf_counter() - started
    assert report["grandTotal"]["requestCount"] == size
    started = time.perf_counter()
    await store.report(by="model")
    again_s = time.perf_counter() - started

    started = time.perf_counter()
    for n in range(append_count):
        await store.append(record(n, "new"))
    append_rate = append_count / (time.perf_counter() - started)
    await store.aclose()
    shutil.rmtree(data_dir, ignore_errors=True)
    return {"seed_s": seed_s, "report_s": report_s, "report_again_s": again_s, "append_per_s": append_rate}


# --- usage: postgres -----------------------------------------------------------------------------


async def postgres_numbers(size: int, dsn: str, append_count: int) -> dict[str, float]:
    db = PostgresDatabase(dsn, pool_size=10)
    await db.start()
    store = PostgresUsageStore(db)
    started = time.perf_counter()
    batch = 10_000
    for start in range(0, size, batch):
        await store.copy_in([record(n).to_dict() for n in range(start, min(size, start + batch))])
    async with db.connection() as conn:
        await conn.execute("ANALYZE usage_records")
    seed_s = time.perf_counter() - started

    started = time.perf_counter()
    report = await store.report(by="model")
    report_s = time.perf_counter() - started
    assert report["grandTotal"]["requestCount"] == size, report["grandTotal"]
    started = time.perf_counter()
    await store.report(by="model")
    again_s = time.perf_counter() - started

    started = time.perf_counter()
    for start in range(0, append_count, 1000):  # 1000 callers at a time, as many turns ending together
        await asyncio.gather(*(store.append(record(n, "new")) for n in range(start, min(append_count, start + 1000))))
    append_rate = append_count / (time.perf_counter() - started)
    await store.aclose()
    await db.aclose()
    return {"seed_s": seed_s, "report_s": report_s, "report_again_s": again_s, "append_per_s": append_rate}


async def create_database(server: Any, name: str) -> str:
    subprocess.run(
        [str(server.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(server.port), "-U", "postgres", name],
        check=True,
        capture_output=True,
    )
    return f"postgresql://postgres@127.0.0.1:{server.port}/{name}"


# --- requests per second ---------------------------------------------------------------------------


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env.update(
        AGENTSPACE_HOME=str(home),
        AGENTSPACE_LOAD_PLUGINS="",
        AGENTSPACE_GATEWAY_TOKEN=TOKEN,
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        ANTHROPIC_API_KEY="sk-ant-bench-0123456789abcdef",
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


async def rps(replicas: int, dsn: str | None, redis_url: str, folder: Path, seconds: float, clients: int = 50) -> float:
    """Chats per second; ``dsn`` None: the tinydb backend in one process (the reference)."""
    import aiohttp

    home = folder / f"rps-{replicas}-{'postgres' if dsn else 'tinydb'}"
    home.mkdir(parents=True, exist_ok=True)
    upstream_port, port = free_port(), free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.anthropic_upstream", str(upstream_port)], cwd=ROOT, env=_env(home)
    )
    config = home / "config.toml"
    storage = f'backend = "postgres"\ndsn = "{dsn}"\nredis_url = "{redis_url}"\n' if dsn else ""
    config.write_text(
        f'[storage]\n{storage}data_dir = "{home}"\n'
        '[models]\ndefault = "anthropic/claude-sonnet-4-6"\n[thinking]\nenabled = false\n'
        '[logging]\nlevel = "warning"\n[server]\nmessages_per_minute = 1000000\n'
        f'[providers.anthropic]\nbase_url = "http://127.0.0.1:{upstream_port}"\n'
    )
    args = ["serve", "--config", str(config), "--port", str(port)]
    if replicas > 1:
        args += ["--workers", str(replicas)]
    gateway = subprocess.Popen(
        [sys.executable, "-m", "agentspace", *args], cwd=ROOT, env=_env(home), stdout=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        async with aiohttp.ClientSession(headers=headers) as http:
            for _ in range(300):
                try:
                    async with http.get(url + "/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0 * replicas)  # every worker up
            done = 0
            stop_at = 0.0

            async def client(c: int) -> None:
                nonlocal done
                n = 0
                while time.perf_counter() < stop_at:
                    body = {"id": f"r{replicas}-{c}-{n}", "messages": [
                        {"id": "u", "role": "user", "parts": [{"type": "text", "text": "hi"}]}]}  # fmt: skip
                    async with http.post(url + "/api/chat", json=body) as resp:
                        data = await resp.read()
                        if resp.status == 200 and b'"type":"finish"' in data:
                            done += 1
                    n += 1

            stop_at = time.perf_counter() + 2  # warm-up
            await asyncio.gather(*(client(c) for c in range(clients)))
            done = 0
            started = time.perf_counter()
            stop_at = started + seconds
            await asyncio.gather(*(client(c) for c in range(clients)))
            return done / (time.perf_counter() - started)
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(60)
        upstream.terminate()
        upstream.wait(10)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--tinydb-max", type=int, default=100_000)
    parser.add_argument("--appends", type=int, default=2000, help="records appended for the throughput")
    parser.add_argument("--replicas", default="1,2,4")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--skip-rps", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    folder = Path(tempfile.mkdtemp(prefix="agentspace-storage-bench-"))
    results: dict[str, Any] = {"usage": [], "rps": []}
    try:
        with postgres_server() as pg, redis_server() as redis:
            for size in sizes:
                dsn = await create_database(pg, f"bench{size}")
                row: dict[str, Any] = {"records": size, "postgres": await postgres_numbers(size, dsn, args.appends)}
                if size <= args.tinydb_max:
                    row["tinydb"] = await tinydb_numbers(size, folder, min(args.appends, 500))
                results["usage"].append(row)
                if not args.json:
                    print(json.dumps(row), flush=True)
            if not args.skip_rps:
                rate = await rps(1, None, redis.url, folder, args.seconds)
                results["rps"].append({"replicas": 1, "backend": "tinydb", "clients": 50, "chats_per_s": rate})
                if not args.json:
                    print(json.dumps(results["rps"][-1]), flush=True)
                for replicas in [int(r) for r in args.replicas.split(",")]:
                    dsn = await create_database(pg, f"rps{replicas}")
                    rate = await rps(replicas, dsn, redis.url, folder, args.seconds)
                    results["rps"].append(
                        {"replicas": replicas, "backend": "postgres + redis", "clients": 50, "chats_per_s": rate}
                    )
                    if not args.json:
                        print(json.dumps(results["rps"][-1]), flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print("\n| records | backend | append records/s | first report by model | next report |")
    print("|---|---|---|---|---|")
    for row in results["usage"]:
        for backend in ("postgres", "tinydb"):
            if backend in row:
                r = row[backend]
                print(
                    f"| {row['records']:,} | {backend} | {r['append_per_s']:,.0f} | {r['report_s'] * 1000:,.0f} ms "
                    f"| {r['report_again_s'] * 1000:,.1f} ms |"
                )
            else:
                print(f"| {row['records']:,} | {backend} | (not run: over --tinydb-max) | | |")
    if results["rps"]:
        print("\n| backend | replicas | clients | chats/s |\n|---|---|---|---|")
        for r in results["rps"]:
            print(f"| {r['backend']} | {r['replicas']} | {r['clients']} | {r['chats_per_s']:,.0f} |")


if __name__ == "__main__":
    asyncio.run(main())
