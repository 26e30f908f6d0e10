"""Crash test: SIGKILL a real ``agentspace serve`` in the middle of the load of scripts/load_test.py, restart
it on the same data directory, and check that nothing whose write had completed is lost.

    python scripts/crash_test.py [--rounds 3] [--duration 6] [--concurrency 50] [--seed N] [--keep]

Each round runs the load until answers flow, then for a random part of ``--duration`` seconds, kills the
server, and restarts it
(the data-dir lock of the killed process must not stand in the way). Then, for every request whose
end (``chat.stream.end``, ``finish`` or an error after start) a client received before the kill, the
restarted server must serve its session with the assistant message and exactly one usage record;
no session may hold more than one of either. After the last round the server stops with SIGTERM,
every JSON file in the data directory parses whole (writes are atomic), and the CLI reads the stores. Exits 1 on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp
from harness import ROOT, GatewayProcess, child_env
from load_test import GATEWAY_SETTINGS
from loadgen import ChaosUpstream, Load, Request, stored_counts, summarize

from agentspace.storage.atomic import StoreCorrupt
from agentspace.storage.embedded.tinydb_file import read_tables


async def load_then_kill(server: GatewayProcess, concurrency: int, after: float) -> list[Request]:
    load = Load(server.url, server.token, concurrency)
    running = asyncio.create_task(load.run(after + 60))
    for _ in range(600):  # warm-up: the kill comes once answers flow (at most 30 s of polling)
        if any(r.terminal_frames for r in load.requests) or running.done():
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(after)  # the point of the crash is an arbitrary moment in the load
    await server.kill()
    load.stop.set()
    await running
    return load.requests


async def served(server: GatewayProcess, completed: list[Request]) -> list[str]:
    """Ask the restarted server about every completed request; count its usage records in the store (a call
    the upstream never answered is an error record, not a request, so the report's requestCount misses it)."""
    problems = []
    _, records = stored_counts(server.data_dir)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {server.token}"}) as http:
        for r in completed:
            async with http.get(f"{server.url}/api/sessions/{r.session_id}") as resp:
                if resp.status != 200:
                    problems.append(f"session {r.session_id} ({r.outcome}): HTTP {resp.status} after restart")
                    continue
                messages = (await resp.json())["session"]["messages"]
            if [m["role"] for m in messages] != ["user", "assistant"]:
                problems.append(f"session {r.session_id}: {[m['role'] for m in messages]} after restart")
            async with http.get(f"{server.url}/api/usage", params={"sessionId": r.session_id}) as resp:
                grand = (await resp.json())["grandTotal"]
            count = records.get(r.session_id, 0)
            if count != 1 or grand["requestCount"] + grand["errorCount"] < 1:
                problems.append(f"session {r.session_id}: {count} usage records after restart")
    return problems


def files_parse(data_dir: Path) -> list[str]:
    problems = []
    for path in data_dir.rglob("*.json"):
        try:
            read_tables(path)
        except StoreCorrupt as e:
            problems.append(f"{path.relative_to(data_dir)}: {e}")
    for command in (["usage", "--json"], ["sessions", "list"]):
        result = subprocess.run(
            [sys.executable, "-m", "agentspace", *command],
            env=child_env(data_dir),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            problems.append(f"agentspace {' '.join(command)}: exit {result.returncode}: {result.stderr.strip()[-300:]}")
    return problems


async def main(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="agentspace-crash-"))
    problems: list[str] = []
    rounds = []
    all_requests: list[Request] = []
    try:
        async with ChaosUpstream(args.seed) as upstream:
            server = GatewayProcess(work / "data", upstream.url, **GATEWAY_SETTINGS)
            try:
                await server.start()
                for _ in range(args.rounds):
                    after = rng.uniform(0.3, 1.0) * args.duration
                    requests = await load_then_kill(server, args.concurrency, after)
                    all_requests += requests
                    await server.start()  # the restart: the store must open
                    completed = [r for r in all_requests if r.started and r.terminal_frames == 1]
                    problems += await served(server, completed)
                    rounds.append(
                        {"killedAfter": round(after, 2), **summarize(requests, after), "completedSoFar": len(completed)}
                    )
                if await server.terminate() != 0:
                    problems.append("the restarted server did not exit 0 on SIGTERM")
            finally:
                await server.aclose()
        messages, records = stored_counts(server.data_dir)
        problems += [f"session {s}: {n} assistant messages" for s, n in messages.items() if n > 1]
        problems += [f"session {s}: {n} usage records" for s, n in records.items() if n > 1]
        problems += files_parse(server.data_dir)
        print(
            json.dumps(
                {
                    "rounds": rounds,
                    "upstreamFaults": upstream.served,
                    "storedSessions": len(messages),
                    "usageRecords": sum(records.values()),
                    "problems": problems[:20],
                    "problemCount": len(problems),
                },
                indent=2,
            )
        )
        return 0 if not problems and all_requests else 1
    finally:
        if args.keep or problems:
            print(f"data and server log kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="kill-and-restart rounds (default 3)")
    parser.add_argument("--duration", type=float, default=6.0, help="longest load before a kill, seconds (default 6)")
    parser.add_argument(
        "--concurrency", type=int, default=50, help="concurrent clients, half WS, half HTTP (default 50)"
    )
    parser.add_argument("--seed", type=int, help="seed for the kill times and the upstream's faults")
    parser.add_argument("--keep", action="store_true", help="keep the data directory and server logs")
    sys.exit(asyncio.run(main(parser.parse_args())))
