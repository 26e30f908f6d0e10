"""``agentspace usage``: tokens and cost per model, per day or per client, from the usage store.

Reads the store directly, so it works while the server runs. ``--json`` prints the shape of the
WebSocket ``usage.report`` (``perModel``, ``grandTotal``, ``damagedFiles``; ``perDay`` with ``--by-day``,
``perClient`` with ``--by-client``, ``perSession`` with ``--by-session``, ``perEndpoint`` with ``--by-endpoint``). The fees of server tools (web search, ...: ``serverToolCost``, with
``serverToolUses``) have a column of their own, next to the cost, which includes them.
Damaged usage files are skipped and named on stderr.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import click

from .. import periods
from .common import CliState, config_options, count, money, pass_state, table, warn_damaged
from .storage_access import cli_storage, on_storage


def parse_since(value: str, now: datetime | None = None) -> datetime:
    try:
        return periods.parse_since(value, now)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--since") from None


def _rows(groups: dict[str, dict[str, Any]]) -> list[list[str]]:
    return [_row(key + ("*" if g.get("priceKnown") is False else ""), g) for key, g in groups.items()]


def _row(label: str, g: dict[str, Any]) -> list[str]:
    return [
        label,
        count(g.get("requestCount")),
        count(g.get("errorCount")),
        count(g.get("inputTokens")),
        count(g.get("outputTokens")),
        count(g.get("cacheReadTokens")),
        count(g.get("cacheWriteTokens")),
        count(g.get("totalTokens")),
        _server_tools(g),
        money(float(g.get("totalCost") or 0.0)),
    ]


def _server_tools(g: dict[str, Any]) -> str:
    """The server-tool fees and, in brackets, the uses they paid for; "-" when there were none."""
    fee, uses = float(g.get("serverToolCost") or 0.0), int(g.get("serverToolUses") or 0)
    return f"{money(fee)} ({count(uses)})" if fee or uses else "-"


@click.command()
@config_options
@click.option("--by-model", is_flag=True, help="Totals per model (the default).")
@click.option("--by-day", is_flag=True, help="Totals per day (UTC).")
@click.option("--by-client", is_flag=True, help="Totals per client (admin: the gateway token).")
@click.option("--by-session", is_flag=True, help="Totals per session (none: calls outside a session).")
@click.option("--by-deployment", is_flag=True, help="Totals per deployment of the model groups.")
@click.option("--by-endpoint", is_flag=True, help="Totals per endpoint (ws, http, anthropic, openai, ...).")
@click.option("--client", "client_name", metavar="NAME", help="Only this client's records.")
@click.option("--session", "session_id", metavar="ID", help="Only this session.")
@click.option("--since", metavar="WHEN", help="Only records since 30m, 24h, 7d, 2w ago or a date (2026-11-01).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the usage.report shape).")
@pass_state
def usage(
    state: CliState,
    by_model: bool,
    by_day: bool,
    by_client: bool,
    by_session: bool,
    by_deployment: bool,
    by_endpoint: bool,
    client_name: str | None,
    session_id: str | None,
    since: str | None,
    as_json: bool,
) -> None:
    """Token usage and cost, per model, day, client, session, deployment of the model groups, or endpoint."""
    from ..storage.protocols import Storage, UsageStoreSync

    since_dt = parse_since(since) if since else None
    by_model = by_model or not (by_day or by_client or by_session or by_deployment or by_endpoint)
    if session_id is not None and client_name is None:
        client_name = _session_owner(state, session_id)  # the owner's records of it, not others' of that id
    where: dict[str, Any] = {"since": since_dt, "session_id": session_id, "client": client_name}
    asked_for = (
        *(("model", by_model), ("day", by_day), ("client", by_client)),
        *(("session", by_session), ("deployment", by_deployment), ("endpoint", by_endpoint)),
    )
    wanted = [by for by, asked in asked_for if asked]
    store = cli_storage(state).usage
    if isinstance(store, UsageStoreSync):  # files: read here, without an event loop
        reports = {by: store.report_sync(by=by, **where) for by in wanted}
    else:

        async def backend_reports(storage: Storage) -> dict[str, dict[str, Any]]:
            return {by: await storage.usage.report(by=by, **where) for by in wanted}

        reports = on_storage(state, backend_reports)
    report = next((reports[by] for by in GROUPINGS if reports.get(by)), {})
    damaged: list[str] = report.get("damagedFiles", [])
    grand = report.get("grandTotal", {})

    if as_json:
        _print_json(reports, grand, damaged)
        return

    _warn_damaged(damaged)
    if not grand.get("requestCount") and not grand.get("errorCount"):
        scope = "".join([f" for session {session_id}" if session_id else "", f" since {since}" if since else ""])
        click.echo(f"No usage recorded{scope}.")
        return
    _print_tables(reports, grand)


# Each grouping (the first column's header) and the key of its groups in a report, in the order printed.
GROUPINGS = {
    "model": "perModel",
    "day": "perDay",
    "client": "perClient",
    "session": "perSession",
    "deployment": "perDeployment",
    "endpoint": "perEndpoint",
}


def _print_json(reports: dict[str, Any], grand: dict[str, Any], damaged: list[str]) -> None:
    out: dict[str, Any] = {GROUPINGS[by]: reports[by][GROUPINGS[by]] for by in GROUPINGS if by in reports}
    out["grandTotal"] = grand
    out["damagedFiles"] = damaged
    click.echo(json.dumps(out, indent=2))
    _warn_damaged(damaged)


def _print_tables(reports: dict[str, Any], grand: dict[str, Any]) -> None:
    """One table per grouping asked for (model, day, client, session, deployment, endpoint, in that order), blank lines between."""
    headers = [
        *("requests", "errors", "input", "output", "cache read", "cache write", "total tokens"),
        *("server tools", "cost"),  # the cost includes the server-tool fees
    ]
    right = range(1, 10)
    shown = [by for by in GROUPINGS if by in reports]
    for i, by in enumerate(shown):
        groups = reports[by][GROUPINGS[by]]
        if by == "day":
            groups = dict(sorted(groups.items()))
        if i:
            click.echo()
        rows = _rows(groups) + [_row("TOTAL", grand)]
        click.echo(table([by, *headers], rows, right))
    # Any table's starred row (a model, or a day or client with such a model's calls) gets the footnote.
    if any(g.get("priceKnown") is False for by in shown for g in reports[by].get(GROUPINGS[by], {}).values()):
        click.echo(
            "\n* price unknown: costed at the fallback price ([models] fallback_*_per_mtok); "
            'set [pricing."MODEL"] in the config for exact costs.'
        )


def _session_owner(state: CliState, session_id: str) -> str | None:
    """Whose session ``session_id`` is, or None when there is none of that id (or it cannot be read)."""
    from ..service import session_owner
    from .sessions import _get

    try:
        session = _get(state, session_id)
    except (click.ClickException, ValueError, OSError):
        return None
    # The gateway token's ("admin"): its records and those naming no client (older ones), no client's.
    return None if session is None else session_owner(session)


def _warn_damaged(damaged: list[str]) -> None:
    warn_damaged(damaged, "damaged usage file(s) not counted")
