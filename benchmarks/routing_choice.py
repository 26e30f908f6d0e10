"""What choosing a deployment costs, in this process (agentspace/routing.py, docs/routing.md).

    python benchmarks/routing_choice.py [--calls 20000]

Per strategy: the microseconds of one call's order + take + done on a group of two deployments, with the
in-process state (the minute's windows full of the calls just made, as under load).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import replace

from agentspace.config import parse_config
from agentspace.routing import STRATEGIES, Router

MODEL = "anthropic/claude-sonnet-4-5"


async def run(calls: int) -> None:
    deployments = [{"model": MODEL, "name": "a"}, {"model": MODEL, "name": "b"}]
    config = parse_config({"models": {"groups": {"g": {"deployments": deployments}}}})
    for strategy in STRATEGIES:
        group = replace(config.groups["g"], strategy=strategy)
        router = Router({"g": group})
        started = time.perf_counter()
        for _ in range(calls):
            order, _ = await router.order(group)
            await router.state.take(order[0].id, None)
            await router.state.done(order[0].id, 100, 1.0)
        per_call = (time.perf_counter() - started) / calls * 1e6
        print(f"{strategy:15} {per_call:6.1f} us per call (order + take + done)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    asyncio.run(run(parser.parse_args().calls))


if __name__ == "__main__":
    main()
