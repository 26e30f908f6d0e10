"""``agentspace usage``: tokens and cost per model or per day, from the usage store.

Reads the store directly, so it works while the server runs. ``--json`` prints the shape of the
WebSocket ``usage.report`` (``perModel``, ``grandTotal``; ``perDay`` with ``--by-day``).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Iterable, Iterator

import click

from .. import periods
from .common import CliState, config_options, count, money, pass_state, table


def parse_since(value: str, now: datetime | None = None) -> datetime:
    try:
        return periods.parse_since(value, now)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--since") from None


def _flag_unpriced(records: Iterable[dict[str, Any]], unpriced: set[str]) -> Iterator[dict[str, Any]]:
    # One pass over the records: note models priced by the fallback while the report sums them.
    for record in records:
        if record.get("priceKnown") is False:
            unpriced.add(record.get("model", "?"))
        yield record


def _rows(groups: dict[str, dict[str, Any]], unpriced: set[str] | None = None) -> list[list[str]]:
    rows = []
    for key, g in groups.items():
        flag = "*" if unpriced is not None and (key in unpriced or g.get("priceKnown") is False) else ""
        rows.append([
            key + flag, count(g.get("requestCount")), count(g.get("inputTokens")), count(g.get("outputTokens")),
            count(g.get("cacheReadTokens")), count(g.get("cacheWriteTokens")), count(g.get("totalTokens")),
            money(float(g.get("totalCost") or 0.0)),
        ])
    return rows


def _total_row(total: dict[str, Any]) -> list[str]:
    return ["TOTAL", count(total.get("requestCount")), "", "", "", "", count(total.get("totalTokens")),
            money(float(total.get("totalCost") or 0.0))]


@click.command()
@config_options
@click.option("--by-model", is_flag=True, help="Totals per model (the default).")
@click.option("--by-day", is_flag=True, help="Totals per day (UTC).")
@click.option("--session", "session_id", metavar="ID", help="Only this session.")
@click.option("--since", metavar="WHEN", help="Only records since 30m, 24h, 7d, 2w ago or a date (2026-11-01).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the usage.report shape).")
@pass_state
def usage(state: CliState, by_model: bool, by_day: bool, session_id: str | None, since: str | None,
          as_json: bool) -> None:
    """Token usage and cost, per model or per day."""
    from ..stores.usage import UsageStore, usage_by_day, usage_report

    since_dt = parse_since(since) if since else None
    by_model = by_model or not by_day
    # Per-segment sums where the store has them (closed segments), the records elsewhere: the reports add both.
    records = UsageStore(state.data_dir).totals(since=since_dt, session_id=session_id)
    unpriced: set[str] = set()
    per_model = usage_report(_flag_unpriced(records, unpriced)) if by_model else None
    per_day = usage_by_day(records) if by_day else None

    if as_json:
        out: dict[str, Any] = {}
        if per_model is not None:
            out["perModel"] = per_model["perModel"]
        if per_day is not None:
            out["perDay"] = per_day["perDay"]
        out["grandTotal"] = (per_model or per_day or {}).get("grandTotal", {})
        click.echo(json.dumps(out, indent=2))
        return

    grand = (per_model or per_day or {}).get("grandTotal", {})
    if not grand.get("requestCount"):
        scope = "".join([f" for session {session_id}" if session_id else "", f" since {since}" if since else ""])
        click.echo(f"No usage recorded{scope}.")
        return
    headers = ["requests", "input", "output", "cache read", "cache write", "total tokens", "cost"]
    right = range(1, 8)
    if per_model is not None:
        rows = _rows(per_model["perModel"], unpriced) + [_total_row(grand)]
        click.echo(table(["model", *headers], rows, right))
        flagged = unpriced | {m for m, g in per_model["perModel"].items() if g.get("priceKnown") is False}
        if flagged:
            click.echo("\n* price unknown: costed at the fallback price ([models] fallback_*_per_mtok); "
                       'set [pricing."MODEL"] in the config for exact costs.')
    if per_day is not None:
        if per_model is not None:
            click.echo()
        rows = _rows(dict(sorted(per_day["perDay"].items()))) + [_total_row(grand)]
        click.echo(table(["day", *headers], rows, right))
