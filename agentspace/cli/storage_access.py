"""The configured storage backend (``[storage] backend``) for one CLI command.

The commands read and write through the same storage interface the server uses, so with
``backend = "postgres"`` they see the database, not the data directory's files. A store that can be read
without an event loop (the embedded backend's files) says so by speaking the sync protocols of
``storage.protocols`` (``SessionStoreSync``, ``UsageStoreSync``, ``ClientStoreSync``): the command then
reads it directly, without starting asyncio.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import click

from .common import CliState

if TYPE_CHECKING:
    from ..storage.protocols import Storage

T = TypeVar("T")


def cli_storage(state: CliState) -> Storage:
    """The configured backend's storage, opened (nothing is connected or read yet). The built-in backends
    open without loading the plugins, which a command would wait for; a backend a plugin registers loads them."""
    from ..errors import StorageError
    from ..storage.backends import builtin_backend

    config = state.config()
    backend = builtin_backend(str(config["storage"]["backend"]))
    try:
        if backend is not None:
            storage = backend.open(config)
        else:
            from ..default_plugins.storage import open_storage

            storage = open_storage(config)
    except StorageError as e:
        raise click.ClickException(e.message) from None
    if storage.uses_data_dir_lock:
        from ..storage.datadir_lock import STORAGE_FILE, read_server_storage

        served_from = read_server_storage(state.data_dir)
        if served_from is not None:  # this command would read files that server no longer reads or writes
            raise click.ClickException(
                f"The gateway on {state.data_dir} keeps sessions, usage and clients in its {served_from} store, "
                "not in this data directory's files: pass that server's config (--config FILE, or set "
                f"AGENTSPACE_CONFIG). To use the files anyway, delete {Path(state.data_dir) / STORAGE_FILE}."
            )
    if storage.uses_data_dir_lock and sys.stderr.isatty():
        state.say_data_dir()  # a person sees which data directory the command reads
    return storage


def on_storage(state: CliState, work: Callable[[Storage], Awaitable[T]]) -> T:
    """``work(storage)`` run on the opened and started storage, which is closed afterwards.

    A storage that cannot be used (database unreachable, backend unknown) is a clean CLI error."""
    import asyncio  # here, not at the top: a command on the embedded backend starts without it

    from ..errors import StorageError

    async def run() -> T:
        storage = cli_storage(state)
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
