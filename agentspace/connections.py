"""What a client that has not authenticated can hold: connections and unread WebSocket bytes.

- ``ConnectionCap`` is the listener's protocol factory: aiohttp's request handler for each connection until
  ``[server] max_connections`` are open; past that a new connection gets a 503 and is closed at once, so
  connections cannot exhaust the process's file descriptors. (The header deadline is aiohttp's keep-alive
  timeout, which also runs from the moment a connection opens: ``server.run_server`` sets it.)
- ``PreAuthBudget`` wraps a WebSocket's frame parser until the client has authenticated: past a few KiB
  received before that, the socket is closed with 1009 (message too big) instead of buffering a frame of
  up to 4 x ``max_frame_bytes`` from a client nobody has let in.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from typing import Any, cast

from aiohttp import web

log = logging.getLogger(__name__)

_REFUSED_BODY = b'{"error":{"code":"UNAVAILABLE","message":"Too many open connections; try again in a moment."}}'
REFUSED_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_REFUSED_BODY), _REFUSED_BODY)
)
# How often a refusal is logged at most: a flood must not flood the log as well.
REFUSAL_LOG_SECONDS = 60.0


class _Counted(asyncio.Protocol):
    """aiohttp's handler for one connection, counted while the connection is open."""

    def __init__(self, cap: ConnectionCap, inner: asyncio.Protocol) -> None:
        self.cap = cap
        self.inner = inner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.cap.open -= 1
        self.inner.connection_lost(exc)


class _Refused(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        writable = cast(asyncio.WriteTransport, transport)  # uvloop's transports are not asyncio classes
        writable.write(REFUSED_RESPONSE)
        writable.close()


class ConnectionCap:
    """Protocol factory for ``loop.create_server``: at most ``limit`` connections open at once."""

    def __init__(self, server: web.Server, limit: int) -> None:
        self.server = server
        self.limit = limit
        self.open = 0  # counted from the factory call, so a burst of accepts cannot slip past the limit
        self._last_logged = -REFUSAL_LOG_SECONDS

    def __call__(self) -> asyncio.Protocol:
        if self.open >= self.limit:
            now = time.monotonic()
            if now - self._last_logged >= REFUSAL_LOG_SECONDS:
                self._last_logged = now
                log.warning("%d connections open, the [server] max_connections limit: refusing new ones", self.open)
            return _Refused()
        self.open += 1
        return _Counted(self, self.server())


# A close frame (RFC 6455 5.5.1) with status 1009, "message too big", as a server sends it (unmasked).
_CLOSE_TOO_BIG = struct.pack("!BBH", 0x88, 2, 1009)


class PreAuthBudget:
    """Stands in for a WebSocket's frame parser until ``release()``: counts what the client sends and closes
    the socket once that passes ``limit`` bytes, before the parser buffers any more of it.

    Installed right after the upgrade; what the client sent before the upgrade completed (at most one read
    buffer) has reached the parser already and is not counted.
    """

    def __init__(self, request: web.Request, limit: int) -> None:
        self.protocol: Any = request.protocol
        self.parser = self.protocol._payload_parser  # aiohttp's WebSocketReader, installed by prepare()
        self.transport = request.transport
        self.limit = limit
        self.received = 0
        self.protocol._payload_parser = self

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.received += len(data)
        if self.received > self.limit:
            if self.transport is not None and not self.transport.is_closing():
                log.info("websocket closed: %d bytes received before authentication", self.received)
                self.transport.write(_CLOSE_TOO_BIG)
                self.transport.close()
            return False, b""
        result: tuple[bool, bytes] = self.parser.feed_data(data)
        return result

    def feed_eof(self) -> None:
        self.parser.feed_eof()

    def release(self) -> None:
        """Authenticated: hand the parser back (no cost per frame from now on)."""
        if self.protocol._payload_parser is self:
            self.protocol._payload_parser = self.parser
