"""``agentspace doctor``: check every store file and the secrets files, and say what is wrong.

Reads only (it works while the server runs, and moves nothing): every session file, usage segment and usage
rollup must parse, damaged files moved aside earlier (ledger journals and the clients file too) are listed, and
``keys.json``, ``gateway-token`` and ``clients.json`` must be readable, parseable and private (mode 0600):
a clients file the server cannot trust or parse admits no client key. With the postgres backend the sessions,
usage and clients are in the database and only the ledger journals and secrets files are checked. Exits 1 when
anything is wrong.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import click

from .common import CliState, config_options, pass_state, printable


def _private(path: Path) -> str | None:
    """What is wrong with the file's mode, or None (POSIX modes only)."""
    if os.name == "nt":
        return None
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        return f"mode {mode:04o}: readable or writable by other users (fix: chmod 600 {path})"
    return None


def _read_secret(path: Path) -> tuple[bytes | None, list[str]]:
    """The file's bytes (None when missing or unreadable) and what is wrong with its mode or its reading."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, []
    except OSError as e:
        return None, [f"{path}: cannot be read ({e.strerror or e})"]
    return raw, [] if (mode := _private(path)) is None else [f"{path}: {mode}"]


def _check_keys(path: Path) -> list[str]:
    raw, problems = _read_secret(path)
    if raw is None:
        return problems
    try:
        data = json.loads(raw)
    except ValueError as e:
        return [
            f"{path}: not valid JSON ({e}); fix it, or remove it and add the keys again (agentspace keys add)",
            *problems,
        ]
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, dict) or not all(isinstance(v, str) for v in keys.values()):
        problems.insert(0, f'{path}: expected {{"keys": {{NAME: KEY}}}}; fix it, or remove it and add the keys again')
    return problems


def _check_token(path: Path) -> list[str]:
    if path.is_symlink():
        return [f"{path}: a symbolic link; remove it and run: agentspace token --rotate"]
    raw, problems = _read_secret(path)
    if raw is None:
        return problems
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return [f"{path}: not UTF-8 text; run: agentspace token --rotate", *problems]
    if not text:
        problems.insert(0, f"{path}: empty; run: agentspace token --rotate")
    return problems


def _check_clients(path: Path) -> tuple[int, list[str]]:
    """How many clients ``clients.json`` holds, and what keeps the server from using it: the checks of its
    every read (``storage/embedded/clients.py``), made here without changing the file."""
    from ..clients import Client

    if path.is_symlink():
        return 0, [f"{path}: a symbolic link; the server admits no client key until it is a file of its own"]
    raw, problems = _read_secret(path)
    if raw is None:
        return 0, problems
    st = path.stat()
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        problems = [f"{path}: belongs to another user (uid {st.st_uid}); the server admits no client key"]
    elif st.st_mode & 0o022:
        problems = [f"{path}: writable by other users; the server admits no client key until: chmod 600 {path}"]
    fix = "restore it, or move it away and add the clients again (agentspace clients add)"
    try:
        data = json.loads(raw) if raw.strip() else {}
    except ValueError as e:
        return 0, [f"{path}: not valid JSON ({e}); the server moves it aside and admits no client key; {fix}"]
    clients = data.get("clients", {}) if isinstance(data, dict) else None
    if not isinstance(clients, dict):
        return 0, [f'{path}: expected {{"clients": {{NAME: CLIENT}}}}; {fix}', *problems]
    good = 0
    for name, stored in clients.items():
        try:
            Client.from_stored(stored)
            good += 1
        except (KeyError, TypeError, ValueError, AttributeError):
            problems.append(
                f"{path}: client {name!r} cannot be read (its key is refused); restore it, or remove it and add it "
                f"again (agentspace clients remove {name})"
            )
    return good, problems


def _check_rollups(folder: Path) -> list[str]:
    """The usage rollups that do not parse, and those moved aside: the reports' cache of closed segments, written
    whole, so damaged from outside; a report rebuilds them from the segments (nothing is lost)."""
    from ..storage.atomic import StoreCorrupt, is_damaged_copy, read_json

    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return []
    problems = []
    for name in names:
        path = folder / name
        if is_damaged_copy(name):
            problems.append(f"{path}: damaged usage rollup (kept for inspection; rebuilt from its segments)")
        elif name.endswith(".json") and not name.startswith("."):
            try:
                read_json(path)
            except StoreCorrupt:
                problems.append(f"{path}: damaged usage rollup (the next report moves it aside and rebuilds it)")
            except OSError as e:
                problems.append(f"{path}: cannot be read ({e.strerror or e})")
    return problems


@click.command()
@config_options
@pass_state
def doctor(state: CliState) -> None:
    """Check the stores and the secrets files; exit 1 when something is wrong."""
    from ..gateway_token import token_path
    from ..storage.atomic import is_damaged_copy
    from ..storage.embedded.clients import FILE_NAME as CLIENTS_FILE
    from ..storage.embedded.sessions import SessionStore
    from ..storage.embedded.usage import ROLLUPS, UsageStore
    from ..storage.protocols import SessionStoreSync
    from ..vault import KEYS_FILE
    from .storage_access import cli_storage

    data_dir = Path(state.data_dir)
    problems: list[str] = []
    # A backend whose sessions are not the data directory's files (PostgreSQL) keeps sessions, usage and clients
    # in its own store, not in these files.
    storage = cli_storage(state)
    in_database = not isinstance(storage.sessions, SessionStoreSync)
    if in_database:
        click.echo(f"sessions, usage and clients: in the {storage.backend} store ([storage] backend), not checked here")
    else:
        listing = SessionStore(data_dir).listing_sync(whole=True)
        problems += [
            f"{path}: damaged session file (kept for inspection; not served)" for path in listing.damaged_files
        ]
        click.echo(f"sessions: {len(listing.sessions)} readable, {len(listing.damaged_files)} damaged")

        damaged: list[str] = []
        count = sum(1 for _ in UsageStore(data_dir).records_sync(damaged=damaged))
        problems += [f"{path}: damaged usage segment (kept for inspection; not counted)" for path in damaged]
        click.echo(f"usage: {count:,} records readable, {len(damaged)} damaged files")
        rollups = _check_rollups(data_dir / "usage" / ROLLUPS)
        problems += rollups
        if rollups:
            click.echo(f"usage rollups: {len(rollups)} damaged (rebuilt from the segments)")

    # A journal is a running server's, or a stopped one's that the next start posts; a damaged one was moved
    # aside by a start that posted what it still showed.
    ledger = sorted((data_dir / "ledger").glob("journal-*")) if (data_dir / "ledger").is_dir() else []
    aside = [path for path in ledger if is_damaged_copy(path.name)]
    problems += [
        f"{path}: damaged ledger journal (kept for inspection; the calls it showed were posted)" for path in aside
    ]
    click.echo(f"ledger: {len(ledger) - len(aside)} journal(s), {len(aside)} damaged")

    if not in_database:
        clients_file = data_dir / CLIENTS_FILE
        count, clients_problems = _check_clients(clients_file)
        copies = sorted(data_dir.glob(f"{CLIENTS_FILE}.*")) if data_dir.is_dir() else []
        copies = [path for path in copies if is_damaged_copy(path.name)]
        problems += clients_problems
        problems += [
            f"{path}: damaged clients file (kept for inspection; its clients are not admitted)" for path in copies
        ]
        click.echo(f"clients: {count} readable, {len(copies)} damaged file(s)")

    secrets = _check_keys(data_dir / KEYS_FILE) + _check_token(token_path(data_dir))
    problems += secrets
    click.echo(f"secrets: {'ok' if not secrets else f'{len(secrets)} problem(s)'}")

    if problems:
        click.echo(f"\n{len(problems)} problem(s) in {data_dir}:")
        for problem in problems:
            click.echo(f"  {printable(problem)}")
        raise SystemExit(1)
    click.echo(f"\nNo problems found in {data_dir}.")
