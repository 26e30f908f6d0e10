"""A small client of the gateway's WebSocket protocol (docs/protocol.md), shared by ``chat`` and ``inspect``.

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


AUTH_TIMEOUT_SECONDS = 10.0


class ConnectionLost(click.ClickException):
    pass


class Unreachable(click.ClickException):
    """No gateway answers at the URL (not running, restarting): worth retrying, unlike a refused token."""


def default_url(state: CliState) -> str:
    """The address the data directory's server announced when it started (``serve --port`` included), else
    the config's ``[server]`` host and port."""
    from ..gateway_token import read_server_address

    announced = read_server_address(state.data_dir)
    if announced:
        return announced
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
    from ..gateway_token import client_token

    return client_token(state.data_dir)


def untrusted(url: str, error: aiohttp.ClientConnectorCertificateError) -> str:
    """What to say when the gateway's TLS certificate (a proxy's, docs/deploy.md) is not trusted here."""
    return (
        f"The gateway at {url} presented a TLS certificate this machine does not trust "
        f"({error.certificate_error}). Add its CA to the system's, or point SSL_CERT_FILE at it."
    )


def websocket_url(url: str) -> str:
    """``http(s)://host[/path]`` -> ``ws(s)://host[/path]/gateway``, as ``ask`` takes either form of the URL
    they share (``AGENTSPACE_URL``); a ``ws(s)://`` URL is kept as given, but for the path of a bare host
    (``wss://gateway.example.com``, which ``ask`` takes: its handshake with the web app failed)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme in ("ws", "wss") and parts.path in ("", "/") and not parts.query:
        return f"{parts.scheme}://{parts.netloc}/gateway"
    if parts.scheme not in ("http", "https"):
        return url
    path = parts.path.rstrip("/").removesuffix("/gateway")
    return f"{'wss' if parts.scheme == 'https' else 'ws'}://{parts.netloc}{path}/gateway"


class GatewayConnection:
    """One WebSocket to ``/gateway``. A reader task keeps receiving (so pings are answered while the
    user types) and queues frames; a closed socket is reopened on the next send."""

    def __init__(self, url: str, token: str) -> None:
        self.url = websocket_url(url)
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
        """Open the WebSocket and authenticate at once (an ``auth`` frame, answered ``auth.ok``), so a wrong
        token is reported here and not at the first message."""
        assert self._http is not None
        try:
            # The header authenticates at the handshake (a proxy may log a refusal); the auth frame makes the
            # gateway answer auth.ok or an error either way, so a wrong token is known before any message.
            ws = await self._http.ws_connect(
                self.url, headers={"Authorization": f"Bearer {self.token}"}, max_msg_size=0
            )
        except aiohttp.WSServerHandshakeError as e:
            if e.status in (401, 403):
                raise click.ClickException(self._refused(f"HTTP {e.status}")) from None
            if e.status == 503:  # shutting down, or at its connection limit
                raise Unreachable(f"The gateway at {self.url} is not accepting connections (HTTP 503).") from None
            if e.status in (502, 504):  # a reverse proxy (docs/deploy.md) whose gateway is down or restarting
                raise Unreachable(
                    f"The proxy at {self.url} cannot reach the gateway behind it (HTTP {e.status})."
                ) from None
            raise click.ClickException(
                f"WebSocket handshake with {self.url} failed (HTTP {e.status}). Is it an agentspace gateway?"
            ) from None
        except aiohttp.ClientConnectorCertificateError as e:  # not a stopped gateway: waiting will not help
            raise click.ClickException(untrusted(self.url, e)) from None
        except (aiohttp.ClientError, OSError) as e:
            raise Unreachable(
                f"Cannot connect to the gateway at {self.url} ({e}). Start it with: agentspace serve"
            ) from None
        try:
            await ws.send_json({"type": "auth", "id": "auth", "token": self.token})
            reply = await ws.receive(timeout=AUTH_TIMEOUT_SECONDS)
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            await ws.close()
            raise Unreachable(f"The gateway at {self.url} did not answer the authentication ({e}).") from None
        frame: Any = None
        if reply.type == aiohttp.WSMsgType.TEXT:
            with contextlib.suppress(ValueError):
                frame = json.loads(reply.data)
        if not isinstance(frame, dict) or frame.get("type") != "auth.ok":
            await ws.close()
            if isinstance(frame, dict) and frame.get("code") == "RATE_LIMITED":
                raise click.ClickException(f"[RATE_LIMITED] {frame.get('message')}")
            if frame is None and reply.type != aiohttp.WSMsgType.TEXT:
                raise Unreachable(f"The gateway at {self.url} closed the connection while authenticating.")
            raise click.ClickException(self._refused(str((frame or {}).get("code") or "no auth.ok")))
        self._ws = ws
        self._frames = asyncio.Queue()
        self._reader = asyncio.create_task(self._read(ws, self._frames))

    def _refused(self, why: str) -> str:
        return (
            f"The gateway at {self.url} refused the token ({why}). Use the token the server accepts "
            "(agentspace token, or AGENTSPACE_GATEWAY_TOKEN where the servers have it), or pass "
            "--token / AGENTSPACE_TOKEN."
        )

    async def reconnect(self, patience: float, on_wait: Any = None) -> None:
        """Connect again, retrying while the gateway is unreachable (a restart) for up to ``patience`` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience
        delay = 0.2
        told = False
        while True:
            try:
                await self.connect()
                return
            except Unreachable:
                if loop.time() + delay > deadline:
                    raise
                if on_wait is not None and not told:
                    on_wait()
                    told = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

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

    async def send(self, frame: dict[str, Any], patience: float = 0.0, on_wait: Any = None) -> None:
        """Send one frame; a closed socket is reopened first, waiting up to ``patience`` seconds for a
        gateway that is restarting (``on_wait()`` is called once when it has to wait)."""
        if self.closed:
            await self.reconnect(patience, on_wait)
        assert self._ws is not None
        try:
            await self._ws.send_json(frame)
        except (ConnectionResetError, aiohttp.ClientError):  # closed under us: once more on a new socket
            await self.reconnect(patience, on_wait)
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
