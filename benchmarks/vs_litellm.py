"""agentspace side by side with LiteLLM Proxy: the same streamed chats, the same fake upstream, one run.

    python benchmarks/vs_litellm.py [--quick] [--json] [--concurrency N] [--rounds N] [--chats N]
                                    [--litellm-venv DIR] [--litellm-spec SPEC] [--throughput CLIENTS]
                                    [--long-session [--turn-bytes N]] [--profile FILE]

The performance goals are ratios measured here: agentspace's added time to first token at least 5x lower,
and its CPU per chat at least 4x lower, than LiteLLM Proxy's, for each of agentspace's ways in. Run it on a
quiet machine: on a busy one the milliseconds are noise (the ratios less so). ``--quick`` takes about 30 s,
half of it LiteLLM Proxy's start; the default run about 2 minutes (after the one-time install).

What runs, all on 127.0.0.1 free ports, every process stopped by its PID at the end:

- the repo's fake Anthropic upstream (``tests/fakes/anthropic_upstream.py``: Messages SSE, 50 text deltas
  of ``"tok "``, no delay), started as ``benchmarks/bench.py`` starts it;
- one ``agentspace serve`` from this source tree pointed at it (persistence and usage records on, the
  defaults, so every chat also makes fsynced writes that LiteLLM without a database does not; config as
  bench.py writes it);
- LiteLLM Proxy, installed from PyPI (``pip install 'litellm[proxy]'``) into its own virtual environment
  (``--litellm-venv``, default ``.bench/litellm-venv`` in the repo, reused when present; never the project's
  venv), with a generated ``config.yaml``: one model ``anthropic/claude-sonnet-4-5`` whose ``api_base`` is
  the fake, a master key, no database, one worker, ``LITELLM_LOCAL_MODEL_COST_MAP=True``, telemetry off,
  logging at ERROR, keep-alive raised so that no side pays for reconnecting between rounds.

The sides (a side = one way to send a streamed chat and see its first token and its end):

- ``direct``: the fake upstream's ``/v1/messages`` straight from the client, the baseline;
- ``litellm /v1/chat/completions``: LiteLLM Proxy's OpenAI endpoint, streamed (its main path);
- ``litellm /v1/messages``: LiteLLM Proxy's Anthropic Messages endpoint, streamed;
- ``agentspace ws``: agentspace's WebSocket ``chat.send`` (one socket per client, a new session per chat);
- ``agentspace /api/chat``: agentspace's ``POST /api/chat`` (UI message stream, a new session per chat);
- ``agentspace /v1/messages``, ``agentspace /v1/chat/completions`` and ``agentspace /v1/responses``: the drop-in
  endpoints (docs/protocol.md), measured when the gateway serves them (a 404 on the first chat marks them "not served"
  and they are left out);
- ``litellm /v1/responses``: LiteLLM Proxy's OpenAI Responses endpoint, streamed, stateless as Codex sends it.

Each agentspace side is compared with one LiteLLM side: ws, ``/api/chat`` and ``/v1/chat/completions`` with
LiteLLM's ``/v1/chat/completions``, ``/v1/messages`` with LiteLLM's ``/v1/messages``, ``/v1/responses`` with
LiteLLM's ``/v1/responses``.

How it measures: after warm-up chats on every side (the first one timed apart: it loads the provider SDKs),
``--rounds`` rounds each run ``--chats`` chats on every side in turn, ``--concurrency`` clients at a time
(each one chat after the other); the order of the sides rotates every round, so the machine's drift spreads
over all of them. Every chat's streamed text is checked: the whole answer (the text of all 50 deltas) and the
stream's end (``message_stop``, ``[DONE]``, ``chat.stream.end``, ``response.completed``); a chat that is not complete counts as failed,
never as fast.

The numbers, per side, pooled over the rounds:

- ``+TTFT p50`` / ``p95``: time to first token (request sent to first text delta received) minus the direct
  side's at the same percentile, in ms: what the proxy adds.
- ``CPU-ms/chat``: user + system CPU of the server's process and its children (from ``/proc``: utime and stime
  of every process in the tree, plus the reaped children's), measured from idle to idle around each batch of
  chats, divided by the chats. The direct side has none (``-``).
- ``deltas/chat``: text deltas received per chat (the fake sends 50; a proxy may merge them).
- ``first chat``: the first warm-up chat's whole time, in ms (lazy imports, connection pools: the first side of
  each server pays them, the sides are warmed up in the order above).
- ``ratio``: LiteLLM's figure divided by agentspace's, for +TTFT p50, +TTFT p95 and CPU-ms/chat; the goals are
  judged on +TTFT p50 (>= 5x) and CPU-ms/chat (>= 4x), and fail when either side had a failed chat. A ratio
  reads ``-`` and its goal ``?`` when agentspace's figure is 0 or below (noise: rerun it).

``--throughput CLIENTS`` measures chats per second with CLIENTS clients per side at a time (50 for the goal:
agentspace's WebSocket at least 6x LiteLLM Proxy's chats per second), on the direct, LiteLLM
``/v1/chat/completions``, agentspace ws and ``/api/chat`` sides only; ``chats/s`` is each side's chats divided
by the wall time of its batches (every run prints it; the ratio is agentspace's over LiteLLM's).

``--long-session`` runs the long-session case instead: one WebSocket session growing in ``--turn-bytes`` user
turns (default ``LONG_TURN_BYTES``, 25 KB: few large messages; 1000 gives the shape of an agent's session, ~4,000
short messages at 2 MB) to ``LONG_SESSION_BYTES`` (2 MB), the gateway sending the whole history each turn
(``[chat] history_limit`` raised), while LiteLLM Proxy's ``/v1/chat/completions`` and the direct call are given
the same messages in each request. Per size band (the first 10 turns, around 1 MB, the last 10 turns, at
2 MB) it prints each side's TTFT p50 minus the direct call's at the same turn, and the ratio: what the session's
size costs each proxy (agentspace reads and stores the session; LiteLLM parses and forwards the context).

Exit status 1 when any chat failed. ``--json`` prints every figure as JSON instead of the tables (with the
LiteLLM version and this tree's commit, to quote beside the figures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the sibling script: processes, the agentspace clients, percentiles)

Chat = Callable[[], Awaitable[bench.Sample]]

MASTER_KEY = "sk-bench-master"
PROXY_MODEL = bench.MODEL.split("/", 1)[1]  # the model name LiteLLM's config gives it, and the direct call's
TTFT_GOAL = 5.0
CPU_GOAL = 4.0
LITELLM_START_SECONDS = 180.0
INSTALL_SECONDS = 1800.0
IDLE_QUIET = 0.2
IDLE_LIMIT = 5.0


# --- LiteLLM Proxy ------------------------------------------------------------------------------


def ensure_litellm(venv: Path, spec: str) -> str:
    """LiteLLM Proxy in its own venv (created and installed once, reused after); returns its version."""
    python = venv / "bin" / "python"
    if not (venv / "bin" / "litellm").exists():
        print(f"installing {spec} into {venv} (once; a few minutes)", file=sys.stderr)
        venv.parent.mkdir(parents=True, exist_ok=True)
        log = venv.parent / f"{venv.name}-install.log"
        with open(log, "w") as out:
            steps = (
                [sys.executable, "-m", "venv", str(venv)],
                [str(python), "-m", "pip", "install", "--disable-pip-version-check", spec],
            )
            for argv in steps:
                step = subprocess.run(argv, check=False, stdout=out, stderr=subprocess.STDOUT, timeout=INSTALL_SECONDS)
                if step.returncode != 0:
                    raise RuntimeError(f"{' '.join(argv)} failed; see {log}")
    done = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise RuntimeError(f"no litellm in {venv}: {done.stderr[-500:]} (delete the folder to reinstall)")
    return done.stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def litellm_config(upstream: str) -> str:
    """The proxy's config.yaml (JSON strings are YAML strings): one Anthropic model at the fake, a master key."""
    q = json.dumps
    return (
        f"model_list:\n  - model_name: {q(PROXY_MODEL)}\n    litellm_params:\n      model: {q(bench.MODEL)}\n"
        f"      api_base: {q(upstream)}\n      api_key: {q('sk-bench')}\n"
        f"general_settings:\n  master_key: {q(MASTER_KEY)}\n"
        f"litellm_settings:\n  set_verbose: false\n"
    )


