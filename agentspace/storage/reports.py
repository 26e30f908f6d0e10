"""The usage reports every backend gives: records (``UsageRecord.to_dict()``) summed per model, day, client,
session, day and model, deployment or endpoint (``REPORTS``), each with its ``grandTotal``.

A backend that keeps rollups sums them per group key (``group_key``: day, model, client, session, endpoint,
deployment) and turns them into a report with ``report_from_groups``; one that does not hands the records
to ``REPORTS[by]``. Both give the same numbers (``tests/test_storage_contract.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from ..clients import LEGACY_ADMIN_NAMES

TOKEN_FIELDS = ("inputTokens", "outputTokens", "totalTokens", "cacheReadTokens", "cacheWriteTokens", "reasoningTokens")


COUNTS = ("requestCount", "errorCount", "estimatedCount")
# The fees of server tools (web search, ...; part of ``totalCost``) and how many uses they paid for: a column
# of their own in every report.
_SERVER_TOOL_FIELDS = ("serverToolCost", "serverToolUses")


def empty_totals() -> dict[str, Any]:
    return {
        **dict.fromkeys(TOKEN_FIELDS, 0),
        "totalCost": 0.0,
        "serverToolCost": 0.0,
        "serverToolUses": 0,
        **dict.fromkeys(COUNTS, 0),
    }


def _is_error(record: dict[str, Any]) -> bool:
    # The finish reason too: records written before the ``error`` field have only that.
    return bool(record.get("error")) or record.get("finishReason") == "error"


def _add(totals: dict[str, Any], record: dict[str, Any]) -> None:
    """Count one record: a request when the upstream answered it, an error when it ended in one."""
    for key in TOKEN_FIELDS:
        totals[key] += record.get(key) or 0
    totals["totalCost"] += record.get("totalCost") or 0.0
    totals["serverToolCost"] += record.get("serverToolCost") or 0.0
    totals["serverToolUses"] += server_tool_uses(record)
    totals["requestCount"] += record.get("answered") is not False
    totals["errorCount"] += _is_error(record)
    totals["estimatedCount"] += bool(record.get("estimated"))
    if record.get("priceKnown") is False:  # costed at the fallback price: the report says so
        totals["priceKnown"] = False


def server_tool_uses(record: dict[str, Any]) -> int:
    """How many server-tool uses a record paid for (``serverToolUse``: {"web_search": 3, ...})."""
    uses = record.get("serverToolUse")
    if not isinstance(uses, dict):
        return 0
    return sum(n for n in uses.values() if isinstance(n, int) and not isinstance(n, bool))


def _model_label(record: dict[str, Any]) -> str:
    return str(record.get("model") or "unknown")


def _day_label(record: dict[str, Any]) -> str:
    return str(record.get("timestamp") or "")[:10] or "unknown"


def _group(records: Iterable[dict[str, Any]], key: str, label: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    groups: dict[str, dict[str, Any]] = {}
    for record in records:
        name = label(record)
        totals = groups.get(name)
        if totals is None:
            totals = groups[name] = empty_totals()
        _add(totals, record)
    return _finish(groups, key)


def _finish(groups: dict[str, dict[str, Any]], key: str) -> dict[str, Any]:
    grand = empty_totals()
    for totals in groups.values():
        for field in SUMMED:
            grand[field] += totals[field]
        if totals.get("priceKnown") is False:  # a total with a part at the fallback price says so too
            grand["priceKnown"] = False
    for totals in (*groups.values(), grand):
        for field in ("totalCost", "serverToolCost"):  # float sums carry noise below a nano-dollar
            totals[field] = round(totals[field], 10)
    return {key: dict(sorted(groups.items())), "grandTotal": grand}


# --- groups: what rollups keep, and what every report can be made of -----------------------------

# (day, model, client, session id, endpoint, deployment), the raw values of the records (None when absent).
GroupKey = tuple[str, Any, Any, Any, Any, Any]
SUMMED = (*TOKEN_FIELDS, "totalCost", *_SERVER_TOOL_FIELDS, *COUNTS)


def group_key(record: dict[str, Any]) -> GroupKey:
    return (
        _day_label(record),
        record.get("model"),
        record.get("client"),
        record.get("sessionId"),
        record.get("endpoint"),
        record.get("deployment"),
    )


def add_to(groups: dict[GroupKey, dict[str, Any]], record: dict[str, Any], key: GroupKey | None = None) -> None:
    """Count ``record`` in its group (``key``: another group of it, as one without its session)."""
    key = group_key(record) if key is None else key
    totals = groups.get(key)
    if totals is None:
        totals = groups[key] = empty_totals()
    _add(totals, record)


def merge(groups: dict[GroupKey, dict[str, Any]], key: GroupKey, totals: dict[str, Any]) -> None:
    into = groups.get(key)
    if into is None:
        groups[key] = totals
        return
    for field in SUMMED:
        into[field] += totals[field]
    if totals.get("priceKnown") is False:
        into["priceKnown"] = False


def group_records(records: Iterable[dict[str, Any]]) -> dict[GroupKey, dict[str, Any]]:
    """The records' totals per group key."""
    groups: dict[GroupKey, dict[str, Any]] = {}
    for record in records:
        add_to(groups, record)
    return groups


