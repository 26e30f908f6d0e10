"""Shared by load_test.py and crash_test.py: the chaos upstream process and concurrent chat clients.

Every client request starts a new session (WebSocket ``chat.send`` without ``sessionId``, or ``POST /api/chat``
with a fresh id), so a request and its session are one to one: after the run, each session that reached
``start`` must hold exactly one assistant message and one usage record.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
REQUEST_TIMEOUT = 30.0  # a request taking longer counts as wedged


class ChaosUpstream:
    """``scripts/chaos_upstream.py`` in its own process."""

    def __init__(self, seed: int | None) -> None:
        self.seed = seed
        self.process: asyncio.subprocess.Process | None = None
        self.url = ""
        self.served: dict[str, int] = {}

    async def __aenter__(self) -> ChaosUpstream:
        args = [sys.executable, str(ROOT / "scripts" / "chaos_upstream.py")]
        if self.seed is not None:
            args += ["--seed", str(self.seed)]
        self.process = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE, cwd=ROOT)
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), 30)
        match = re.search(rb"at (http://\S+)", line)
        if match is None:
            raise RuntimeError(f"the chaos upstream did not start: {line!r}")
        self.url = match.group(1).decode()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.process is not None and self.process.stdout is not None
        if self.process.returncode is None:
            self.process.terminate()
        out = (await asyncio.wait_for(self.process.stdout.read(), 30)).decode()
        await self.process.wait()
        match = re.search(r"faults: (\{.*\})", out)
        self.served = json.loads(match.group(1)) if match else {}


@dataclass
class Request:
    transport: str
    session_id: str | None = None
    started: bool = False
    outcome: str | None = None  # "end" or an error code / text: the one terminal frame
    terminal_frames: int = 0
    client_error: str | None = None  # timeout, dropped connection
    latency: float = 0.0


@dataclass
class Load:
    """Concurrent clients, half WebSocket, half HTTP, each sending one chat after another until ``stop``."""

    url: str
    token: str
    concurrency: int
    requests: list[Request] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, duration: float) -> None:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {self.token}"}) as http:
            workers = [
                asyncio.create_task(self._ws_worker(http) if i % 2 == 0 else self._http_worker(http))
                for i in range(self.concurrency)
            ]
            try:
                await asyncio.wait_for(self.stop.wait(), duration)
            except TimeoutError:
                self.stop.set()
            # In-flight requests finish (bounded by REQUEST_TIMEOUT); no new ones start.
            await asyncio.gather(*workers)

    async def _ws_worker(self, http: aiohttp.ClientSession) -> None:
        url = self.url.replace("http://", "ws://", 1) + "/gateway"
        n = 0
        try:
            ws = await http.ws_connect(url)
        except aiohttp.ClientError as e:
            self.requests.append(Request("ws", client_error=f"connect: {e!r}"))
            return
        async with ws:
            while not self.stop.is_set():
                n += 1
                request = Request("ws")
                self.requests.append(request)
                started = time.monotonic()
                try:
                    await asyncio.wait_for(self._ws_chat(ws, request, f"r{n}"), REQUEST_TIMEOUT)
                except (TimeoutError, aiohttp.ClientError, ConnectionError, RuntimeError) as e:
                    request.client_error = repr(e)
                    return
                finally:
                    request.latency = time.monotonic() - started

    async def _ws_chat(self, ws: aiohttp.ClientWebSocketResponse, request: Request, request_id: str) -> None:
        await ws.send_json({"type": "chat.send", "id": request_id, "content": "Tell me about foxes."})
        while True:
            msg = await ws.receive()
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise ConnectionError(f"socket closed ({msg.type.name}, {ws.close_code})")
            frame = json.loads(msg.data)
            if frame.get("requestId") != request_id:
                continue
            kind = frame["type"]
            if kind == "chat.stream.start":
                request.started, request.session_id = True, frame["sessionId"]
            elif kind in ("chat.stream.end", "error"):
                request.terminal_frames += 1
                request.outcome = "end" if kind == "chat.stream.end" else frame["code"]
                return

    async def _http_worker(self, http: aiohttp.ClientSession) -> None:
        while not self.stop.is_set():
            request = Request("http", session_id=f"load-{uuid.uuid4().hex[:16]}")
            self.requests.append(request)
            started = time.monotonic()
            try:
                await asyncio.wait_for(self._http_chat(http, request), REQUEST_TIMEOUT)
            except (TimeoutError, aiohttp.ClientError, ConnectionError) as e:
                request.client_error = repr(e)
                return
            finally:
                request.latency = time.monotonic() - started

    async def _http_chat(self, http: aiohttp.ClientSession, request: Request) -> None:
        body = {
            "id": request.session_id,
            "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "Tell me about foxes."}]}],
        }
        async with http.post(self.url + "/api/chat", json=body) as resp:
            if resp.status != 200:
                request.outcome = f"HTTP {resp.status}"
                return
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    return
                chunk = json.loads(data)
                if chunk["type"] == "start":
                    request.started = True
                elif chunk["type"] in ("finish", "error"):
                    request.terminal_frames += 1
                    request.outcome = "end" if chunk["type"] == "finish" else "error"
        raise ConnectionError("the stream ended without [DONE]")


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def summarize(requests: list[Request], seconds: float) -> dict[str, Any]:
    latencies = [r.latency for r in requests if r.outcome is not None]
    return {
        "requests": len(requests),
        "started": sum(r.started for r in requests),
        "perSecond": round(len(requests) / seconds, 1) if seconds else 0.0,
        "byTransport": dict(Counter(r.transport for r in requests)),
        "outcomes": dict(Counter(r.outcome or "none" for r in requests)),
        "clientErrors": sum(r.client_error is not None for r in requests),
        "latencyP50": round(percentile(latencies, 50), 3),
        "latencyP95": round(percentile(latencies, 95), 3),
    }


def stored_counts(data_dir: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Per session: assistant messages and usage records, read with the stores' sync API (as the CLI does)."""
    sys.path.insert(0, str(ROOT))
    from agentspace.storage.embedded.sessions import SessionStore
    from agentspace.storage.embedded.usage import UsageStore

    sessions = SessionStore(data_dir)
    messages = {}
    for summary in sessions.summaries_sync():
        session = sessions.get_sync(summary["id"]) or {"messages": []}
        messages[summary["id"]] = sum(m["role"] == "assistant" for m in session["messages"])
    records = Counter(str(r.get("sessionId")) for r in UsageStore(data_dir).records_sync())
    return messages, dict(records)
