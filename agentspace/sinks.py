"""Usage sinks receive every usage record. The built-in one writes to the tinydb usage store."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .types import UsageRecord


@runtime_checkable
class UsageSink(Protocol):
    name: str

    async def record(self, record: UsageRecord) -> None:
        """Persist or forward one record. Exceptions are logged and do not affect other sinks."""
        ...
