"""Load test: concurrent chats over WebSocket and HTTP against a real ``agentspace serve``, with an upstream
(its own process) that injects faults at random: 429, 529, cut streams, error events, stalls, malformed data.

    python scripts/load_test.py [--duration 20] [--concurrency 50] [--seed N] [--keep]

Passes when every request that reached ``start`` got exactly one terminal frame (end or error) and is stored
with exactly one assistant message and one usage record, no request wedged, the server exits 0 on SIGTERM,
and its log shows no unhandled exception. Prints a JSON summary; exits 1 on failure. Loopback only; bounded
in time (duration + the in-flight requests' own bound).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from harness import GatewayProcess
from loadgen import ChaosUpstream, Load, Request, stored_counts, summarize

# The gateway's settings for the run: short idle timeout (the upstream stalls), quick retries.
GATEWAY_SETTINGS = {
    "chat": {"idle_timeout_seconds": 1.0, "max_retries": 1},
    "server": {"shutdown_grace_seconds": 5.0, "messages_per_minute": 100_000},
}


def check(requests: list[Request], messages: dict[str, int], records: dict[str, int]) -> list[str]:
    """What went wrong, request by request (empty when all is well)."""
    problems = []
    for r in requests:
        if r.client_error is not None:
            problems.append(f"{r.transport} request {r.session_id}: {r.client_error}")
        elif not r.started:
            problems.append(f"{r.transport} request refused before start: {r.outcome}")
        elif r.terminal_frames != 1:
            problems.append(f"{r.transport} session {r.session_id}: {r.terminal_frames} terminal frames")
        if r.started and r.session_id is not None:
            if messages.get(r.session_id) != 1:
                problems.append(f"session {r.session_id}: {messages.get(r.session_id, 0)} assistant messages stored")
            if records.get(r.session_id) != 1:
                problems.append(f"session {r.session_id}: {records.get(r.session_id, 0)} usage records")
    started = {r.session_id for r in requests if r.started}
    problems += [f"session {s} stored but never started by a client" for s in set(messages) - started]
    return problems


async def main(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="agentspace-load-"))
    ok = False
    try:
        async with ChaosUpstream(args.seed) as upstream:
            server = GatewayProcess(work / "data", upstream.url, **GATEWAY_SETTINGS)
            try:
                await server.start()
                load = Load(server.url, server.token, args.concurrency)
                began = time.monotonic()
                await load.run(args.duration)
                seconds = time.monotonic() - began
                exit_code = await server.terminate()
            finally:
                await server.aclose()
        messages, records = stored_counts(server.data_dir)
        problems = check(load.requests, messages, records)
        if exit_code != 0:
            problems.append(f"the server exited with {exit_code} on SIGTERM")
        problems += [f"server log: {line}" for line in server.log_problems()]
        summary = {
            **summarize(load.requests, seconds),
            "seconds": round(seconds, 1),
            "concurrency": args.concurrency,
            "upstreamFaults": upstream.served,
            "storedSessions": len(messages),
            "usageRecords": sum(records.values()),
            "problems": problems[:20],
            "problemCount": len(problems),
        }
        print(json.dumps(summary, indent=2))
        ok = not problems and bool(load.requests)
        return 0 if ok else 1
    finally:
        if args.keep or not ok:
            print(f"data and server log kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load (default 20)")
    parser.add_argument(
        "--concurrency", type=int, default=50, help="concurrent clients, half WS, half HTTP (default 50)"
    )
    parser.add_argument("--seed", type=int, help="seed for the upstream's faults")
    parser.add_argument("--keep", action="store_true", help="keep the data directory and server log")
    sys.exit(asyncio.run(main(parser.parse_args())))
