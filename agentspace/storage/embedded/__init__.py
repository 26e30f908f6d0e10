"""The ``tinydb`` backend: sessions, usage records and clients as files in the data directory, for one
server process (the data-directory lock)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from ..protocols import Storage, UsageStoreSink

if TYPE_CHECKING:
    from ...config import Config


class EmbeddedBackend:
    name = "tinydb"

    def open(self, config: Config) -> Storage:
        from .clients import ClientStore
        from .sessions import SessionStore
        from .store_thread import write_problem
        from .usage import UsageStore

        # One usage store per process: the sink of record writes into the store the reports and the guard read.
        usage = UsageStore(config.data_dir)
        return Storage(
            self.name,
            SessionStore(config.data_dir),
            usage,
            sink=UsageStoreSink(usage, self.name),
            clients=ClientStore(config.data_dir),
            writable=functools.partial(write_problem, config.data_dir),
        )
