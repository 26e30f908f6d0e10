"""Session search on the embedded store: a phrase from turn 3 of one of 1,000 sessions.

    python benchmarks/search_bench.py [--sessions 1000] [--turns 10] [--runs 20]

Seeds SESSIONS sessions of TURNS turns (a ~600-byte question and a ~600-byte answer each) through the
SessionStore, with fsync switched off (setup, not measured), hides a unique phrase in turn 3 of one of them,
then times ``storage.search.search_sessions`` as the server runs it (``GET /api/sessions?q=``): the first
search of a process (every session read once), then warm searches (one listing and a substring scan), and a
search right after a new message in one session (that session is read again). Prints milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from agentspace.storage import SessionStore
from agentspace.storage.search import search_sessions

WORDS = "alpha beta gamma delta river stone cloud paper garden window lamp orbit".split()
PHRASE = "the violet heron counts backwards"


def prose(rng: random.Random, size: int) -> str:
    out, length = [], 0
    while length < size:
        out.append(rng.choice(WORDS))
        length += len(out[-1]) + 1
    return " ".join(out)


async def seed(store: SessionStore, sessions: int, turns: int, target: int) -> str:
    rng = random.Random(7)
    real = os.fsync
    os.fsync = lambda fd: None  # seeding is setup
    try:
        target_id = ""
        for n in range(sessions):
            messages = []
            for turn in range(1, turns + 1):
                question = prose(rng, 600)
                if n == target and turn == 3:
                    question = question[:300] + " " + PHRASE + " " + question[300:]
                messages.append({"role": "user", "content": question})
                messages.append({"role": "assistant", "content": prose(rng, 600)})
            summary = await store.create(model="anthropic/claude-sonnet-4-6", messages=messages)
            if n == target:
                target_id = summary["id"]
        return target_id
    finally:
        os.fsync = real


async def main(sessions: int, turns: int, runs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = SessionStore(Path(tmp))
        target = await seed(store, sessions, turns, sessions // 3)
        t = time.perf_counter()
        found = (await search_sessions(store, PHRASE.upper())).sessions
        cold = (time.perf_counter() - t) * 1000
        assert [s["id"] for s in found] == [target], found
        warm = []
        for _ in range(runs):
            t = time.perf_counter()
            found = (await search_sessions(store, PHRASE)).sessions
            warm.append((time.perf_counter() - t) * 1000)
            assert [s["id"] for s in found] == [target]
        await store.append_message(target, {"role": "user", "content": "one more message"})
        t = time.perf_counter()
        found = (await search_sessions(store, PHRASE)).sessions
        changed = (time.perf_counter() - t) * 1000
        assert [s["id"] for s in found] == [target]
        await store.aclose()
    print(f"{sessions} sessions x {turns} turns, phrase in turn 3 of one")
    print(f"first search (reads every session):  {cold:8.1f} ms")
    print(f"warm search, median of {runs}:          {statistics.median(warm):8.1f} ms (max {max(warm):.1f})")
    print(f"search after one session changed:    {changed:8.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(main(args.sessions, args.turns, args.runs))
