"""The queue that feeds one usage sink (``agentspace.sinks``): bounded, one worker task, retries with backoff,
a bounded drain at shutdown. Kept apart from ``sinks`` so that importing the public API stays light."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
import weakref
from collections import deque
from collections.abc import Callable

from .sinks import (
    CLOSE_SECONDS,
    DRAIN_SECONDS,
    LOG_EVERY_SECONDS,
    QUEUE_SIZE,
    RECORD_TIMEOUT_SECONDS,
    RETRY_FIRST_SECONDS,
    RETRY_MAX_SECONDS,
    START_WAIT_SECONDS,
    DropRecord,
    UsageSink,
    sink_name,
)
from .types import UsageRecord

log = logging.getLogger(__name__)

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
        self._starting: asyncio.Task[None] | None = None  # the sink's ``start``; its records wait for it
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._said_closed = False  # a record came after the close, and the log said so
        self._stopped = False  # the drain is over: the worker ends at its next turn, cancelled or not
        self._hurry = asyncio.Event()  # set at shutdown: a retry waiting out its backoff goes at once
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
        """The sink's ``start``, waited for at most ``START_WAIT_SECONDS``: a sink that hangs there must not keep
        the server from listening. It goes on for up to ``record_timeout_seconds``; records queue meanwhile."""
        start = getattr(self.sink, "start", None)
        if start is None:
            return
        self._starting = asyncio.create_task(self._start(start), name=f"agentspace-sink-start-{self.name}")
        done, _ = await asyncio.wait({self._starting}, timeout=min(START_WAIT_SECONDS, self.timeout))
        if not done:
            log.warning(
                "usage sink %r still starting after %.0fs; the server starts without it (its records queue)",
                self.name,
                min(START_WAIT_SECONDS, self.timeout),
            )

    async def _start(self, start: Callable[[], object]) -> None:
        try:
            started = start()
            if inspect.isawaitable(started):
                await asyncio.wait_for(started, self.timeout)
        except Exception as e:  # the sink may recover; its records queue and are retried meanwhile
            log.error(
                "usage sink %r failed to start (%s: %s); its records are retried",
                self.name,
                type(e).__name__,
                e,
                exc_info=e,
            )

    def offer(self, record: UsageRecord) -> None:
        """Queue ``record`` for the sink; never blocks, never raises."""
        if self._closed:  # a call that outlived the shutdown's drain: said once, not once per record
            self.dropped += 1
            if not self._said_closed:
                self._said_closed = True
                log.warning(
                    "usage sink %r: closed at shutdown; record %s and any after it not delivered", self.name, record.id
                )
            return
        if len(self._records) >= self.maxsize:
            self.dropped += 1
            self._warn("usage sink %r: queue full (%d records); dropped record %s", self.name, self.maxsize, record.id)
            return
        self._records.append(record)
        self._idle.clear()
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"agentspace-sink-{self.name}")

    async def _run(self) -> None:
        if self._starting is not None:
            await self._starting  # a sink gets no record before its ``start`` ended (or timed out)
        backoff = 0.0
        # Not ``while True``: Python 3.11's ``wait_for`` returns (or raises) the result of a call that ended just as
        # its task was cancelled, and so swallows the cancel; the worker would then retry for ever and the
        # shutdown wait for it.
        while not self._stopped:
            if not self._records:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            record = self._records[0]
            try:
                taken = self.sink.record(record)
                if inspect.isawaitable(taken):
                    await asyncio.wait_for(taken, self.timeout)
                # else a plain ``def record``: it ran, and is done (retrying it would repeat its work)
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
                if self._closed:  # draining: retry soon, the drain's time is short
                    await asyncio.sleep(RETRY_FIRST_SECONDS)
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._hurry.wait(), backoff)
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
        self._hurry.set()  # a sink that recovered during a long backoff still gets its records now
        wait = self.drain_seconds if drain_seconds is None else drain_seconds
        if self._records:
            try:
                await asyncio.wait_for(self._idle.wait(), wait)
            except TimeoutError:
                pass
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
        if self._task is not None:
            self._stopped = True
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
                closed = close()
                if inspect.isawaitable(closed):
                    # Bounded: a sink hanging in its ``aclose`` must not keep the server from stopping.
                    await asyncio.wait_for(closed, CLOSE_SECONDS)
            except TimeoutError:
                log.error("closing usage sink %r took more than %.0fs; left behind", self.name, CLOSE_SECONDS)
            except Exception:
                log.exception("closing usage sink %r failed", self.name)
        _live.discard(self)
