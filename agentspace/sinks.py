"""Usage sinks receive every usage record. The built-in one writes to the tinydb usage store."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol, runtime_checkable

from .types import UsageRecord


@runtime_checkable
class UsageSink(Protocol):
    name: str

    def record(self, record: UsageRecord) -> Awaitable[None]:
        """Persist or forward one record: usually ``async def``; any callable returning an awaitable will do.
        The turn waits for it (the record is stored before the answer). ``StorageError`` or ``OSError`` (the
        sink's store failed) ends the turn with STORAGE_ERROR and the record is offered again later; other
        exceptions are logged and do not affect other sinks."""
        ...
