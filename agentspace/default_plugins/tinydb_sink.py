"""The built-in usage sink: every usage record goes to the tinydb UsageStore in the data directory.

A plugin like any other. The server closes it (``aclose``) on shutdown and reaches the store it
opened through ``.store``, so one process keeps one UsageStore.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from agentspace.hookspecs import hookimpl
from agentspace.storage.embedded.usage import UsageStore
from agentspace.types import UsageRecord

if TYPE_CHECKING:
    from agentspace.config import Config
    from agentspace.sinks import UsageSink


class TinyDBUsageSink:
    name = "tinydb"
    delivery = "record"  # the store of record: awaited before the turn ends (agentspace.sinks)

    def __init__(self, store_factory: Callable[[], UsageStore]) -> None:
        self._store_factory = store_factory
        self._store: UsageStore | None = None

    @property
    def store(self) -> UsageStore:
        """The sink's UsageStore, opened on first use."""
        if self._store is None:
            self._store = self._store_factory()
        return self._store

    async def record(self, record: UsageRecord) -> None:
        await self.store.append(record)

    async def aclose(self) -> None:
        if self._store is not None:
            await self._store.aclose()
            self._store = None


@hookimpl
def register_usage_sinks(register: Callable[[UsageSink], None], config: Config) -> None:
    if config["storage"]["backend"] != "tinydb":
        return  # the chosen backend brings its own sink
    register(TinyDBUsageSink(lambda: UsageStore(config.data_dir)))
