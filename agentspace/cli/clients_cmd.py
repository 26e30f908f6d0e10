"""``agentspace clients``: client keys with their budgets, rate limits and model allowlists.

Works on the configured storage directly: the data directory's clients file (a running server re-reads it
when it changes), or the backend's store (``[storage] backend = "postgres"``: every replica sees it). A key is printed once, by ``add`` and ``rotate``; only its hash is stored.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import click

from .common import CliState, config_options, money, pass_state, printable, table
from .storage_access import cli_storage, on_storage

if TYPE_CHECKING:
    from ..storage.protocols import Storage

T = TypeVar("T")

# Only a word clears a limit: an empty value (an unset shell variable, `--models "$ALLOWED"`) is refused, never
# read as "no limit".
NONE_WORDS = ("none", "off")


def _number(value: str | None, option: str, kind: type) -> Any:
    if value is None or value.strip().lower() in NONE_WORDS:
        return None
    try:
        return kind(value)
    except ValueError:
        raise click.BadParameter(
            f"expected a {'number' if kind is float else 'whole number'} or 'none'", param_hint=option
        ) from None


def _settings(
    budget: str | None, period: str | None, rpm: str | None, tpm: str | None, models: str | None
) -> dict[str, Any]:
    """The options given, as client settings (``none`` clears a limit)."""
    from ..clients import settings_problems

    settings: dict[str, Any] = {}
    if budget is not None:
        settings["budgetUsd"] = _number(budget, "--budget", float)
    if period is not None:
        settings["period"] = period
    if rpm is not None:
        settings["rpm"] = _number(rpm, "--rpm", int)
    if tpm is not None:
        settings["tpm"] = _number(tpm, "--tpm", int)
    if models is not None:  # 'none' clears the allowlist (every model), as it clears the other limits
        none = models.strip().lower() in NONE_WORDS
        settings["models"] = [] if none else [m.strip() for m in models.split(",") if m.strip()]
        if not none and not settings["models"]:
            raise click.BadParameter(
                "expected model patterns (anthropic/claude-haiku-*,...) or 'none'", param_hint="--models"
            )
    problems = settings_problems(settings)
    if problems:
        name, problem = next(iter(problems.items()))
        option = {"budgetUsd": "--budget"}.get(name, f"--{name}")
        raise click.BadParameter(problem, param_hint=option)
    return settings


def _limit_options(f: Any) -> Any:
    """The limit options, handed to the command as one ``settings`` dict (what ``_settings`` makes of them)."""
    from ..clients import PERIODS

    @functools.wraps(f)
    def with_settings(
        *args: Any,
        budget: str | None,
        period: str | None,
        rpm: str | None,
        tpm: str | None,
        models: str | None,
        **kwargs: Any,
    ) -> Any:
        return f(*args, settings=_settings(budget, period, rpm, tpm, models), **kwargs)

    g: Any = with_settings
    g = click.option(
        "--models",
        metavar="PATTERN,...",
        help="Allowed models (wildcards: anthropic/claude-haiku-*; 'none': every model).",
    )(g)
    g = click.option("--tpm", metavar="N", help="Tokens per minute ('none': no limit).")(g)
    g = click.option("--rpm", metavar="N", help="Requests per minute ('none': no limit).")(g)
    g = click.option("--period", type=click.Choice(PERIODS), help="Budget period (UTC; default month).")(g)
    g = click.option("--budget", metavar="USD", help="Budget in US dollars per period ('none': no budget).")(g)
    return g


def _had_usage(state: CliState, name: str) -> bool:
    """Whether usage was recorded under ``name`` before (a removed client's)."""
    from ..storage.protocols import UsageStoreSync

    try:
        store = cli_storage(state).usage
        if isinstance(store, UsageStoreSync):
            groups_sync = getattr(store, "groups_sync", None)  # the rollups' groups: no scan of every record
            if groups_sync is not None:
                return bool(groups_sync(client=name, sessions=False))
            return any(True for _ in store.records_sync(client=name))
        report = on_storage(state, lambda storage: storage.usage.report(by="client", client=name))
        return bool(report["perClient"])  # a group for any record (from the rollups, as every report)
    except Exception:  # noqa: BLE001 - only a note: an unreadable store must not fail the add
        return False


def _spend(state: CliState, client: Any, now: datetime, store: Any = None) -> float:
    """The client's spend in its current period; ``store``: the usage store opened once for several clients (a
    store keeps the rollups it read: every client's spend reads the same days)."""
    from ..clients import period_bounds
    from ..storage.protocols import UsageStoreSync

    start, _ = period_bounds(client.period, now)
    start = client.since if start is None else max(start, client.since or start)  # not an earlier namesake's
    store = cli_storage(state).usage if store is None else store
    # The report's total, from the rollups (and the open segment's records): not a scan of every record of the
    # period (seconds at a month of a busy client's calls, for each client listed), on either backend.
    if isinstance(store, UsageStoreSync):
        report = store.report_sync(by="client", since=start, client=client.name)
    else:
        report = on_storage(state, lambda storage: storage.usage.report(by="client", since=start, client=client.name))
    return float(report["grandTotal"].get("totalCost") or 0.0)


def _public(state: CliState, client: Any) -> dict[str, Any]:
    from ..clients import utc_now

    now = utc_now()
    return client.public(_spend(state, client, now), now)


def _store(state: CliState) -> Any:
    from ..private_files import check_data_dir
    from ..storage.embedded.clients import ClientStore
    from ..storage.protocols import ClientStoreSync

    # A backend without a client store of its own keeps the clients in the data directory.
    clients = cli_storage(state).clients
    store = clients if clients is not None else ClientStore(state.data_dir)
    if not isinstance(store, ClientStoreSync):
        return _BackendClients(state)
    check_data_dir(state.data_dir)
    return store


class _BackendClients:
    """The configured backend's client store behind the file store's sync API (one connection per call)."""

    def __init__(self, state: CliState) -> None:
        self.state = state

    def _run(self, work: Callable[[Any], Awaitable[T]]) -> T:
        def on(storage: Storage) -> Awaitable[T]:
            from ..storage.embedded.clients import ClientStore

            # A backend without a client store of its own keeps the clients in the data directory.
            return work(storage.clients if storage.clients is not None else ClientStore(self.state.data_dir))

        return on_storage(self.state, on)

    def get_sync(self, name: str) -> Any:
        return self._run(lambda store: store.get(name))

    def list_sync(self) -> list[Any]:
        return self._run(lambda store: store.list())

    def add_sync(self, client: Any) -> str:
        return self._run(lambda store: store.add(client))

    def update_sync(self, name: str, change: Any) -> Any:
        return self._run(lambda store: store.update(name, change))

    def rotate_sync(self, name: str) -> str:
        return self._run(lambda store: store.rotate(name))

    def remove_sync(self, name: str) -> None:
        self._run(lambda store: store.remove(name))


def _no_client(name: str) -> click.ClickException:
    return click.ClickException(f"No client {name!r}; see: agentspace clients list")


def _get(store: Any, name: str) -> Any:
    client = store.get_sync(name)
    if client is None:
        raise _no_client(name)
    return client


def _on_client(name: str, action: Callable[[], Any]) -> Any:
    """``action``'s result; a client that does not exist is a clear error."""
    from ..storage.errors import ClientNotFound

    try:
        return action()
    except ClientNotFound:
        raise _no_client(name) from None


def _limits(c: dict[str, Any]) -> str:
    parts = []
    if c["rpm"] is not None:
        parts.append(f"{c['rpm']} rpm")
    if c["tpm"] is not None:
        parts.append(f"{c['tpm']} tpm")
    if c["models"]:
        parts.append("models " + ",".join(c["models"]))
    return "; ".join(parts) or "-"


def _budget(c: dict[str, Any]) -> str:
    spend = money(c["spend"]["usd"])
    if c["budget"] is None:
        return f"{spend} (no budget)"
    return f"{spend} / {money(c['budget']['usd'])} {c['budget']['period']}"


@click.group()
def clients() -> None:
    """Client keys: one per person, app or agent, with budgets, rate limits and model allowlists."""


@clients.command("add")
@config_options
@click.argument("name")
@_limit_options
@pass_state
def add(state: CliState, name: str, settings: dict[str, Any]) -> None:
    """Add a client and print its key (shown this once)."""
    from ..clients import Client, apply_settings, name_problem
    from ..storage.errors import ClientExists
    from ..types import now_iso

    if (problem := name_problem(name)) is not None:
        raise click.BadParameter(problem, param_hint="NAME")
    client = Client(name=name, key_hash="", created_at=now_iso())
    apply_settings(client, settings)
    store = _store(state)
    try:
        key = store.add_sync(client)
    except ClientExists:
        if store.get_sync(name) is None:  # stored, but it cannot be read (damaged)
            raise click.ClickException(
                f"A client {name!r} is stored but cannot be read (see: agentspace doctor); to add it again, remove "
                f"it first: agentspace clients remove {name}"
            ) from None
        raise click.ClickException(f"A client {name!r} exists already; see: agentspace clients show {name}") from None
    click.echo(key)
    click.echo(f"Client {name!r} added. The key above is shown once: give it to the client now.", err=True)
    if _had_usage(state, name):
        click.echo(
            f"A removed client was called {name!r} before: this is a new client. It starts with no sessions, "
            "usage or spend; the earlier one's stay in the reports under the name.",
            err=True,
        )


@clients.command("list")
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON ({clients: [...]}, as GET /api/clients).")
@pass_state
def list_clients(state: CliState, as_json: bool) -> None:
    """Every client: created, last used, spend in the current period against its budget, limits."""
    from ..clients import utc_now

    now, listed = utc_now(), _store(state).list_sync()
    usage = cli_storage(state).usage if listed else None
    shown = [c.public(_spend(state, c, now, usage), now) for c in listed]
    if as_json:
        click.echo(json.dumps({"clients": shown}, indent=2))
        return
    if not shown:
        click.echo("No clients. Add one: agentspace clients add NAME")
        return
    rows = [[c["name"], c["createdAt"][:16], (c["lastUsedAt"] or "never")[:16], _budget(c), _limits(c)] for c in shown]
    click.echo(table(["name", "created", "last used", "spend / budget", "limits"], rows))


@clients.command("show")
@config_options
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_state
def show(state: CliState, name: str, as_json: bool) -> None:
    """One client's settings and spend."""
    c = _public(state, _get(_store(state), name))
    if as_json:
        click.echo(json.dumps(c, indent=2))
        return
    period = c["spend"]
    lines = [
        ("name", c["name"]),
        ("created", c["createdAt"]),
        ("last used", c["lastUsedAt"] or "never"),
        ("spend", _budget(c)),
        ("period", f"{period['periodStart']} .. {period['periodEnd']}" if period["periodStart"] else "total"),
        ("rpm", c["rpm"] if c["rpm"] is not None else "no limit"),
        ("tpm", c["tpm"] if c["tpm"] is not None else "no limit"),
        ("models", ", ".join(c["models"]) or "every model"),
    ]
    for label, value in lines:
        click.echo(f"{label + ':':<11}{printable(value)}")


@clients.command("set")
@config_options
@click.argument("name")
@_limit_options
@pass_state
def set_limits(state: CliState, name: str, settings: dict[str, Any]) -> None:
    """Change a client's budget, period, rate limits or models ('none' clears a limit)."""
    from ..clients import apply_settings

    if not settings:
        raise click.UsageError("Nothing to change: give --budget, --period, --rpm, --tpm or --models.")
    _on_client(name, lambda: _store(state).update_sync(name, lambda client: apply_settings(client, settings)))
    click.echo(f"Client {name!r} updated.")


@clients.command("rotate")
@config_options
@click.argument("name")
@pass_state
def rotate(state: CliState, name: str) -> None:
    """Give a client a new key (printed once); the old key is refused from now on."""
    key = _on_client(name, lambda: _store(state).rotate_sync(name))
    click.echo(key)
    click.echo(f"New key for {name!r} (shown once); the old key no longer works.", err=True)


@clients.command("remove")
@config_options
@click.argument("name")
@pass_state
def remove(state: CliState, name: str) -> None:
    """Remove a client: its key stops working; its usage records stay in the reports."""
    _on_client(name, lambda: _store(state).remove_sync(name))
    click.echo(f"Client {name!r} removed; its usage stays in the reports.")
