"""Writes the stores refused (disk full, I/O error), kept in memory and retried.

A turn whose answer or usage record could not be stored ends with ``STORAGE_ERROR`` instead of reporting
success (docs/architecture.md), and hands the write here: it is retried every few seconds, and once more at shutdown,
until it succeeds or the server stops (then what is left is logged as lost).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable

from .errors import StorageError

log = logging.getLogger(__name__)

RETRY_SECONDS = 5.0

Write = Callable[[], Awaitable[None]]


class PendingWrites:
    def __init__(self, interval: float = RETRY_SECONDS) -> None:
        self.interval = interval
        self._writes: list[tuple[str, Write, str | None]] = []
        # Sessions with a write still to store (until it is stored or given up, retries in progress included).
        self._sessions: Counter[str] = Counter()
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._writes)

    def add(self, what: str, write: Write, *, session_id: str | None = None) -> None:
        """Keep ``write`` (described by ``what`` in the log, a write to ``session_id`` when given) and retry it
        until it succeeds."""
        self._writes.append((what, write, session_id))
        if session_id is not None:
            self._sessions[session_id] += 1
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._retry_until_done(), name="agentspace-pending-writes")

    def holds(self, session_id: str) -> bool:
        """Whether a write to ``session_id`` waits for its retry: a new turn's messages would be stored before
        it, out of order, and its context would lack what the write holds."""
        return self._sessions[session_id] > 0

    def _done(self, session_id: str | None) -> None:
        if session_id is not None:
            self._sessions[session_id] -= 1
            if self._sessions[session_id] <= 0:
                del self._sessions[session_id]

    async def _retry_until_done(self) -> None:
        while self._writes:
            await asyncio.sleep(self.interval)
            await self.retry()

    async def retry(self) -> None:
        """Try each kept write once, in the order they failed; the ones that fail again stay."""
        writes, self._writes = self._writes, []
        for i, (what, write, session_id) in enumerate(writes):
            try:
                await write()
                log.info("stored %s (after an earlier failure)", what)
                self._done(session_id)
            except (StorageError, OSError) as e:
                log.warning("storing %s still fails (%s); retrying in %.0fs", what, e, self.interval)
                self._writes.append((what, write, session_id))
            except Exception:  # not the disk (e.g. the session was deleted since): retrying will not help
                log.exception("gave up storing %s", what)
                self._done(session_id)
            except BaseException:  # cancelled mid-retry: keep what was not tried
                self._writes[:0] = writes[i:]
                raise

    async def aclose(self) -> None:
        """At shutdown: stop the timer, try once more, and log what could not be stored."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._writes:
            await self.retry()
        for what, _, _ in self._writes:
            log.error("lost %s: the store kept failing until the server stopped", what)
        self._writes = []
        self._sessions.clear()
