"""What the fake upstreams share: a queue of scripted responses and an aiohttp server on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Generic, Self, TypeVar

from aiohttp import web

R = TypeVar("R")


class FakeUpstream(Generic[R]):
    """Subclasses add their routes in ``routes`` and take responses from ``next_response``."""

    def __init__(self, default: R) -> None:
        self.default = default
        self._queue: deque[R] = deque()
        self._runner: web.AppRunner | None = None
        # Handlers still streaming; cancelled on close so a stalled answer cannot hold the shutdown.
        self._handlers: set[asyncio.Task[Any]] = set()
        self.port = 0
        self._releases = 0  # ``release`` calls not yet taken by a pause

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def enqueue(self, *responses: R) -> None:
        self._queue.extend(responses)

    def next_response(self) -> R:
        return self._queue.popleft() if self._queue else self.default

    @staticmethod
    async def read(request: web.Request) -> tuple[Any, dict[str, str]]:
        """The JSON body (None when it is not JSON) and the headers with lower-cased names."""
        try:
            body = await request.json()
        except ValueError:
            body = None
        return body, {k.lower(): v for k, v in request.headers.items()}

    async def pause(self, request: web.Request, seconds: float) -> bool:
        """Send nothing for ``seconds``, or until ``release``; False as soon as the client hangs up meanwhile (a
        real server's socket sees the close at once, not at its next write)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            if request.transport is None or request.transport.is_closing():
                return False
            if self._releases:
                self._releases -= 1
                break
            await asyncio.sleep(min(0.05, max(0.0, end - loop.time())))
        return True

    def release(self) -> None:
        """End one pause (a stall or a silence) early: the one under way, or else the next to start. A test that
        saw what it waited for during a long stall need not wait out the rest of it."""
        self._releases += 1

    async def start(self, port: int = 0) -> Self:
        app = web.Application(client_max_size=32 * 1024 * 1024)  # the providers' own limit (Anthropic: 32 MB)
        self.routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def close(self) -> None:
        for task in list(self._handlers):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
