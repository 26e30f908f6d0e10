"""The configured storage backend (``[storage] backend``) for one CLI command.

``sessions`` and ``clients`` read and write through the same storage interface the server uses, so with
``backend = "postgres"`` they see the database, not the data directory's files.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import click

from .common import CliState

if TYPE_CHECKING:
    from ..storage.protocols import Storage

T = TypeVar("T")


def on_storage(state: CliState, work: Callable[[Storage], Awaitable[T]]) -> T:
    """``work(storage)`` run on the opened and started storage, which is closed afterwards.

    A storage that cannot be used (database unreachable, backend unknown) is a clean CLI error."""
    import asyncio  # here, not at the top: ``agentspace usage`` on tinydb starts without it

    from ..default_plugins.storage import open_storage
    from ..errors import StorageError

    async def run() -> T:
        storage = open_storage(state.config())
        try:
            await storage.start()
            return await work(storage)
        finally:
            await storage.sessions.aclose()
            await storage.usage.aclose()
            await storage.aclose()

    try:
        return asyncio.run(run())
    except StorageError as e:
        raise click.ClickException(e.message) from None
