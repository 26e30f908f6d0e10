"""Usage sinks receive every usage record (docs/plugins.md, ``register_usage_sinks``).

The store of record (the built-in tinydb sink, or the one a storage backend brings) is awaited before a
turn ends: it is the only write that can fail a turn. Every other sink is fed through a ``SinkQueue`` of
its own: a bounded queue and one worker task that calls the sink, retries with backoff and drains at
shutdown, so a slow or failing sink never delays or changes what a client sees.

Delivery to a queued sink is at-least-once while the process lives: a record is retried until the sink
takes it (or raises ``DropRecord``), also at shutdown for up to ``drain_seconds``. What is still queued
when the process dies (a crash, a kill, or the drain time running out) is lost for that sink; the store of
record has it, so it can be replayed from ``agentspace usage``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import deque
from collections.abc import Awaitable
from typing import Protocol, runtime_checkable

from .types import UsageRecord

log = logging.getLogger(__name__)

QUEUE_SIZE = 10_000  # records waiting per sink; beyond that new records are dropped (and counted)
RECORD_TIMEOUT_SECONDS = 30.0  # one call of ``record``; then it counts as failed and is retried
RETRY_FIRST_SECONDS = 0.5  # backoff after the first failure, doubled after each further one ...
RETRY_MAX_SECONDS = 30.0  # ... up to this
DRAIN_SECONDS = 5.0  # at shutdown, how long the queues get to empty
LOG_EVERY_SECONDS = 60.0  # at most one failure warning per sink in this time (the rest are counted)


@runtime_checkable
class UsageSink(Protocol):
    name: str

    def record(self, record: UsageRecord) -> Awaitable[None]:
        """Persist or forward one record: usually ``async def``; any callable returning an awaitable will do.

        Called from the sink's own queue, after the turn's end was sent: raising (any ``Exception``) makes
        the gateway retry the same record later, with backoff; raise ``DropRecord`` for a record that can
        never be taken. Optional attributes: ``queue_size``, ``record_timeout_seconds``,
        ``retry_max_seconds``, ``drain_seconds``; optional methods: ``async start()`` (when the server
        starts) and ``async aclose()`` (at shutdown, after the queue drained)."""
        ...


class DropRecord(Exception):
    """Raised by a sink's ``record`` for a record it can never take: logged, counted, not retried."""


def sink_name(sink: object) -> str:
    return str(getattr(sink, "name", None) or type(sink).__name__)


def delivery(sink: object) -> str:
    """How the registry calls ``sink``: ``record`` (the store of record: awaited, its failure fails the turn),
    ``inline`` (awaited, never fails a turn: for sinks that only count in memory, like the metrics one) or
    ``queued`` (the default: a ``SinkQueue``)."""
    value = getattr(sink, "delivery", "queued")
    return value if value in ("record", "inline") else "queued"


# The queues of this process, for the metrics plugin (``agentspace_sink_*``).
_live: weakref.WeakSet[SinkQueue] = weakref.WeakSet()


def live_queues() -> list[SinkQueue]:
    return list(_live)


class SinkQueue:
    """One sink's queue and worker: records are delivered in order, each retried until the sink takes it."""

    def __init__(self, sink: UsageSink) -> None:
        self.sink = sink
        self.name = sink_name(sink)
        self.maxsize = int(getattr(sink, "queue_size", QUEUE_SIZE))
        self.timeout = float(getattr(sink, "record_timeout_seconds", RECORD_TIMEOUT_SECONDS))
        self.retry_max = float(getattr(sink, "retry_max_seconds", RETRY_MAX_SECONDS))
        self.drain_seconds = float(getattr(sink, "drain_seconds", DRAIN_SECONDS))
        self._records: deque[UsageRecord] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self.delivered = 0
        self.failures = 0  # calls of ``record`` that raised or timed out (each retry counts)
        self.dropped = 0  # records this sink never got: DropRecord, a full queue, or left at shutdown
        self._last_log = -LOG_EVERY_SECONDS
        self._unlogged = 0
        _live.add(self)

    @property
    def depth(self) -> int:
        return len(self._records)

    async def start(self) -> None:
        start = getattr(self.sink, "start", None)
        if start is not None:
            try:
                await start()
            except Exception:  # the sink may recover; its records queue and are retried meanwhile
                log.exception("usage sink %r failed to start", self.name)

    def offer(self, record: UsageRecord) -> None:
        """Queue ``record`` for the sink; never blocks, never raises."""
        if self._closed or len(self._records) >= self.maxsize:
            self.dropped += 1
            self._warn("usage sink %r: queue full (%d records); dropped record %s", self.name, self.maxsize, record.id)
            return
        self._records.append(record)
        self._idle.clear()
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"agentspace-sink-{self.name}")

    async def _run(self) -> None:
        backoff = 0.0
        while True:
            if not self._records:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            record = self._records[0]
            try:
                await asyncio.wait_for(self.sink.record(record), self.timeout)
            except DropRecord as e:
                self._records.popleft()
                self.dropped += 1
                self._warn("usage sink %r refused record %s: %s (not retried)", self.name, record.id, e)
            except Exception as e:
                self.failures += 1
                backoff = min(self.retry_max, backoff * 2 or RETRY_FIRST_SECONDS)
                self._warn(
                    "usage sink %r failed (%s: %s); record %s retried in %.1fs, %d waiting",
                    self.name,
                    type(e).__name__,
                    e,
                    record.id,
                    backoff,
                    len(self._records),
                )
                await asyncio.sleep(backoff)
            else:
                self._records.popleft()
                self.delivered += 1
                if backoff:
                    log.info("usage sink %r works again; %d records waiting", self.name, len(self._records))
                backoff = 0.0

    def _warn(self, message: str, *args: object) -> None:
        """Log at most once per ``LOG_EVERY_SECONDS``: a sink that is down fails for every record."""
        now = time.monotonic()
        if now - self._last_log < LOG_EVERY_SECONDS:
            self._unlogged += 1
            return
        if self._unlogged:
            message += " (%d more problems since the last message)"
            args = (*args, self._unlogged)
        self._last_log, self._unlogged = now, 0
        log.warning(message, *args)

    async def aclose(self, drain_seconds: float | None = None) -> None:
        """Stop taking records, give the queue ``drain_seconds`` to empty, then close the sink."""
        self._closed = True
        wait = self.drain_seconds if drain_seconds is None else drain_seconds
        if self._records:
            try:
                await asyncio.wait_for(self._idle.wait(), wait)
            except TimeoutError:
                pass
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._records:
            self.dropped += len(self._records)
            log.error(
                "usage sink %r: %d records not delivered at shutdown (the store of record has them)",
                self.name,
                len(self._records),
            )
            self._records.clear()
        close = getattr(self.sink, "aclose", None)
        if close is not None:
            try:
                await close()
            except Exception:
                log.exception("closing usage sink %r failed", self.name)
        _live.discard(self)
