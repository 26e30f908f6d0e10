"""Where the added time to first token goes: the least an aiohttp proxy adds, the gateway's own work, the SDK.

    python benchmarks/floor.py [--transport ws|http] [--rounds 9]     (about 20 seconds)

Runs three gateways side by side, each with its own zero-delay fake upstream (``benchmarks/bench.py``), and
alternates one-client chats between them, the order rotating each round so the machine's drift hits all three:

- ``minimal``: a bare aiohttp proxy written for this comparison (``--serve-minimal``, below): it takes the chat,
  makes the upstream request with aiohttp, decodes the answer with the gateway's SSE decoder and sends each text
  delta on. No sessions, storage, usage records,
  plugins or checks: about the least a Python aiohttp server can add on this machine.
- ``without-sdk``: ``agentspace serve`` with ``benchmarks/without_sdk.py`` (Anthropic calls as plain aiohttp
  requests), so everything the gateway does except the SDK.
- ``gateway``: ``agentspace serve`` as shipped.

It prints each one's added TTFT p50 (the median over rounds of the per-round p50 minus the direct upstream's)
and the differences: the gateway's own work is ``without-sdk - minimal``, the SDK's ``gateway - without-sdk``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import shutil
import statistics
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the sibling script)

from agentspace.providers.sse import sse_events  # noqa: E402  (the gateway's SSE decoder)

SIDES = ("minimal", "without-sdk", "gateway")
WARMUP_CHATS = 100
DIRECT_CHATS = 60
CHATS = 80
HTTP = web.AppKey("http", aiohttp.ClientSession)  # the minimal proxy's upstream client


# --- the minimal proxy ------------------------------------------------------------------------------------


async def _upstream_deltas(http: aiohttp.ClientSession, upstream: str) -> AsyncIterator[list[str]]:
    """The upstream answer's text deltas, as many at a time as each network read brings."""
    async with http.post(f"{upstream}/v1/messages", json=bench.DIRECT_BODY, headers=bench.DIRECT_HEADERS) as resp:
        async for events in sse_events(resp.content.iter_any()):
            texts = [
                event["delta"]["text"]
                for name, data in events
                if name == "content_block_delta" and (event := json.loads(data))
            ]
            if texts:
                yield texts


def serve_minimal(upstream: str) -> None:
    """The bare proxy: the benchmark's WebSocket frames and UI message stream chunks, nothing else."""

    async def websocket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            chat_id = json.loads(msg.data)["id"]
            async for texts in _upstream_deltas(request.app[HTTP], upstream):
                for text in texts:
                    await ws.send_str(json.dumps({"type": "chat.stream.delta", "id": chat_id, "delta": text}))
            await ws.send_str(json.dumps({"type": "chat.stream.end", "id": chat_id}))
        return ws

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        async for texts in _upstream_deltas(request.app[HTTP], upstream):
            await response.write(
                b"".join(
                    b"data: " + json.dumps({"type": "text-delta", "id": "t", "delta": text}).encode() + b"\n\n"
                    for text in texts
                )
            )
        await response.write_eof(b"data: [DONE]\n\n")
        return response

    async def client(app: web.Application) -> AsyncIterator[None]:
        app[HTTP] = aiohttp.ClientSession()
        yield
        await app[HTTP].close()

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/gateway", websocket)
        app.router.add_post("/api/chat", chat)
        app.cleanup_ctx.append(client)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(f"minimal proxy listening on http://127.0.0.1:{port}", flush=True)
        await asyncio.Event().wait()

    try:
        import uvloop  # the loop agentspace serve runs on where it is installed

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


# --- the comparison ----------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> int:
    from agentspace.gateway_token import load_or_create_token

    benches: dict[str, bench.Bench] = {}
    headers: dict[str, dict[str, str]] = {}
    added: dict[str, list[float]] = {name: [] for name in SIDES}
    try:
        for name in SIDES:
            b = bench.Bench(
                argparse.Namespace(requests=CHATS, soak=0, quick=True, json=False, profile=None),
                Path(tempfile.mkdtemp(prefix=f"agentspace-floor-{name}-")),
                cli=bench.gateway_cli(without_sdk=name == "without-sdk"),
            )
            benches[name] = b
            b.start_upstream()
            if name == "minimal":
                proc = b.spawn([sys.executable, str(Path(__file__).resolve()), "--serve-minimal", b.upstream])
                b.gateway = bench.read_url(proc, "minimal proxy listening", 30)
                headers[name] = {}
            else:
                await b.start_gateway()
                headers[name] = {"Authorization": f"Bearer {load_or_create_token(b.home)}"}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            chats: dict[str, Callable[[], Awaitable[bench.Sample]]] = {}
            for name, b in benches.items():
                for _ in range(WARMUP_CHATS):  # the SDK loaded, pools and caches warm
                    await bench.http_chat(http, b.gateway, headers[name])
                if args.transport == "ws":
                    ws = await http.ws_connect(f"{b.gateway}/gateway", headers=headers[name], max_msg_size=0)
                    chats[name] = bench.WsClient(ws).chat
                else:
                    chats[name] = functools.partial(bench.http_chat, http, b.gateway, headers[name])
            for round_ in range(args.rounds):
                for name in SIDES[round_ % 3 :] + SIDES[: round_ % 3]:
                    direct = [(await bench.direct_chat(http, benches[name].upstream)).ttft for _ in range(DIRECT_CHATS)]
                    via = [(await chats[name]()).ttft for _ in range(CHATS)]
                    added[name].append((statistics.median(via) - statistics.median(direct)) * 1000)
    except bench.ChatFailed as e:
        print(f"a chat failed: {e}", file=sys.stderr)
        return 1
    finally:
        for b in benches.values():
            b.stop()
            shutil.rmtree(b.root, ignore_errors=True)
    p50 = {name: statistics.median(values) for name, values in added.items()}
    for name in SIDES:
        print(
            f"{args.transport} {name:12} added TTFT p50 {p50[name]:.2f} ms "
            f"(rounds: {' '.join(f'{v:.2f}' for v in added[name])})"
        )
    print(
        f"an aiohttp proxy's least {p50['minimal']:.2f} ms, the gateway's own work "
        f"{p50['without-sdk'] - p50['minimal']:+.2f} ms, the SDK {p50['gateway'] - p50['without-sdk']:+.2f} ms"
    )
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=("ws", "http"), default="ws")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--serve-minimal", metavar="UPSTREAM", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_minimal:
        serve_minimal(args.serve_minimal)
        return
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
