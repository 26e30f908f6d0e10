"""The one storage interface (README.md#running-several-replicas): what a backend provides, whatever keeps the data.

A backend (``StorageBackend``) is registered by a plugin through ``register_storage_backends`` and chosen
by ``[storage] backend``; the built-in ``tinydb`` (files in the data directory, one process) and
``postgres`` (``[storage] dsn``, any number of replicas) are registered the same way
(``agentspace.default_plugins.storage``). ``open(config)`` returns a ``Storage``: the session store and
the usage store with its reports, both speaking the protocols below, plus the backend's own facts (does
it need the data-directory lock, can several processes share it). ``tests/test_storage_contract.py`` runs
one suite against every backend.

Errors are the same everywhere: ``SessionExists``, ``SessionNotFound``, ``MessageNotFound``,
``InvalidSessionId`` (``storage.errors``), ``errors.SessionDamaged`` and ``errors.StorageError`` (the
store could not be used: nothing was stored, the same call may be retried).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, cast, runtime_checkable

if TYPE_CHECKING:
    from ..clients import Client
    from ..config import Config
    from ..sinks import UsageSink
    from ..types import UsageRecord
    from .shapes import LedgerEntry, Listing


@runtime_checkable
class SessionStoreAPI(Protocol):
    """Sessions and their messages: a summary is a ``shapes.SessionSummary``, ``get`` gives a
    ``shapes.StoredSession`` (the summary and its ``messages``, oldest first, each a ``shapes.StoredMessage``)."""

    async def create(
        self,
        *,
        model: str,
        session_id: str | None = None,
        title: str | None = None,
        client: str | None = None,
        messages: Sequence[dict[str, Any]] = (),
        sync: bool = True,
    ) -> dict[str, Any]: ...

    async def get(self, session_id: str) -> dict[str, Any] | None: ...

    async def exists(self, session_id: str) -> bool: ...

    async def summaries(self) -> list[dict[str, Any]]: ...

    async def listing(self) -> Listing: ...

    async def append_message(self, session_id: str, message: dict[str, Any], *, sync: bool = True) -> None: ...

    def awaiting_sync(self, session_id: str | None) -> Awaitable[None] | None:
        """``sync=False`` writes are visible at once and durable once this (when not None) was awaited."""

    async def update_message(self, session_id: str, message_id: str, changes: dict[str, Any]) -> None: ...

    async def set_aside(self, session_id: str, message_ids: Sequence[str]) -> None:
        """The messages ``message_ids`` set aside (``replaced``: an edit or a regenerate) in one write, all or
        none. Raises SessionNotFound or MessageNotFound (then none is). Optional: ``set_aside_of``."""

    async def messages(self, session_id: str, limit: int | None = None) -> list[dict[str, Any]]: ...

    async def set_title(self, session_id: str, title: str) -> None: ...

    async def touch(self, session_id: str) -> None: ...

    async def delete(self, session_id: str) -> bool: ...

    async def flush(self) -> None: ...

    async def aclose(self) -> None: ...


async def set_aside_of(sessions: SessionStoreAPI, session_id: str, message_ids: Sequence[str]) -> None:
    """``sessions.set_aside``; one ``update_message`` after another by a session store without it (a backend
    written before it): not atomic, and a write each."""
    set_aside = getattr(sessions, "set_aside", None)
    if set_aside is not None:
        await set_aside(session_id, message_ids)
        return
    for message_id in message_ids:
        await sessions.update_message(session_id, message_id, {"replaced": True})


@runtime_checkable
class UsageStoreAPI(Protocol):
    """Usage records (``shapes.StoredUsageRecord``: ``UsageRecord.to_dict()``), append-only; a record whose id
    is stored already changes nothing. ``append`` returns once the record is durable, and raises StorageError
    when it is not. ``report`` gives a ``shapes.UsageReport``."""

    async def append(self, record: UsageRecord) -> None: ...

    async def report(
        self,
        *,
        by: str = "model",
        since: datetime | None = None,
        session_id: str | None = None,
        client: str | None = None,
    ) -> dict[str, Any]:
        """The report ``by`` names (``storage.reports.REPORTS``: per model, day, client, session, day and model),
        ``grandTotal`` and ``damagedFiles``; of one client's records when ``client`` is given."""
        ...

    async def records(
        self, *, since: datetime | None = None, session_id: str | None = None, client: str | None = None
    ) -> list[dict[str, Any]]: ...

    async def spend(
        self, *, client: str, since: datetime | None, posting: Callable[[], Mapping[str, str]]
    ) -> tuple[float, set[str]]:
        """What ``client``'s records since ``since`` cost (their ``totalCost``, summed from the rollups: the time
        grows with the groups, not the records), and which of the records being stored (``posting()``: id ->
        timestamp, the ones stored and not yet settled in the budgets, ``limits.Guard``) that sum counts, both
        in one view of the store."""
        ...

    async def flush(self) -> None: ...

    async def aclose(self) -> None: ...


async def spend_of(
    usage: UsageStoreAPI, *, client: str, since: datetime | None, posting: Callable[[], Mapping[str, str]]
) -> tuple[float, set[str]]:
    """``usage.spend``; summed from the records by a usage store without it (a backend written before it)."""
    spend = getattr(usage, "spend", None)
    if spend is not None:
        return cast("tuple[float, set[str]]", await spend(client=client, since=since, posting=posting))
    records = await usage.records(since=since, client=client)
    return sum(float(r.get("totalCost") or 0.0) for r in records), {str(r.get("id")) for r in records} & set(posting())


