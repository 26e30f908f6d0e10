"""A fake Anthropic upstream that injects faults at random: for scripts/load_test.py and scripts/crash_test.py.

    python scripts/chaos_upstream.py [--port 0] [--seed N]

Prints ``chaos upstream at URL`` once listening; on SIGTERM or SIGINT prints how often each fault was served
(``faults: {...}`` as JSON) and exits. Every answer is the fake's real wire format (tests/fakes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fakes.anthropic_upstream import (
    FakeAnthropic,
    FakeResponse,
    error_event,
    error_status,
    malformed_response,
    text_response,
)

ANSWER = "The quick brown fox jumps over the lazy dog. " * 2

# name -> (weight, response). Stalls outlast the gateway's idle timeout set by the scripts (1 s).
FAULTS: dict[str, tuple[int, Callable[[], FakeResponse]]] = {
    "normal": (40, lambda: text_response(ANSWER, chunks=8)),
    "slow": (15, lambda: text_response(ANSWER, chunks=20).with_delay(0.02)),
    "429": (10, lambda: error_status(429, retry_after=0.1)),
    "529": (10, lambda: error_status(529)),
    "cut": (8, lambda: text_response(ANSWER, chunks=8).cut_after(6)),
    "error_event": (7, lambda: error_event("overloaded_error", "Overloaded", text="partial")),
    "stall": (5, lambda: text_response(ANSWER, chunks=8).stall(3.0, after=5)),
    "malformed": (5, malformed_response),
}


class ChaosAnthropic(FakeAnthropic):
    """Serves a random fault whenever the queue is empty (always, here)."""

    def __init__(self, seed: int | None) -> None:
        super().__init__(validate=False)
        self.rng = random.Random(seed)
        self.served: Counter[str] = Counter()
        self._names = list(FAULTS)
        self._weights = [FAULTS[n][0] for n in self._names]

    @property  # type: ignore[override]
    def default(self) -> FakeResponse:
        name = self.rng.choices(self._names, self._weights)[0]
        self.served[name] += 1
        return FAULTS[name][1]()

    @default.setter
    def default(self, value: FakeResponse) -> None:
        pass  # FakeAnthropic.__init__ sets one; ours is drawn per request


async def serve(port: int, seed: int | None) -> None:
    fake = await ChaosAnthropic(seed).start(port)
    print(f"chaos upstream at {fake.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await fake.close()
        print("faults: " + json.dumps(dict(fake.served)), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seed", type=int)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.seed))
