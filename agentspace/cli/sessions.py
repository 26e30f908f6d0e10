"""``agentspace sessions``: list, show, search, export, compact and delete stored conversations."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

import click

from .common import CliState, config_options, count, money, pass_state, printable, table, warn_damaged
from .storage_access import cli_storage, on_storage

if TYPE_CHECKING:
    from ..storage.protocols import SessionStoreSync


def _sync_sessions(state: CliState) -> SessionStoreSync | None:
    """The session store when it can be read without an event loop (the data directory's files)."""
    from ..storage.protocols import SessionStoreSync

    sessions = cli_storage(state).sessions
    return sessions if isinstance(sessions, SessionStoreSync) else None


def _listing(state: CliState) -> Any:
    store = _sync_sessions(state)
    if store is not None:
        return store.listing_sync()
    return on_storage(state, lambda storage: storage.sessions.listing())


def _get(state: CliState, session_id: str) -> dict[str, Any] | None:
    from ..errors import SessionDamaged

    try:
        store = _sync_sessions(state)
        if store is not None:
            return store.get_sync(session_id)
        return on_storage(state, lambda storage: storage.sessions.get(session_id))
    except SessionDamaged as e:
        raise click.ClickException(e.message) from None


def _delete(state: CliState, session_id: str) -> bool:
    """Delete a session and the files no other session uses (docs/attachments.md)."""
    from ..storage.datadir_lock import DataDirLocked
    from ..storage.embedded.blobs import FileBlobStore

    store = _sync_sessions(state)
    if store is not None:
        try:
            deleted = bool(store.delete_sync(session_id))
        except DataDirLocked as e:  # a session that has no file yet: the running server holds it
            server = f"the server (pid {e.pid})" if e.pid else "the running server"
            raise click.ClickException(
                f"Session {session_id} has no file yet: {server} holds it. Delete it there (the web app, or"
                f" DELETE /api/sessions/{session_id}), or once the server stopped."
            ) from None
        if deleted:
            FileBlobStore(state.data_dir).release_sync(session_id)
        return deleted

    async def delete(storage: Any) -> bool:
        deleted = bool(await storage.sessions.delete(session_id))
        if deleted:
            await (storage.blobs or FileBlobStore(state.data_dir)).release(session_id)
        return deleted

    return bool(on_storage(state, delete))


def _not_found(session_id: str) -> click.ClickException:
    return click.ClickException(f"No session with id '{session_id}'. See: agentspace sessions list")


def _when(iso: str | None) -> str:
    # "2026-11-01T09:30:12.345Z" -> "2026-11-01 09:30" (UTC), enough to tell sessions apart.
    return (iso or "")[:16].replace("T", " ")


@click.group()
@config_options
def sessions() -> None:
    """List, show, search, export, compact and delete conversations."""


def _warn_damaged(damaged_files: list[str]) -> None:
    warn_damaged(damaged_files, "damaged file(s) in the sessions folder skipped")


@sessions.command("list")
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--limit", type=click.IntRange(min=1), help="The most recently active sessions to show (default: all).")
@pass_state
def list_sessions(state: CliState, as_json: bool, limit: int | None) -> None:
    """All sessions, most recently active first."""
    listing = _listing(state)
    items = listing.sessions  # most recently active first
    _warn_damaged(listing.damaged_files)
    if limit is not None and len(items) > limit:  # said, as a search says it
        items = items[:limit]
        click.echo(f"More sessions: these are the {limit} most recently active (--limit).", err=True)
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return
    if not items:
        click.echo("No sessions yet. Start one: agentspace chat")
        return
    rows = [
        (
            s["id"],
            _when(s.get("lastActivityAt")),
            s.get("messageCount", 0),
            s.get("model") or "",
            _clip(s.get("title") or "", 50),
        )
        for s in items
    ]
    click.echo(table(("id", "last activity (UTC)", "messages", "model", "title"), rows, right=(2,)))


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _message_header(m: dict[str, Any]) -> str:
    bits = [m.get("role", "?")]
    if m.get("model"):
        bits.append(m["model"])
    u = m.get("usage")
    if u:
        bits.append(
            f"{count(u.get('inputTokens'))} in / {count(u.get('outputTokens'))} out, "
            f"{money(float(u.get('totalCost') or 0.0))}"
        )
    if m.get("finishReason") and m.get("finishReason") != "stop":
        bits.append(m["finishReason"])
    if m.get("aborted"):
        bits.append("aborted")
    if m.get("replaced"):  # answered again since (a regenerate, an edit): kept, billed, resent to no model
        bits.append("set aside")
    return f"[{' · '.join(bits)}] {_when(m.get('createdAt'))}"


@sessions.command("show")
@config_options
@click.argument("session_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_state
def show(state: CliState, session_id: str, as_json: bool) -> None:
    """One session with its messages."""
    from ..export import attached

    session = _get(state, session_id)
    if session is None:
        raise _not_found(session_id)
    if as_json:
        click.echo(json.dumps(session, indent=2))
        return
    click.echo(f"{printable(session['id'])}  {printable(session.get('title') or '(untitled)')}")
    click.echo(
        f"model {printable(session.get('model') or '-')} · {session.get('messageCount', 0)} messages · "
        f"created {_when(session.get('createdAt'))} · last activity {_when(session.get('lastActivityAt'))}"
    )
    for m in session.get("messages", []):
        click.echo()
        click.secho(printable(_message_header(m)), bold=True)
        click.echo(printable(m.get("content") or "", lines=True))
        for part in m.get("parts") or ():
            if isinstance(part, dict) and part.get("type") == "file":  # a message may be files alone
                click.echo(printable(attached(part)))


@sessions.command("delete")
@config_options
@click.argument("session_id", metavar="ID")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@pass_state
def delete(state: CliState, session_id: str, yes: bool) -> None:
    """Delete a session and its messages (usage records are kept)."""
    if not yes:
        summary = _get(state, session_id)
        if summary is None:
            raise _not_found(session_id)
        # messageCount is what the conversation shows; the answers a regenerate or an edit set aside go too.
        shown = int(summary.get("messageCount") or 0)
        aside = sum(1 for m in summary.get("messages", []) if m.get("replaced"))
        held = f"{shown} messages shown, {aside} set aside" if aside else f"{shown} messages"
        click.confirm(f"Delete session {session_id} ({held})?", abort=True)
    if not _delete(state, session_id):
        raise _not_found(session_id)
    click.echo(f"Deleted session {session_id}")


@sessions.command("search")
@config_options
@click.argument("text")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option(
    "--limit", type=click.IntRange(min=1), default=200, show_default=True, help="The most recent matches to show."
)
@pass_state
def search(state: CliState, text: str, as_json: bool, limit: int) -> None:
    """Sessions whose title or messages contain TEXT (case-insensitive), most recently active first."""
    from ..storage.search import search_sessions, search_sessions_sync

    if not text.strip():
        raise click.UsageError("TEXT must not be empty.")
    store = _sync_sessions(state)
    if store is not None:
        listing = store.listing_sync()
        found = search_sessions_sync(listing.sessions, store.get_sync, text, limit=limit + 1)
        _warn_damaged(listing.damaged_files)
    else:
        found = on_storage(state, lambda storage: search_sessions(storage.sessions, text, limit=limit + 1)).sessions
    if len(found) > limit:  # said, not left out unseen: the older matches are there to be asked for
        found = found[:limit]
        click.echo(f"More sessions contain {text!r}: these are the {limit} most recent (--limit).", err=True)
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    if not found:
        click.echo(f"No session contains {text!r}.")
        return
    rows = [
        (s["id"], _when(s.get("lastActivityAt")), _clip(s.get("title") or "", 30), _clip(s["match"], 70)) for s in found
    ]
    click.echo(table(("id", "last activity (UTC)", "title", "match"), rows))


@sessions.command("export")
@config_options
@click.argument("session_id", metavar="ID")
@click.option("--format", "fmt", type=click.Choice(["md", "json"]), default="md", show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True), help="Write to this file.")
@pass_state
def export(state: CliState, session_id: str, fmt: str, output: str | None) -> None:
    """A session as Markdown or JSON, on standard output or into a file."""
    from ..export import export_session

    session = _get(state, session_id)
    if session is None:
        raise _not_found(session_id)
    document, _ = export_session(session, fmt)
    if output is None:
        # On a terminal, stored text (a title, a message) must not send it escapes; piped, the export is as is.
        click.echo(printable(document, lines=True) if sys.stdout.isatty() else document, nl=False)
        return
    with open(output, "w", encoding="utf-8") as f:
        f.write(document)
    click.echo(f"Wrote {output}", err=True)


@sessions.command("compact")
@config_options
@click.argument("session_id", metavar="ID")
@click.option("--url", envvar="AGENTSPACE_URL", help="Gateway WebSocket URL (default: from [server] of the config).")
@click.option("--token", envvar="AGENTSPACE_TOKEN", help="Gateway token (default: the data directory's).")
@pass_state
def compact(state: CliState, session_id: str, url: str | None, token: str | None) -> None:
    """Summarise every turn of a session but the latest (asks the running gateway; the call is billed)."""
    import asyncio

    from .client import GatewayConnection, default_url, resolve_token
    from .common import new_id

    async def run(url: str, token: str) -> dict[str, Any]:
        async with GatewayConnection(url, token) as gateway:
            return await gateway.request({"type": "session.compact", "id": new_id(), "sessionId": session_id})

    reply = asyncio.run(run(url or default_url(state), resolve_token(state, token)))
    if not reply.get("compacted"):
        click.echo(f"Nothing to compact in {session_id}: it has one turn or none since its last summary.")
        return
    click.echo(f"Compacted {session_id}: {reply['summarizedMessages']} messages summarised.\n")
    click.echo(printable(reply.get("summary") or "", lines=True))  # a model's text, stored in the session
