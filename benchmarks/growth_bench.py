"""How three costs of the embedded store grow with the size of the work: each measured at sizes 10x apart.

    python benchmarks/growth_bench.py [--runs N] [--skip-cli]

- a client's period report after one more record (what budget alerts run after every record of a client with
  a budget), with 100, 1,000 and 10,000 records in today's open segment: ``UsageStore.report_sync``, one record
  appended to the segment before each report, as the server's writer appends it;
- noting a client key's last use (``ClientStore.touch_sync``, on the store thread, once a minute per key) and
  the key lookup right after it (``get_by_hash_sync``, on the event loop), with 40, 400 and 4,000 clients in
  ``clients.json`` (4,000 is about the 1 MB the file may hold);
- ``agentspace clients list`` (click's runner, in process) with 10, 100 and 1,000 clients, each with three
  records on each of the last seven days (the month's part of them counts: the clients have monthly budgets),
  once the rollups exist.

Every size should cost about the same per operation, except the listing, which should grow with the clients
it lists and no faster. Seeding is setup, not measured; everything runs in temporary directories. Prints
milliseconds (the median of ``--runs``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agentspace.clients import Client, hash_key, new_key  # noqa: E402
from agentspace.storage.embedded.clients import ClientStore  # noqa: E402
from agentspace.storage.embedded.usage import UsageStore, write_log_segment  # noqa: E402

MODEL = "anthropic/claude-sonnet-4-6"


def record(n: int, client: str, timestamp: str) -> dict[str, Any]:
    return {
        "id": f"r{n}",
        "timestamp": timestamp,
        "model": MODEL,
        "client": client,
        "sessionId": f"s_{n % 97}",
        "endpoint": "/v1/messages",
        "inputTokens": 100,
        "outputTokens": 20,
        "totalCost": 0.003,
        "answered": True,
    }


def clients_file(data_dir: Path, count: int) -> list[str]:
    """``count`` clients with monthly budgets, written as the store writes them; their key hashes."""
    table, hashes = {}, []
    for n in range(count):
        client = Client(f"c{n}", hash_key(new_key()), "2026-01-01T00:00:00+00:00", budget_usd=100.0, period="month")
        table[client.name] = client.to_stored()
        hashes.append(client.key_hash)
    path = data_dir / "clients.json"
    path.write_text(json.dumps({"clients": table}))
    os.chmod(path, 0o600)
    return hashes


def open_segment_report(records: int, runs: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        now = datetime.now(UTC)
        day, stamp = now.strftime("%Y-%m-%d"), now.strftime("%Y-%m-%dT%H:%M:%S.000Z")
        write_log_segment(Path(tmp), day, 0, [record(n, f"c{n % 50}", stamp) for n in range(records)])
        store = UsageStore(Path(tmp))
        since = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        segment = Path(tmp) / "usage" / day / "00000.jsonl"
        times = []
        for n in range(runs):
            with open(segment, "ab") as f:  # one more record, as the writer appends it
                f.write(json.dumps(record(records + n, "c1", stamp)).encode() + b"\n")
            start = time.perf_counter()
            store.report_sync(since=since, client="c1")
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times)


def touch_and_lookup(clients: int, runs: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        hashes = clients_file(Path(tmp), clients)
        store = ClientStore(Path(tmp))
        store.list_sync()
        touches, lookups = [], []
        for n in range(runs):
            start = time.perf_counter()
            store.touch_sync(f"c{n}", datetime.now(UTC).isoformat())
            touches.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            assert store.get_by_hash_sync(hashes[n]) is not None
            lookups.append((time.perf_counter() - start) * 1000)
        return statistics.median(touches), statistics.median(lookups)


def clients_list(clients: int, runs: int) -> float:
    from click.testing import CliRunner

    from agentspace.cli import main as cli

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        clients_file(data, clients)
        now, n = datetime.now(UTC), 0
        for back in range(1, 8):
            day = now - timedelta(days=back)
            stamp = day.strftime("%Y-%m-%dT12:00:00.000Z")
            batch = [record(n + i, f"c{i % clients}", stamp) for i in range(3 * clients)]
            write_log_segment(data, day.strftime("%Y-%m-%d"), 0, batch)
            n += len(batch)
        times = []
        for run in range(runs + 1):  # the first run makes the rollups
            start = time.perf_counter()
            result = CliRunner().invoke(cli, ["--data-dir", str(data), "clients", "list", "--json"])
            if run:
                times.append((time.perf_counter() - start) * 1000)
            assert result.exit_code == 0, result.output
        return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--skip-cli", action="store_true", help="leave out clients list (the slowest part)")
    args = parser.parse_args()
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    for records in (100, 1_000, 10_000):
        print(
            f"report after one more record, {records:6,} in the open segment: {open_segment_report(records, args.runs):8.2f} ms"
        )
    for clients in (40, 400, 4_000):
        touch, lookup = touch_and_lookup(clients, args.runs)
        print(f"last use noted, {clients:5,} clients: {touch:8.2f} ms; the key lookup after it: {lookup:8.3f} ms")
    if not args.skip_cli:
        for clients in (10, 100, 1_000):
            runs = max(1, args.runs // 10)
            print(f"clients list, {clients:5,} clients with a week of records: {clients_list(clients, runs):8.1f} ms")


if __name__ == "__main__":
    main()