@runtime_checkable
class ClientStoreAPI(Protocol):
    """The clients (README.md#teams-and-budgets): the async API of ``storage.embedded.clients.ClientStore`` (``Client`` objects of
    ``agentspace.clients``; only key hashes are stored). ``add``/``rotate`` return the new key; ``update``
    applies ``change(client)``; unknown names raise ``ClientNotFound``, a taken name ``ClientExists``."""

    async def get_by_key(self, key: str) -> Client | None: ...

    async def get_by_hash(self, key_hash: str) -> Client | None: ...

    async def get(self, name: str) -> Client | None: ...

    async def list(self) -> list[Client]: ...

    async def add(self, client: Client) -> str: ...

    async def update(self, name: str, change: Callable[[Client], None]) -> Client: ...

    async def rotate(self, name: str) -> str: ...

    async def remove(self, name: str) -> None: ...

    def should_touch(self, key: str, monotonic_now: float) -> bool: ...

    async def touch(self, name: str, when: datetime | None = None) -> None: ...


# A store whose data a command can read without an event loop (files in the data directory) also speaks
# the sync protocol of its kind; the CLI asks ``isinstance`` and never the backend's name.


@runtime_checkable
class SessionStoreSync(Protocol):
    def get_sync(self, session_id: str) -> dict[str, Any] | None: ...

    def listing_sync(self) -> Listing: ...

    def delete_sync(self, session_id: str) -> bool: ...


@runtime_checkable
class UsageStoreSync(Protocol):
    def report_sync(
        self,
        *,
        by: str = "model",
        since: datetime | None = None,
        session_id: str | None = None,
        client: str | None = None,
    ) -> dict[str, Any]: ...

    def records_sync(
        self, *, since: datetime | None = None, session_id: str | None = None, client: str | None = None
    ) -> Iterable[dict[str, Any]]: ...


@runtime_checkable
class ClientStoreSync(Protocol):
    def get_sync(self, name: str) -> Client | None: ...

    def list_sync(self) -> list[Client]: ...

    def add_sync(self, client: Client) -> str: ...

    def update_sync(self, name: str, change: Callable[[Client], None]) -> Client: ...

    def rotate_sync(self, name: str) -> str: ...

    def remove_sync(self, name: str) -> None: ...


class SharedLedger(Protocol):
    """The pending entries of the provider calls in flight, shared by the replicas of one database under
    leases (``storage/ledger.py`` writes each entry here as well as in its own journal)."""

    async def start(self, recover: Callable[[dict[str, Any]], Awaitable[bool]]) -> None: ...

    async def pending(self, entry: LedgerEntry) -> None: ...

    def note(self, entry_id: str, fields: dict[str, Any], soon: bool = True) -> None: ...

    def closed(self, entry_id: str) -> None: ...

    async def flush(self) -> None: ...

    async def aclose(self) -> None: ...


@dataclass
class Storage:
    """What a backend opened for one server process (or one CLI command).

    ``sink``: the usage sink that writes into ``usage``, the store of record (None when a plugin registers it);
    ``clients``: the backend's client store (None: the clients feature's own file store in the data
    directory); ``uses_data_dir_lock``: only one process may use the data (tinydb); ``shared``: several
    replicas may use it at once (then ``agentspace serve --workers N`` is allowed); ``shared_ledger``: opens,
    for one replica, the ledger the replicas share (None: each process's journal is all there is)."""

    backend: str
    sessions: SessionStoreAPI
    usage: UsageStoreAPI
    sink: UsageSink | None = None
    clients: ClientStoreAPI | None = None
    uses_data_dir_lock: bool = True
    shared: bool = False
    database: Database | None = None
    shared_ledger: Callable[[str], SharedLedger] | None = None
    # The bytes of the sessions' files (None: the file blob store in the data directory, storage/embedded/blobs.py).
    blobs: BlobStoreAPI | None = None
    # Without a database: whether the store takes writes (None when it does, else why not), for ``health``.
    writable: Callable[[], Awaitable[str | None]] | None = None

    async def start(self) -> None:
        """Connect, migrate: what must happen before the first request."""
        if self.database is not None:
            await self.database.start()

    async def health(self) -> str | None:
        """None when the storage answers; else what is wrong (``/healthz`` answers 503 with it)."""
        if self.database is not None:
            return await self.database.health()
        return await self.writable() if self.writable is not None else None

    async def aclose(self) -> None:
        """After the stores closed: the connections go."""
        if self.database is not None:
            await self.database.aclose()


class Database(Protocol):
    """A backend's connection to a database server, shared by its stores."""

    async def start(self) -> None: ...

    async def health(self) -> str | None: ...

    async def aclose(self) -> None: ...


class UsageStoreSink:
    """A usage sink that writes every record into a usage store: what a backend without a sink plugin of
    its own returns as ``Storage.sink``: the store of record, awaited before a turn ends."""

    delivery = "record"

    def __init__(self, store: UsageStoreAPI, name: str) -> None:
        self.store = store
        self.name = name

    async def record(self, record: UsageRecord) -> None:
        await self.store.append(record)


class StorageBackend(Protocol):
    name: str

    def open(self, config: Config) -> Storage: ...


@runtime_checkable
class BlobStoreAPI(Protocol):
    """Content-addressed bytes with the sessions that use them."""

    async def put(self, sha256: str, data: bytes, session_id: str) -> None:
        """Keep ``data`` (whose hash is ``sha256``) for ``session_id``; durable once awaited."""

    async def get(self, sha256: str) -> bytes | None: ...

    async def release(self, session_id: str) -> list[str]:
        """Forget every blob ``session_id`` used; delete those no other session uses (their hashes)."""

    async def hashes(self) -> list[str]: ...

    async def sessions_of(self, sha256: str) -> list[str]: ...
