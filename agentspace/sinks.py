"""Usage sinks receive every usage record (docs/plugins.md, ``register_usage_sinks``).

The store of record (the sink the storage backend brings: it writes into the backend's usage store) is awaited before a
turn ends: it is the only write that can fail a turn. Every other sink is fed through a queue of its own
(``sink_queue.SinkQueue``): bounded, with one worker task that calls the sink, retries with backoff and
drains at shutdown, so a slow or failing sink never delays or changes what a client sees.

Delivery to a queued sink is at-least-once while the process lives: a record is retried until the sink
takes it (or raises ``DropRecord``), also at shutdown for up to ``drain_seconds``. What is still queued
when the process dies (a crash, a kill, or the drain time running out) is lost for that sink; the store of
record has it, so it can be replayed from ``agentspace usage``.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol, runtime_checkable

from .types import UsageRecord

QUEUE_SIZE = 10_000  # records waiting per sink; beyond that new records are dropped (and counted)
RECORD_TIMEOUT_SECONDS = 30.0  # one call of ``record``; then it counts as failed and is retried
RETRY_FIRST_SECONDS = 0.5  # backoff after the first failure, doubled after each further one ...
RETRY_MAX_SECONDS = 30.0  # ... up to this
DRAIN_SECONDS = 5.0  # at shutdown, how long the queues get to empty
START_WAIT_SECONDS = 5.0  # how long the server's start waits for a sink's ``start`` (which goes on meanwhile)
CLOSE_SECONDS = 5.0  # at shutdown, how long a sink's ``aclose`` may take
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


# The methods a sink may define besides ``record``, each documented in docs/plugins.md.
OPTIONAL_SINK_METHODS = ("start", "aclose")


class DropRecord(Exception):
    """Raised by a sink's ``record`` for a record it can never take: logged, counted, not retried."""


# A sink's optional attributes (docs/plugins.md) and what each must be.
SINK_ATTRIBUTES = {
    "queue_size": "a positive integer",
    "record_timeout_seconds": "a positive number of seconds",
    "retry_max_seconds": "a positive number of seconds",
    "drain_seconds": "a number of seconds, 0 or more",
}


def attribute_problem(sink: object) -> str | None:
    """What is wrong with a sink's optional attributes, or None: checked when it registers, as a wrong one would
    stop the start with a traceback naming no plugin (None), or fail or drop every record (0)."""
    for attribute, what in SINK_ATTRIBUTES.items():
        if not hasattr(sink, attribute):
            continue
        value = getattr(sink, attribute)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if attribute == "queue_size":
            ok = number and isinstance(value, int) and value >= 1
        elif attribute == "drain_seconds":
            ok = number and value >= 0
        else:
            ok = number and value > 0
        if not ok:
            return f"usage sink {sink_name(sink)!r}: {attribute} must be {what}, got {value!r}"
    return None


def sink_name(sink: object) -> str:
    return str(getattr(sink, "name", None) or type(sink).__name__)


def delivery(sink: object) -> str:
    """How ``recording.Recorder`` calls ``sink``: ``record`` (the store of record: awaited, its failure fails the turn),
    ``inline`` (awaited, never fails a turn: for sinks that only count in memory, like the metrics one) or
    ``queued`` (the default: a ``SinkQueue``)."""
    value = getattr(sink, "delivery", "queued")
    return value if value in ("record", "inline") else "queued"
