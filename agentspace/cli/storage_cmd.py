"""``agentspace storage migrate --to DSN``: copy the tinydb data directory into PostgreSQL (docs/deploy.md): the
sessions, the usage records and the client keys (their hashes: every key keeps working).

Resumable and idempotent: each session is copied in its own transaction and skipped when the database
has it already; usage records go in batches keyed by their unique id, so records stored by an earlier
(interrupted) run are not stored twice. A second run copies nothing. Sessions changed in the data
directory after they were copied are not copied again: migrate once the tinydb server has stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .common import CliState, config_options, pass_state

BATCH = 1000


@click.group()
def storage() -> None:
    """Storage backends: move data between them."""


@storage.command()
@config_options
@click.option("--to", "dsn", required=True, metavar="DSN", help="The PostgreSQL database, postgresql://user@host/db.")
@pass_state
def migrate(state: CliState, dsn: str) -> None:
    """Copy the sessions, usage records and client keys of the data directory into PostgreSQL."""
    import asyncio  # here: the other commands start without it

    from ..errors import StorageError
    from ..private_files import PrivateFileError
    from ..storage.datadir_lock import server_pid
    from ..storage.embedded.clients import ClientStore
    from ..storage.embedded.sessions import SessionStore
    from ..storage.embedded.usage import UsageStore

    data_dir = state.data_dir
    # A session continued after its copy is "already there" for a second run: its later messages would be lost.
    pid = server_pid(Path(data_dir))
    if pid is not None:
        who = f"the agentspace server (pid {pid})" if pid else "an agentspace server"
        raise click.ClickException(f"{who} is running on {data_dir}: stop it, then migrate")
    sessions = SessionStore(data_dir)
    listing = sessions.listing_sync()
    damaged: list[str] = []
    records = list(UsageStore(data_dir).records_sync(damaged=damaged))
    for path in sorted(set(damaged + listing.damaged_files)):
        click.echo(f"skipped (damaged): {path}", err=True)
    try:
        clients = ClientStore(data_dir).list_sync()
    except PrivateFileError as e:  # a clients file we may not trust is not copied into the database either
        raise click.ClickException(e.message) from None
    try:
        summary = asyncio.run(_copy(dsn, sessions, [s["id"] for s in listing.sessions], records, clients))
    except StorageError as e:
        raise click.ClickException(e.message) from None
    click.echo(
        f"sessions: {summary['sessions']} copied, {summary['sessions_there']} already there; "
        f"usage records: {summary['records']} copied, {summary['records_there']} already there; "
        f"clients: {summary['clients']} copied, {summary['clients_there']} already there; "
        f"files: {summary['files']} copied"
    )
    for name in summary["other_keys"]:
        click.echo(
            f"client {name!r} is in the database already, with another key: the data directory's key for it "
            f"does not work there (to carry it over, remove it from the database with `agentspace clients remove "
            f"{name}` and migrate again)",
            err=True,
        )


async def _copy(
    dsn: str, sessions: Any, session_ids: list[str], records: list[dict[str, Any]], clients: list[Any]
) -> dict[str, Any]:
    from ..storage.embedded.blobs import FileBlobStore
    from ..storage.postgres import (
        PostgresBlobStore,
        PostgresClientStore,
        PostgresDatabase,
        PostgresSessionStore,
        PostgresUsageStore,
    )

    db = PostgresDatabase(dsn)
    await db.start()
    target_sessions, target_usage = PostgresSessionStore(db), PostgresUsageStore(db)
    target_clients = PostgresClientStore(db)
    source_blobs, target_blobs = FileBlobStore(sessions.dir.parent), PostgresBlobStore(db)
    summary: dict[str, Any] = dict.fromkeys(
        ("sessions", "sessions_there", "records", "records_there", "clients", "clients_there", "files"), 0
    )
    summary["other_keys"] = []  # clients of the same name added to the database before: their key wins
    try:
        with click.progressbar(length=len(session_ids) + len(records), label="Copying", file=None) as bar:
            for session_id in session_ids:
                session = sessions.get_sync(session_id)
                if session is not None:
                    copied = await target_sessions.copy_in(session)
                    summary["sessions" if copied else "sessions_there"] += 1
                    summary["files"] += await _copy_files(session, source_blobs, target_blobs)
                bar.update(1)
            for start in range(0, len(records), BATCH):
                batch = records[start : start + BATCH]
                new = await target_usage.copy_in(batch)
                summary["records"] += new
                summary["records_there"] += len(batch) - new
                bar.update(len(batch))
            for client in clients:
                if await target_clients.copy_in(client):
                    summary["clients"] += 1
                    continue
                summary["clients_there"] += 1
                there = await target_clients.get(client.name)
                if there is not None and there.key_hash != client.key_hash:
                    summary["other_keys"].append(client.name)
    finally:
        await db.aclose()
    return summary


async def _copy_files(session: dict[str, Any], source: Any, target: Any) -> int:
    """Copy the blobs of a session's files (attachments.py) with its reference; how many it has."""
    from ..attachments import stored_files

    count = 0
    for part in stored_files(session.get("messages") or []):
        sha256 = part.get("sha256")
        data = source.get_sync(str(sha256)) if sha256 else None
        if data is not None:
            await target.put(str(sha256), data, str(session["id"]))
            count += 1
    return count
