"""Where each usage record goes: the store of record, the other usage sinks, then the client's counters.

``calls.ProviderCall`` posts the one record of each provider call here, and the ledger's recovery the records
of calls a stopped process left unfinished (``stores/ledger.py``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import pluggy

from .errors import StorageError
from .observe import notify
from .pending import PendingWrites
from .sink_queue import SinkQueue
from .sinks import UsageSink, delivery, sink_name

if TYPE_CHECKING:
    from .limits import Guard, Reservation
    from .types import UsageRecord

log = logging.getLogger(__name__)


class Recorder:
    """The usage sinks of one gateway and the queues of those that are not awaited (``sinks.delivery``)."""

    def __init__(self, sinks: Sequence[UsageSink], pm: pluggy.PluginManager, guard: Guard, pending: PendingWrites):
        self.sinks = tuple(sinks)
        self.pm = pm
        self.guard = guard
        self.pending = pending  # store writes that failed, retried until they succeed or the server stops
        self.queues = {id(s): SinkQueue(s) for s in self.sinks if delivery(s) == "queued"}

    async def start(self) -> None:
        """When the server starts: the queued sinks' ``start`` (open their clients) and workers, together (each
        waited for a bounded time)."""
        await asyncio.gather(*(queue.start() for queue in self.queues.values()))

    async def record(
        self,
        record: UsageRecord,
        reservation: Reservation | None = None,
        *,
        settle: bool = True,
        stored_later: Callable[[], None] | None = None,
        identity: str | None = None,
    ) -> StorageError | OSError | None:
        """Store one record and hand it to every other sink; the failure when the store of record failed,
        else None. The record then settles the call's ``reservation`` (its client's budget and minute,
        ``limits.Guard``).

        The store of record (``delivery = "record"``) is awaited; when it fails (``StorageError``,
        ``OSError``: disk full, I/O error) the record is written again later (``pending``). ``inline``
        sinks are awaited and their failures logged; every other sink gets the record through its own queue
        (``sinks.SinkQueue``), so it neither delays nor fails the turn. ``settle=False``: the record was
        settled already (a spooled record posted at the next start: its process settled it when the call ended).
        ``stored_later`` is called once a retry stored the record the store of record refused (its ledger entry
        closes then). ``identity``: the creation of the client the call was admitted as (``Guard.owned``).
        """
        failed: StorageError | OSError | None = None
        owned = True
        if settle and identity is not None:
            owned = await self.guard.owned(record, identity)
        if settle:
            self.guard.posting(record)
        for sink in self.sinks:
            queue = self.queues.get(id(sink))
            if queue is not None:
                queue.offer(record)
                continue
            kind = delivery(sink)
            started = time.monotonic()
            try:
                await sink.record(record)
            except (StorageError, OSError) as e:
                if kind != "record":
                    log.exception("usage sink %r failed", sink_name(sink))
                    continue
                # The store is out of reach or full (an outage, not a defect): one line, no traceback.
                log.warning("usage sink %r could not store record %s (%r); retrying", sink_name(sink), record.id, e)
                self.pending.add(
                    f"usage record {record.id} in sink {sink_name(sink)!r}",
                    functools.partial(_store, sink, record, stored_later),
                )
                failed = e
            except Exception:
                log.exception("usage sink %r failed", sink_name(sink))
            notify(self.pm.hook.store_written, store=f"usage:{sink_name(sink)}", seconds=time.monotonic() - started)
        if settle:
            await self.guard.settle(reservation, record, identity=identity, owned=owned)
        return failed

    async def aclose(self) -> None:
        """The last try of writes that failed, then the queued sinks drain together (each for its own bounded
        time) and close."""
        await self.pending.aclose()
        await asyncio.gather(*(queue.aclose() for queue in self.queues.values()))


async def _store(sink: UsageSink, record: UsageRecord, stored: Callable[[], None] | None) -> None:
    """A retry of the store of record; ``stored`` once it took the record."""
    await sink.record(record)
    if stored is not None:
        stored()