def start_litellm(b: bench.Bench, venv: Path) -> tuple[str, int]:
    """LiteLLM Proxy pointed at the fake upstream; its URL and PID once ``/health/liveliness`` answers."""
    config = b.root / "litellm.yaml"
    config.write_text(litellm_config(b.upstream))
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV", "DATABASE_URL")
        and not k.startswith(("LITELLM_", "ANTHROPIC_", "OPENAI_"))
    }
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_TELEMETRY_DISABLED="true", LITELLM_LOG="ERROR")
    log_path = b.root / "litellm.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                str(venv / "bin" / "litellm"),
                "--config",
                str(config),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--num_workers",
                "1",
                "--keepalive_timeout",
                "600",
            ],
            cwd=b.root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    b.procs.append(proc)  # stopped with the others by Bench.stop
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + LITELLM_START_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"LiteLLM Proxy exited (code {proc.returncode}):\n{log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health/liveliness", timeout=5) as resp:
                if resp.status == 200:
                    return url, proc.pid
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(
        f"LiteLLM Proxy did not answer within {LITELLM_START_SECONDS:.0f} s:\n{log_path.read_text()[-2000:]}"
    )


# --- CPU of a process tree ----------------------------------------------------------------------


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()  # fields from the 3rd (state) on: ppid is [1]


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU of a process, its live descendants and the children it has reaped."""
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                parents.setdefault(int(_stat(int(name))[1]), []).append(int(name))
            except (FileNotFoundError, ProcessLookupError):
                continue
    fields = _stat(root)
    total = sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime (fields 14-17 of proc(5))
    todo = list(parents.get(root, []))
    while todo:
        pid = todo.pop()
        try:
            total += sum(int(x) for x in _stat(pid)[11:13])
        except (FileNotFoundError, ProcessLookupError):
            continue
        todo += parents.get(pid, [])
    return total / bench.CLK_TCK


async def wait_idle(pid: int) -> None:
    """Until the server's CPU stops moving (agentspace's stores finish the writes queued after an answer)."""
    deadline = time.monotonic() + IDLE_LIMIT
    last = tree_cpu_seconds(pid)
    while time.monotonic() < deadline:
        await asyncio.sleep(IDLE_QUIET)
        now = tree_cpu_seconds(pid)
        if now == last:
            return
        last = now


# --- the clients of the provider wire formats ----------------------------------------------------


def _complete(start: float, ttft: float | None, text: list[str], ended: bool) -> bench.Sample:
    if ttft is None or not ended or "".join(text) != bench.EXPECTED_TEXT:
        raise bench.ChatFailed(
            f"incomplete answer: {len(''.join(text))} of {len(bench.EXPECTED_TEXT)} characters"
            f" in {len(text)} deltas, {'with' if ended else 'without'} the stream's end"
        )
    return bench.Sample(ttft, time.perf_counter() - start, len(text))


async def messages_chat(
    http: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    model: str,
    messages: list[dict[str, Any]] | None = None,
) -> bench.Sample:
    """One streamed Anthropic Messages call, read to ``message_stop``."""
    body = {**bench.DIRECT_BODY, "model": model}
    if messages is not None:
        body["messages"] = messages
    start = time.perf_counter()
    ttft = None
    text: list[str] = []
    ended = False
    async with http.post(url, json=body, headers=headers) as resp:
        if resp.status != 200:
            raise bench.ChatFailed(f"HTTP {resp.status}: {(await resp.text())[:200]}")
        async for line in resp.content:
            if not line.startswith(b"data:"):
                continue
            event = json.loads(line[5:])
            kind = event.get("type")
            if kind == "content_block_delta" and event["delta"].get("type") == "text_delta":
                if ttft is None:
                    ttft = time.perf_counter() - start
                text.append(event["delta"]["text"])
            elif kind == "message_stop":
                ended = True
            elif kind == "error":
                raise bench.ChatFailed(f"error event: {event.get('error')}")
    return _complete(start, ttft, text, ended)


async def completions_chat(
    http: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    model: str,
    messages: list[dict[str, Any]] | None = None,
) -> bench.Sample:
    """One streamed OpenAI Chat Completions call, read to ``[DONE]``."""
    body = {
        "model": model,
        "max_tokens": bench.DIRECT_BODY["max_tokens"],
        "stream": True,
        "messages": messages or [{"role": "user", "content": "Hello"}],
    }
    start = time.perf_counter()
    ttft = None
    text: list[str] = []
    ended = False
    async with http.post(url, json=body, headers=headers) as resp:
        if resp.status != 200:
            raise bench.ChatFailed(f"HTTP {resp.status}: {(await resp.text())[:200]}")
        async for line in resp.content:
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                ended = True
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                raise bench.ChatFailed(f"error chunk: {chunk['error']}")
            for choice in chunk.get("choices", ()):
                content = (choice.get("delta") or {}).get("content")
                if content:
                    if ttft is None:
                        ttft = time.perf_counter() - start
                    text.append(content)
    return _complete(start, ttft, text, ended)


async def responses_chat(http: aiohttp.ClientSession, url: str, headers: dict[str, str], model: str) -> bench.Sample:
    """One streamed OpenAI Responses call (as Codex sends it: stateless), read to ``response.completed``."""
    body = {
        "model": model,
        "max_output_tokens": bench.DIRECT_BODY["max_tokens"],
        "stream": True,
        "store": False,
        "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"}]}],
    }
    start = time.perf_counter()
    ttft = None
    text: list[str] = []
    ended = False
    async with http.post(url, json=body, headers=headers) as resp:
        if resp.status != 200:
            raise bench.ChatFailed(f"HTTP {resp.status}: {(await resp.text())[:200]}")
        async for line in resp.content:
            data = line[5:].strip()
            if not line.startswith(b"data:") or data == b"[DONE]":  # LiteLLM ends with [DONE] as well
                continue
            event = json.loads(data)
            kind = event.get("type")
            if kind == "response.output_text.delta":
                if ttft is None:
                    ttft = time.perf_counter() - start
                text.append(event["delta"])
            elif kind == "response.completed":
                ended = True
            elif kind in ("response.failed", "error"):
                raise bench.ChatFailed(f"{kind}: {event}")
    return _complete(start, ttft, text, ended)


# --- sides --------------------------------------------------------------------------------------


@dataclass
class Side:
    name: str
    server: str  # whose process tree's CPU is this side's: "upstream", "litellm" or "agentspace"
    connect: Callable[[], Awaitable[Chat]]  # opens one client (a socket for ws), returns its chat function
    versus: str | None = None  # an agentspace side: the LiteLLM side it is compared with
    optional: bool = False  # left out, not failed, when the server does not serve it (404 on the first chat)
    reconnect: bool = False  # new sockets before each batch (an idle socket misses the server's heartbeat)
    status: str = "ok"  # "ok", "failed" (its first chat failed: not measured) or "not served"
    workers: list[Chat] = field(default_factory=list)
    samples: list[bench.Sample] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0  # of the measured batches: chats per second = chats / this
    first_chat_ms: float | None = None

    def record(self, phase: bench.Phase) -> None:
        self.samples += phase.samples
        self.wall_seconds += phase.wall
        self.errors += phase.errors
        self.first_error = self.first_error or phase.first_error


def make_sides(http: aiohttp.ClientSession, upstream: str, litellm: str, gateway: str, token: str) -> list[Side]:
    direct_headers = bench.DIRECT_HEADERS
    lite = {"Authorization": f"Bearer {MASTER_KEY}"}
    ours = {"Authorization": f"Bearer {token}"}

    def plain(chat: Chat) -> Callable[[], Awaitable[Chat]]:
        async def connect() -> Chat:
            return chat

        return connect

    async def ws_connect() -> Chat:
        return bench.WsClient(await http.ws_connect(f"{gateway}/gateway", headers=ours, max_msg_size=0)).chat

    version = {"anthropic-version": "2023-06-01"}
    return [
        Side(
            "direct",
            "upstream",
            plain(lambda: messages_chat(http, f"{upstream}/v1/messages", direct_headers, PROXY_MODEL)),
        ),
        Side(
            "litellm /v1/chat/completions",
            "litellm",
            plain(lambda: completions_chat(http, f"{litellm}/v1/chat/completions", lite, PROXY_MODEL)),
        ),
        Side(
            "litellm /v1/messages",
            "litellm",
            plain(lambda: messages_chat(http, f"{litellm}/v1/messages", {**lite, **version}, PROXY_MODEL)),
        ),
        Side(
            "litellm /v1/responses",
            "litellm",
            plain(lambda: responses_chat(http, f"{litellm}/v1/responses", lite, PROXY_MODEL)),
        ),
        Side("agentspace ws", "agentspace", ws_connect, versus="litellm /v1/chat/completions", reconnect=True),
        Side(
            "agentspace /api/chat",
            "agentspace",
            plain(lambda: bench.http_chat(http, gateway, ours)),
            versus="litellm /v1/chat/completions",
        ),
        Side(
            "agentspace /v1/messages",
            "agentspace",
            plain(lambda: messages_chat(http, f"{gateway}/v1/messages", {**ours, **version}, PROXY_MODEL)),
            versus="litellm /v1/messages",
            optional=True,
        ),
        Side(
            "agentspace /v1/chat/completions",
            "agentspace",
            plain(lambda: completions_chat(http, f"{gateway}/v1/chat/completions", ours, bench.MODEL)),
            versus="litellm /v1/chat/completions",
            optional=True,
        ),
        Side(
            "agentspace /v1/responses",
            "agentspace",
            plain(lambda: responses_chat(http, f"{gateway}/v1/responses", ours, bench.MODEL)),
            versus="litellm /v1/responses",
            optional=True,
        ),
    ]


# --- the run ------------------------------------------------------------------------------------


async def warm_up(side: Side, args: argparse.Namespace) -> None:
    """The first chat timed apart, then ``args.warmup`` more; a side whose first chat fails is not measured."""
    first = side.workers[0]
    start = time.perf_counter()
    try:
        await asyncio.wait_for(first(), bench.CHAT_TIMEOUT)
    except (bench.ChatFailed, aiohttp.ClientError, TimeoutError, ValueError, KeyError) as e:
        error = f"{type(e).__name__}: {e}"
        side.status = "not served" if side.optional and error.startswith("ChatFailed: HTTP 404") else "failed"
        side.first_error = error
        if side.status == "failed":
            side.errors += 1
        return
    side.first_chat_ms = (time.perf_counter() - start) * 1000
    warm = await bench.run_phase(side.workers, args.warmup, args.phase_seconds)
    if warm.errors:
        side.errors += warm.errors
        side.first_error = side.first_error or warm.first_error


async def measure(side: Side, pids: dict[str, int], args: argparse.Namespace) -> None:
    if side.reconnect:
        # While the other sides ran, this side's sockets sat idle, answering no heartbeat ping (the server
        # closes such a socket after [server] heartbeat_seconds): fresh ones, outside the measured chats.
        for worker in side.workers:
            client = getattr(worker, "__self__", None)
            if isinstance(client, bench.WsClient):
                await client.ws.close()
        side.workers = [await side.connect() for _ in side.workers]
    pid = pids.get(side.server)
    if pid:
        await wait_idle(pid)
        cpu = tree_cpu_seconds(pid)
    side.record(await bench.run_phase(side.workers, args.chats, args.phase_seconds))
    if pid:
        await wait_idle(pid)
        side.cpu_seconds += tree_cpu_seconds(pid) - cpu


async def run(b: bench.Bench, args: argparse.Namespace, results: dict[str, Any]) -> list[Side]:
    from agentspace.gateway_token import load_or_create_token

    b.start_upstream()
    await b.start_gateway()
    litellm, litellm_pid = await asyncio.to_thread(start_litellm, b, args.litellm_venv)
    pids = {"agentspace": b.pid, "litellm": litellm_pid}
    token = load_or_create_token(b.home)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as http:
        sides = make_sides(http, b.upstream, litellm, b.gateway, token)
        if args.throughput:
            sides = [s for s in sides if s.name in THROUGHPUT_SIDES]
        for side in sides:
            side.workers = [await side.connect() for _ in range(args.concurrency)]
            await warm_up(side, args)
        active = [s for s in sides if s.status == "ok"]
        if not any(s.name == "direct" for s in active):
            raise RuntimeError(f"the fake upstream does not answer: {sides[0].first_error}")
        for round_ in range(args.rounds):
            shift = round_ % len(active)
            for side in active[shift:] + active[:shift]:  # rotated: the machine's drift hits every side
                await measure(side, pids, args)
        results["peakRssMiB"] = {name: bench.memory_mib(pid, "VmHWM") for name, pid in pids.items()}
    return sides


# --- the long session ---------------------------------------------------------------------------

# --throughput: the sides measured (every client one chat after the other; chats per second of each batch).
THROUGHPUT_SIDES = ("direct", "litellm /v1/chat/completions", "agentspace ws", "agentspace /api/chat")

LONG_TURN_BYTES = 25_000
LONG_SESSION_BYTES = 2_000_000
LONG_BAND = 10  # turns per size band


def long_turn(n: int, turn_bytes: int = LONG_TURN_BYTES) -> str:
    """A user turn of about ``turn_bytes``: different words each turn (nothing repeats between turns)."""
    words = [f"w{n}x{i}" for i in range(max(1, turn_bytes // 8))]
    return f"Turn {n}: " + " ".join(words)[: max(1, turn_bytes - 10)]


async def ws_session_chat(
    ws: aiohttp.ClientWebSocketResponse, n: int, content: str, session_id: str | None
) -> tuple[bench.Sample, str]:
    """One ``chat.send`` in the session (a new one when ``session_id`` is None): its sample and session id."""
    frame: dict[str, Any] = {"type": "chat.send", "id": f"long{n}", "content": content}
    if session_id:
        frame["sessionId"] = session_id
    start = time.perf_counter()
    await ws.send_str(json.dumps(frame))
    ttft = None
    text: list[str] = []
    while True:
        msg = await ws.receive()
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise bench.ChatFailed(f"socket {msg.type.name}")
        event = json.loads(msg.data)
        kind = event["type"]
        if kind == "chat.stream.start":
            session_id = event["sessionId"]
        elif kind == "chat.stream.delta":
            if ttft is None:
                ttft = time.perf_counter() - start
            text.append(event["delta"])
        elif kind == "chat.stream.end":
            break
        elif kind == "error":
            raise bench.ChatFailed(f"{event['code']}: {event['message']}")
    assert session_id is not None
    return _complete(start, ttft, text, True), session_id


async def litellm_chat(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], messages: list[dict[str, Any]]
) -> bench.Sample:
    """A long-session chat through LiteLLM Proxy, sent again once when the proxy closed the kept-alive
    connection under it (it does, after about a thousand requests: a run of 500-byte turns makes 4,000)."""
    try:
        return await completions_chat(http, url, headers, PROXY_MODEL, messages)
    except aiohttp.ServerDisconnectedError:
        return await completions_chat(http, url, headers, PROXY_MODEL, messages)


async def run_long_session(b: bench.Bench, args: argparse.Namespace, results: dict[str, Any]) -> None:
    from agentspace.gateway_token import load_or_create_token

    b.extra_config = "\n[chat]\nhistory_limit = 10000\n"  # the whole session goes to the model each turn
    b.start_upstream()
    await b.start_gateway()
    litellm, _ = await asyncio.to_thread(start_litellm, b, args.litellm_venv)
    token = load_or_create_token(b.home)
    ours = {"Authorization": f"Bearer {token}"}
    lite = {"Authorization": f"Bearer {MASTER_KEY}"}
    turns = LONG_SESSION_BYTES // args.turn_bytes
    rows: list[dict[str, Any]] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as http,
        http.ws_connect(f"{b.gateway}/gateway", headers=ours, max_msg_size=0) as ws,
    ):
        # Warm-up on every side (provider SDKs, pools), in a session of its own.
        for n in range(5):
            await ws_session_chat(ws, -n - 1, "Hello", None)
            await completions_chat(http, f"{litellm}/v1/chat/completions", lite, PROXY_MODEL)
            await messages_chat(http, f"{b.upstream}/v1/messages", bench.DIRECT_HEADERS, PROXY_MODEL)
        history: list[dict[str, Any]] = []
        session_id: str | None = None
        for n in range(turns):
            content = long_turn(n, args.turn_bytes)
            messages = [*history, {"role": "user", "content": content}]
            samples: dict[str, float] = {}

            async def ours_chat(n: int = n, content: str = content) -> bench.Sample:
                nonlocal session_id, ws
                try:
                    sample, session_id = await ws_session_chat(ws, n, content, session_id)
                except aiohttp.ClientConnectionResetError:
                    # The socket was closed while LiteLLM's turn took longer than the gateway's heartbeat (its
                    # worker restarting): nothing was sent; the same session on a new socket.
                    ws = await http.ws_connect(f"{b.gateway}/gateway", headers=ours, max_msg_size=0)
                    sample, session_id = await ws_session_chat(ws, n, content, session_id)
                return sample

            sides: list[tuple[str, Callable[[], Awaitable[bench.Sample]]]] = [
                (
                    "direct",
                    lambda m=messages: messages_chat(
                        http, f"{b.upstream}/v1/messages", bench.DIRECT_HEADERS, PROXY_MODEL, m
                    ),
                ),
                ("litellm", lambda m=messages: litellm_chat(http, f"{litellm}/v1/chat/completions", lite, m)),
                ("agentspace", ours_chat),
            ]
            shift = n % len(sides)
            for name, chat in sides[shift:] + sides[:shift]:  # rotated: drift hits every side
                samples[name] = (await chat()).ttft * 1000
            history = [*messages, {"role": "assistant", "content": bench.EXPECTED_TEXT}]
            size = sum(len(m["content"]) for m in history)
            rows.append({"turn": n + 1, "contextBytes": size, **samples})
    bands = [
        ("first 10 turns", rows[:LONG_BAND]),
        ("around 1 MB", rows[turns // 2 - LONG_BAND // 2 : turns // 2 + LONG_BAND // 2]),
        ("last 10 turns (2 MB)", rows[-LONG_BAND:]),
    ]
    summary = []
    for label, band in bands:
        added = {side: statistics.median(r[side] - r["direct"] for r in band) for side in ("agentspace", "litellm")}
        summary.append(
            {
                "band": label,
                "contextBytes": [band[0]["contextBytes"], band[-1]["contextBytes"]],
                "directTtftMs": statistics.median(r["direct"] for r in band),
                "addedTtftMs": added,
                "ratio": _ratio(added["litellm"], added["agentspace"]),
            }
        )
    results["longSession"] = {"turnBytes": args.turn_bytes, "turns": rows, "bands": summary}


def print_long_session(results: dict[str, Any]) -> None:
    print(
        f"LiteLLM Proxy {results['litellmVersion']} vs agentspace {results['agentspaceCommit'] or ''}: one session "
        f"growing in {results['longSession']['turnBytes']:,} byte turns to {LONG_SESSION_BYTES / 1e6:g} MB, the same context to each\n"
    )
    rows: list[tuple[str, ...]] = [
        ("size band", "context KB", "direct TTFT ms", "agentspace +TTFT ms", "litellm +TTFT ms", "ratio")
    ]
    for band in results["longSession"]["bands"]:
        low, high = band["contextBytes"]
        rows.append(
            (
                band["band"],
                f"{low / 1000:.0f}-{high / 1000:.0f}",
                _ms(band["directTtftMs"]),
                _ms(band["addedTtftMs"]["agentspace"]),
                _ms(band["addedTtftMs"]["litellm"]),
                _x(band["ratio"]),
            )
        )
    _table(rows)
    print(
        "(+TTFT: the side's TTFT minus the direct call's, per turn, median over the band; ratio = LiteLLM / agentspace)"
    )


# --- results ------------------------------------------------------------------------------------


def _ratio(theirs: float, ours: float) -> float | None:
    return theirs / ours if ours > 0 and not math.isnan(theirs) else None


def _goal(clean: bool, ratio: float | None, goal: float) -> bool | None:
    """False after a failed chat; None when the ratio is undefined (agentspace's figure <= 0: noise)."""
    if not clean:
        return False
    return None if ratio is None else ratio >= goal


def summarize(sides: list[Side], results: dict[str, Any]) -> None:
    direct = next(s for s in sides if s.name == "direct")
    direct_ttft = [s.ttft for s in direct.samples]
    by_name: dict[str, dict[str, Any]] = {}
    for side in sides:
        ttft = [s.ttft for s in side.samples]
        chats = len(side.samples)
        row: dict[str, Any] = {
            "side": side.name,
            "server": side.server,
            "status": side.status,
            "chats": chats,
            "errors": side.errors,
            "firstError": side.first_error,
            "firstChatMs": side.first_chat_ms,
            "deltasPerChat": statistics.median(s.deltas for s in side.samples) if chats else None,
            "ttftMs": {f"p{p}": bench.pct(ttft, p) * 1000 for p in (50, 95)} if chats else None,
            "addedTtftMs": (
                {f"p{p}": (bench.pct(ttft, p) - bench.pct(direct_ttft, p)) * 1000 for p in (50, 95)}
                if chats and side is not direct
                else None
            ),
            "cpuMsPerChat": side.cpu_seconds * 1000 / chats if chats and side.server != "upstream" else None,
            "chatsPerSecond": chats / side.wall_seconds if chats and side.wall_seconds else None,
        }
        by_name[side.name] = row
    comparisons = []
    for side in sides:
        ours, theirs = by_name[side.name], by_name.get(side.versus or "")
        if theirs is None or ours["status"] == "not served":
            continue
        measured = ours["chats"] and theirs["chats"] and ours["addedTtftMs"] and theirs["addedTtftMs"]
        ratios = {
            "addedTtftP50": _ratio(theirs["addedTtftMs"]["p50"], ours["addedTtftMs"]["p50"]) if measured else None,
            "addedTtftP95": _ratio(theirs["addedTtftMs"]["p95"], ours["addedTtftMs"]["p95"]) if measured else None,
            "cpuMsPerChat": _ratio(theirs["cpuMsPerChat"], ours["cpuMsPerChat"]) if measured else None,
            # The other way round: more chats per second is better.
            "chatsPerSecond": (
                _ratio(ours["chatsPerSecond"], theirs["chatsPerSecond"])
                if measured and ours["chatsPerSecond"] and theirs["chatsPerSecond"]
                else None
            ),
        }
        clean = not ours["errors"] and not theirs["errors"]
        comparisons.append(
            {
                "agentspace": side.name,
                "litellm": side.versus,
                "ratios": ratios,
                "failedChats": not clean,
                "ttftGoalMet": _goal(clean, ratios["addedTtftP50"], TTFT_GOAL),
                "cpuGoalMet": _goal(clean, ratios["cpuMsPerChat"], CPU_GOAL),
            }
        )
    results["sides"] = list(by_name.values())
    results["comparisons"] = comparisons


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}x"


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _verdict(met: bool | None) -> str:
    return "? (figure <= 0)" if met is None else "yes" if met else "no"