def report_from_groups(by: str, groups: dict[GroupKey, dict[str, Any]]) -> dict[str, Any]:
    """The report ``by`` names (``REPORTS``) computed from group totals instead of records."""
    if by == "day-model":
        per_day: dict[str, dict[str, dict[str, Any]]] = {}
        for (day, model, *_), totals in groups.items():
            merge_named(per_day.setdefault(day, {}), str(model or "unknown"), totals)
        grand = _finish({f"{d} {m}": t for d, models in per_day.items() for m, t in models.items()}, "x")
        ordered = {day: dict(sorted(models.items())) for day, models in sorted(per_day.items())}
        return {"perDay": ordered, "grandTotal": grand["grandTotal"]}
    key, label = _LABELS[by]
    named: dict[str, dict[str, Any]] = {}
    for (day, model, client, session, endpoint, deployment), totals in groups.items():
        record = {
            "timestamp": day,
            "model": model,
            "client": client,
            "sessionId": session,
            "endpoint": endpoint,
            "deployment": deployment,
        }
        merge_named(named, label(record), totals)
    return _finish(named, key)


def merge_named(named: dict[str, dict[str, Any]], name: str, totals: dict[str, Any]) -> None:
    """Add ``totals`` to ``named[name]`` (made empty first when absent)."""
    into = named.get(name)
    if into is None:
        into = named[name] = empty_totals()
    for field in SUMMED:
        into[field] += totals[field]
    if totals.get("priceKnown") is False:
        into["priceKnown"] = False


def usage_report(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The ``usage.report`` shape (docs/protocol.md): ``perModel`` and ``grandTotal``, with extra token kinds,
    ``requestCount`` (calls the upstream answered), ``errorCount`` and ``priceKnown: false`` on a model
    priced by the fallback."""
    return _group(records, "perModel", _model_label)


def usage_by_day(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Totals per UTC day of the record's timestamp: ``perDay`` and ``grandTotal``."""
    return _group(records, "perDay", _day_label)


# What older records of the gateway token name as their client (or they name none).
ADMIN_LEGACY_CLIENTS = ("", *LEGACY_ADMIN_NAMES)


def owner(client: object) -> str:
    """Whose a record is: its client, or "admin" (the gateway token) for records from before clients existed,
    which name none (or "ws"/"http"). A ``client`` filter of "admin" matches those too."""
    return str(client) if client and client not in ADMIN_LEGACY_CLIENTS else "admin"


def _client_label(record: dict[str, Any]) -> str:
    return owner(record.get("client"))


def usage_by_client(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Totals per client (README.md#teams-and-budgets): ``perClient`` and ``grandTotal``."""
    return _group(records, "perClient", _client_label)


def _session_label(record: dict[str, Any]) -> str:
    return str(record.get("sessionId") or "none")


def usage_by_session(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Totals per session id (``"none"`` for calls outside a session): ``perSession`` and ``grandTotal``."""
    return _group(records, "perSession", _session_label)


def usage_by_day_and_model(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Totals per UTC day and, within it, per model (the web app's stacked chart): ``perDay`` maps a day to
    ``{MODEL: totals}``; ``grandTotal`` as in the other reports."""
    grouped = _group(records, "perDay", lambda record: f"{_day_label(record)} {_model_label(record)}")
    per_day: dict[str, dict[str, Any]] = {}
    for key, totals in grouped["perDay"].items():
        day, _, model = key.partition(" ")
        per_day.setdefault(day, {})[model] = totals
    return {"perDay": per_day, "grandTotal": grouped["grandTotal"]}


def usage_by_deployment(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Totals per deployment of a model group (``group/name``, agentspace/routing.py; ``"none"`` for calls
    to a model outside any group): ``perDeployment`` and ``grandTotal``."""
    return _group(records, "perDeployment", lambda record: str(record.get("deployment") or "none"))


def _endpoint_label(record: dict[str, Any]) -> str:
    return str(record.get("endpoint") or "none")


def usage_by_endpoint(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Totals per endpoint the calls came through (``ws``, ``http``, ``anthropic``, ``openai``, ...; ``"none"``
    for records that name none): ``perEndpoint`` and ``grandTotal``."""
    return _group(records, "perEndpoint", _endpoint_label)


# ``by`` of the usage reports (CLI, ``/api/usage``): the function that groups the records.
REPORTS: dict[str, Callable[[Iterable[dict[str, Any]]], dict[str, Any]]] = {
    "model": usage_report,
    "day": usage_by_day,
    "client": usage_by_client,
    "session": usage_by_session,
    "day-model": usage_by_day_and_model,
    "deployment": usage_by_deployment,
    "endpoint": usage_by_endpoint,
}

_LABELS: dict[str, tuple[str, Callable[[dict[str, Any]], str]]] = {
    "model": ("perModel", _model_label),
    "day": ("perDay", _day_label),
    "client": ("perClient", _client_label),
    "session": ("perSession", _session_label),
    "deployment": ("perDeployment", lambda record: str(record.get("deployment") or "none")),
    "endpoint": ("perEndpoint", _endpoint_label),
}
