"""Compare two source trees of the gateway with their chats interleaved, so that the machine's drift hits both.

    python benchmarks/ab.py TREE_A TREE_B [--transport ws|http|messages|completions] [--rounds 24] [--chats 60]

On a shared virtual machine the same build measures up to 60% apart from one minute to the next, more than
most single changes are worth. This runs both trees' gateways (each with its own fake upstream, from
``benchmarks/bench.py``) at once, idle in turn: every round runs ``--chats`` one-client chats against A and
then B (B then A in odd rounds), each after a direct-upstream baseline. It prints, per tree, the medians over
rounds of the added TTFT p50 and of the CPU-ms per chat (loop and store threads), and the median of the
per-round differences B - A with how many rounds B won. The side whose processes start second has measured
faster, whichever tree it ran (up to 0.3 ms of added TTFT and 0.7 CPU-ms in the store thread): half the rounds
run with A's processes started first, then both are restarted the other way round.
Make TREE_A with ``git worktree add /tmp/base <commit>``. ``python benchmarks/ab.py . . --b-without-sdk`` runs
B's Anthropic calls as plain aiohttp requests instead of through the SDK (``benchmarks/without_sdk.py``): the
difference is what the SDK costs per call. ``python benchmarks/ab.py . . --b-plugins metrics`` loads the
metrics plugin in B's gateway only (``AGENTSPACE_LOAD_PLUGINS``; A loads none): the difference is what it adds.
``python benchmarks/ab.py . . --b-routed`` has B's chats ask for a model group of two deployments of the same
model (``[models.groups]``, docs/routing.md): the difference is what routing adds to a call.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the sibling script)

WARMUP_CHATS = 150


def _v1_messages(
    http: aiohttp.ClientSession, gateway: str, headers: dict[str, str]
) -> Callable[[], Awaitable[bench.Sample]]:
    import vs_litellm

    headers = {**headers, "anthropic-version": "2023-06-01"}
    return lambda: vs_litellm.messages_chat(http, f"{gateway}/v1/messages", headers, vs_litellm.PROXY_MODEL)


def _v1_completions(
    http: aiohttp.ClientSession, gateway: str, headers: dict[str, str]
) -> Callable[[], Awaitable[bench.Sample]]:
    import vs_litellm

    return lambda: vs_litellm.completions_chat(http, f"{gateway}/v1/chat/completions", headers, bench.MODEL)


# The drop-in endpoints (``--transport messages|completions``): one streamed call each, as vs_litellm.py makes it.
V1 = {"messages": _v1_messages, "completions": _v1_completions}


async def side_client(
    http: aiohttp.ClientSession, b: bench.Bench, transport: str, warm_up: bool = True
) -> Callable[[], Awaitable[bench.Sample]]:
    from agentspace.gateway_token import load_or_create_token

    headers = {"Authorization": f"Bearer {load_or_create_token(b.home)}"}
    for _ in range(WARMUP_CHATS if warm_up else 0):  # the SDK loaded, the pools and caches warm
        await bench.http_chat(http, b.gateway, headers)
    if transport == "http":
        return lambda: bench.http_chat(http, b.gateway, headers)
    if transport in V1:
        return V1[transport](http, b.gateway, headers)
    ws = await http.ws_connect(f"{b.gateway}/gateway", headers=headers, max_msg_size=0)
    return bench.WsClient(ws).chat


async def run(args: argparse.Namespace) -> int:
    results: dict[str, dict[str, list[float]]] = {
        name: {"ttft": [], "cpu": [], "loop": [], "store": [], "rate": []} for name in "AB"
    }
    trees = {"A": args.tree_a, "B": args.tree_b}
    # Half the rounds with A's processes started first, half with B's: the side started second has measured
    # faster (up to 0.3 ms of added TTFT and 0.7 CPU-ms), whichever tree it ran.
    for first, half in (("A", (args.rounds + 1) // 2), ("B", args.rounds // 2)):
        order = (first, "B" if first == "A" else "A")
        if half and await run_half(args, {name: trees[name] for name in order}, half, results):
            return 1
    for name, tree in (("A", args.tree_a), ("B", args.tree_b)):
        r = results[name]
        if name == "B" and args.b_without_sdk:
            tree += " (without the SDK)"
        plugins = args.a_plugins if name == "A" else args.b_plugins
        if plugins:
            tree += f" (plugins: {plugins})"
        print(
            f"{name} {tree}: added TTFT p50 {statistics.median(r['ttft']):.2f} ms, CPU {statistics.median(r['cpu']):.2f}"
            f" ms per chat (loop {statistics.median(r['loop']):.2f}, store {statistics.median(r['store']):.2f}),"
            f" {statistics.median(r['rate']):.1f} chats/s with {args.clients} client(s)"
        )
    for key, label in (("ttft", "added TTFT"), ("cpu", "CPU per chat"), ("rate", "chats/s")):
        diffs = [b_ - a_ for a_, b_ in zip(results["A"][key], results["B"][key])]
        unit = "" if key == "rate" else " ms"
        print(
            f"B - A, {label}: {statistics.median(diffs):+.2f}{unit} "
            f"(B lower in {sum(d < 0 for d in diffs)} of {len(diffs)} rounds)"
        )
    return 0


async def run_half(
    args: argparse.Namespace, trees: dict[str, str], rounds: int, results: dict[str, dict[str, list[float]]]
) -> int:
    """Start both sides' processes in the order of ``trees``, then run ``rounds`` rounds; 1 on failed chats."""
    sides: dict[str, tuple[bench.Bench, Path]] = {}
    try:
        for name, tree in trees.items():
            scratch = Path(tempfile.mkdtemp(prefix=f"agentspace-ab-{name}-"))
            cli = bench.gateway_cli(without_sdk=name == "B" and args.b_without_sdk)
            b = bench.Bench(
                argparse.Namespace(
                    requests=args.chats,
                    soak=0,
                    quick=True,
                    json=False,
                    profile=None,
                    plugins=args.a_plugins if name == "A" else args.b_plugins,
                    routed=name == "B" and args.b_routed,
                ),
                scratch,
                code=Path(tree).resolve(),
                cli=cli,
            )
            sides[name] = (b, scratch)
            b.start_upstream()
            await b.start_gateway()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            clients = {
                name: [await side_client(http, b, args.transport, n == 0) for n in range(args.clients)]
                for name, (b, _) in sides.items()
            }
            for round_ in range(rounds):
                for name in ("A", "B") if round_ % 2 == 0 else ("B", "A"):
                    b = sides[name][0]
                    direct = await bench.run_phase([lambda: bench.direct_chat(http, b.upstream)], 60, 10)
                    await b.measure(args.transport, args.clients, direct, clients[name])
                    phase = b.results["phases"][-1]
                    if phase["errors"]:
                        print(f"{name}: {phase['errors']} failed chats, first: {phase['firstError']}", file=sys.stderr)
                        return 1
                    by_thread = phase["cpuMsPerChatByThread"]
                    r = results[name]
                    r["ttft"].append(phase["addedTtftMs"]["p50"])
                    r["cpu"].append(phase["cpuMsPerChat"])
                    r["loop"].append(by_thread["loopUser"] + by_thread["loopSystem"])
                    r["store"].append(by_thread["otherUser"] + by_thread["otherSystem"])
                    r["rate"].append(phase["requestsPerSecond"])
    finally:
        for b, scratch in sides.values():
            b.stop()
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tree_a", help="a source tree (a checkout of the repository)")
    parser.add_argument("tree_b", help="the other source tree")
    parser.add_argument("--transport", choices=("ws", "http", *V1), default="ws")
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--chats", type=int, default=60, help="chats per tree per round")
    parser.add_argument("--clients", type=int, default=1, help="clients per tree at a time (chats/s at N clients)")
    parser.add_argument(
        "--b-without-sdk",
        action="store_true",
        help="B's Anthropic calls without the SDK (benchmarks/without_sdk.py): what the SDK costs",
    )
    parser.add_argument(
        "--b-routed", action="store_true", help="B's chats ask for a model group (routing): what routing adds"
    )
    parser.add_argument("--a-plugins", default="", help="AGENTSPACE_LOAD_PLUGINS of A's gateway (default: none)")
    parser.add_argument(
        "--b-plugins", default="", help="AGENTSPACE_LOAD_PLUGINS of B's gateway, e.g. metrics: what the plugin costs"
    )
    sys.exit(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
