"""A small client of the gateway's WebSocket protocol (SPEC section 3), shared by ``chat`` and ``inspect``.

Only imported inside those commands: it pulls in aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import click

from .common import CliState

TERMINAL_TYPES = {
    "chat.stream.end",
    "context.inspection",
    "usage.report",
    "session.list.result",
    "session.compacted",
    "auth.ok",
}


class ConnectionLost(click.ClickException):
    pass


def default_url(state: CliState) -> str:
    server = state.config()["server"]
    host = server["host"]
    if host in ("0.0.0.0", "::", ""):  # a wildcard bind is reached through loopback
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"ws://{host}:{server['port']}/gateway"


def resolve_token(state: CliState, token: str | None) -> str:
    if token:
        return token
    from ..gateway_token import load_or_create_token

    return load_or_create_token(state.data_dir)


class GatewayConnection:
    """One WebSocket to ``/gateway``. A reader task keeps receiving (so pings are answered while the
    user types) and queues frames; a closed socket is reopened on the next send."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._frames: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> GatewayConnection:
        self._http = aiohttp.ClientSession()
        try:
            await self.connect()
        except BaseException:
            await self._http.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()

    @property
    def closed(self) -> bool:
        return self._ws is None or self._ws.closed

    async def connect(self) -> None:
        assert self._http is not None
        try:
            self._ws = await self._http.ws_connect(
                self.url, headers={"Authorization": f"Bearer {self.token}"}, max_msg_size=0
            )
        except aiohttp.WSServerHandshakeError as e:
            if e.status in (401, 403):
                raise click.ClickException(
                    f"The gateway at {self.url} refused the token (HTTP {e.status}). Use the token of the "
                    "server's data directory (agentspace token), or pass --token / AGENTSPACE_TOKEN."
                ) from None
            raise click.ClickException(
                f"WebSocket handshake with {self.url} failed (HTTP {e.status}). Is it an agentspace gateway?"
            ) from None
        except (aiohttp.ClientError, OSError) as e:
            raise click.ClickException(
                f"Cannot connect to the gateway at {self.url} ({e}). Start it with: agentspace serve"
            ) from None
        self._frames = asyncio.Queue()
        self._reader = asyncio.create_task(self._read(self._ws, self._frames))

    @staticmethod
    async def _read(ws: aiohttp.ClientWebSocketResponse, frames: asyncio.Queue[dict[str, Any] | None]) -> None:
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    with contextlib.suppress(ValueError):
                        frame = json.loads(msg.data)
                        if isinstance(frame, dict):
                            frames.put_nowait(frame)
        finally:
            frames.put_nowait(None)

    async def send(self, frame: dict[str, Any]) -> None:
        if self.closed:
            await self.connect()
        assert self._ws is not None
        await self._ws.send_json(frame)

    async def replies(self, request_id: str) -> AsyncIterator[dict[str, Any]]:
        """Frames answering ``request_id``, up to and including its final one (or an ``error``)."""
        while True:
            frame = await self._frames.get()
            if frame is None:
                raise ConnectionLost("The gateway closed the connection.")
            if frame.get("requestId") != request_id:
                continue
            yield frame
            if frame.get("type") in TERMINAL_TYPES or frame.get("type") == "error":
                return

    async def request(self, frame: dict[str, Any]) -> dict[str, Any]:
        """Send one message and return its final reply; an ``error`` reply becomes a ClickException."""
        await self.send(frame)
        async for reply in self.replies(frame["id"]):
            if reply.get("type") == "error":
                raise click.ClickException(f"[{reply.get('code')}] {reply.get('message')}")
            if reply.get("type") in TERMINAL_TYPES:
                return reply
        raise ConnectionLost("The gateway closed the connection.")