def print_tables(results: dict[str, Any]) -> None:
    print(
        f"LiteLLM Proxy {results['litellmVersion']} vs agentspace {results['agentspaceCommit'] or ''}: "
        f"{results['rounds']} rounds of {results['chats']} chats per side, concurrency {results['concurrency']}, "
        f"{bench.DELTAS} deltas per answer\n"
    )
    rows: list[tuple[str, ...]] = [
        ("side", "chats", "errors", "deltas/chat", "+TTFT p50 ms", "p95 ms", "CPU-ms/chat", "chats/s", "first chat ms")
    ]
    for s in results["sides"]:
        if s["status"] == "not served":
            continue
        added = s["addedTtftMs"] or {}
        rows.append(
            (
                s["side"],
                str(s["chats"]),
                str(s["errors"]),
                "-" if s["deltasPerChat"] is None else f"{s['deltasPerChat']:g}",
                _ms(added.get("p50")) if s["side"] != "direct" else f"({s['ttftMs']['p50']:.2f})",
                _ms(added.get("p95")) if s["side"] != "direct" else f"({s['ttftMs']['p95']:.2f})",
                _ms(s["cpuMsPerChat"]),
                "-" if s.get("chatsPerSecond") is None else f"{s['chatsPerSecond']:.1f}",
                _ms(s["firstChatMs"]),
            )
        )
    _table(rows)
    print("(direct: its own TTFT, the baseline the others' +TTFT is counted from)")
    not_served = [s["side"] for s in results["sides"] if s["status"] == "not served"]
    if not_served:
        print(f"not served by this gateway (404), left out: {', '.join(not_served)}")
    print()
    rows = [
        (
            "agentspace side",
            "vs LiteLLM side",
            "TTFT p50",
            "TTFT p95",
            "CPU",
            "chats/s",
            f"TTFT >= {TTFT_GOAL:g}x",
            f"CPU >= {CPU_GOAL:g}x",
        )
    ]
    for c in results["comparisons"]:
        verdict = (
            ("no (failed chats)", "no (failed chats)")
            if c["failedChats"]
            else (_verdict(c["ttftGoalMet"]), _verdict(c["cpuGoalMet"]))
        )
        r = c["ratios"]
        rows.append(
            (
                c["agentspace"],
                c["litellm"],
                _x(r["addedTtftP50"]),
                _x(r["addedTtftP95"]),
                _x(r["cpuMsPerChat"]),
                _x(r.get("chatsPerSecond")),
                *verdict,
            )
        )
    _table(rows)
    print(
        "(ratio = LiteLLM's figure / agentspace's: +TTFT p50, +TTFT p95, CPU-ms per chat; "
        "agentspace's / LiteLLM's: chats/s)"
    )
    rss = results.get("peakRssMiB", {})
    print("peak RSS: " + ", ".join(f"{name} {mib:.0f} MiB" for name, mib in rss.items()))
    for s in results["sides"]:
        if s["firstError"] and s["status"] != "not served":
            print(f"first error ({s['side']}): {s['firstError']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 rounds of 10 chats per side")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--concurrency", type=int, default=1, help="clients per side at a time (default 1)")
    parser.add_argument("--rounds", type=int, help="rounds over all sides (default 10; 2 with --quick)")
    parser.add_argument("--chats", type=int, help="chats per side per round (default 50; 10 with --quick)")
    parser.add_argument(
        "--litellm-venv",
        type=Path,
        default=bench.ROOT / ".bench" / "litellm-venv",
        help="LiteLLM Proxy's own venv, installed there when missing (default .bench/litellm-venv)",
    )
    parser.add_argument("--litellm-spec", default="litellm[proxy]", help="what pip installs (default litellm[proxy])")
    parser.add_argument(
        "--long-session", action="store_true", help="the long-session case only (one session growing to 2 MB)"
    )
    parser.add_argument(
        "--turn-bytes",
        type=int,
        default=LONG_TURN_BYTES,
        help=f"--long-session: the size of each user turn (default {LONG_TURN_BYTES}; 1000: ~4,000 short messages)",
    )
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="profile the gateway as benchmarks/bench.py --profile does (FILE.html or *.prof)",
    )
    parser.add_argument(
        "--throughput",
        type=int,
        metavar="CLIENTS",
        help="chats per second with CLIENTS clients per side at a time (WebSocket, /api/chat and LiteLLM's "
        "/v1/chat/completions only; --chats defaults to 10 per client)",
    )
    args = parser.parse_args()
    if args.throughput:
        args.concurrency = args.throughput
    args.rounds = args.rounds or (2 if args.quick else 10)
    args.chats = args.chats or (10 * args.throughput if args.throughput else 10 if args.quick else 50)
    args.warmup = 10 if args.quick else 100
    args.phase_seconds = 10.0 if args.quick else 30.0  # each batch of chats is also bounded in time
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=bench.ROOT, check=False, capture_output=True, text=True
    ).stdout.strip()
    results: dict[str, Any] = {
        "litellmVersion": ensure_litellm(args.litellm_venv.resolve(), args.litellm_spec),
        "agentspaceCommit": commit or None,
        "rounds": args.rounds,
        "chats": args.chats,
        "concurrency": args.concurrency,
        "deltas": bench.DELTAS,
    }
    root = Path(tempfile.mkdtemp(prefix="agentspace-vs-litellm-"))
    b = bench.Bench(
        argparse.Namespace(requests=args.chats, soak=0, quick=args.quick, json=False, profile=args.profile), root
    )
    if args.long_session:
        try:
            asyncio.run(run_long_session(b, args, results))
        finally:
            b.stop()
            shutil.rmtree(root, ignore_errors=True)
        if args.json:
            print(json.dumps(results, indent=2))
        else:
            print_long_session(results)
        return
    try:
        sides = asyncio.run(run(b, args, results))
    finally:
        b.stop()
        shutil.rmtree(root, ignore_errors=True)
    summarize(sides, results)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_tables(results)
    sys.exit(1 if any(s.errors for s in sides) else 0)


if __name__ == "__main__":
    main()
