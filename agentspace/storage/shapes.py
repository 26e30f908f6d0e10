"""The shapes every backend stores, and the rules they share: session ids, titles, message snapshots.

The ``TypedDict``s name the JSON documents the stores keep and return (camelCase, as the APIs speak
them): a session's summary and its messages, a usage record (``UsageRecord.to_dict()``), a usage report,
a client (``Client.to_stored()``: only its key's hash) and a ledger entry. A backend stores them as they
are given and returns them unchanged (``tests/test_storage_contract.py``).
"""

from __future__ import annotations

import builtins
import json
import re
from dataclasses import dataclass, field
from typing import Any, NotRequired, TypedDict

from ..types import new_id, now_iso
from .errors import InvalidSessionId

SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
TITLE_LENGTH = 60
# A client's last use is written at most this often: a busy client must not cause a write per request.
TOUCH_INTERVAL_SECONDS = 60.0


class SessionSummary(TypedDict):
    """What a listing gives per session."""

    id: str
    title: str | None
    model: str
    createdAt: str
    lastActivityAt: str
    messageCount: int
    client: str | None


class StoredMessage(TypedDict, total=False):
    """One message of a session: ``id`` and ``createdAt`` are filled in when it is stored; the rest is the
    message as the pipeline wrote it (``content`` or UI ``parts``, the model, usage, tool calls, marks)."""

    id: str
    role: str
    createdAt: str
    content: str
    parts: list[dict[str, Any]]
    # An answer given again since (a regenerate, an edit): kept and billed, out of the session as its client sees it.
    replaced: bool


class StoredSession(SessionSummary):
    """A session with its messages, oldest first (``SessionStoreAPI.get``)."""

    messages: list[StoredMessage]


class StoredUsageRecord(TypedDict, total=False):
    """A usage record as stored (``UsageRecord.to_dict()``): one per provider call."""

    id: str
    timestamp: str
    model: str
    provider: str | None
    sessionId: str | None
    client: str | None
    inputTokens: int
    outputTokens: int
    cacheReadTokens: int
    cacheWriteTokens: int
    reasoningTokens: int
    totalTokens: int
    inputCost: float
    outputCost: float
    totalCost: float
    serverToolUse: dict[str, int]
    serverToolCost: float
    latencyMs: float
    finishReason: str | None
    estimated: bool
    estimatedFields: list[str]
    priceKnown: bool
    error: str | None
    answered: bool
    attempts: int
    endpoint: str
    ttftMs: float | None
    purpose: str | None
    recovered: bool
    deployment: str | None


class UsageReport(TypedDict, total=False):
    """A usage report (``reports.REPORTS``): one ``per*`` table (name -> totals; ``by="day-model"`` gives
    ``perDay`` with each day's models), the ``grandTotal`` and the damaged files that were skipped."""

    perModel: dict[str, dict[str, Any]]
    perDay: dict[str, dict[str, Any]]
    perClient: dict[str, dict[str, Any]]
    perSession: dict[str, dict[str, Any]]
    perDeployment: dict[str, dict[str, Any]]
    perEndpoint: dict[str, dict[str, Any]]
    grandTotal: dict[str, Any]
    damagedFiles: list[str]


class StoredClient(TypedDict):
    """A client as stored (``Client.to_stored()``): the hash of its key, never the key."""

    name: str
    keyHash: str
    createdAt: str
    lastUsedAt: str | None
    budgetUsd: float | None
    period: str
    rpm: int | None
    tpm: int | None
    models: list[str]


class LedgerEntry(TypedDict):
    """A provider call's pending entry in the ledger (docs/accounting.md), written before the call goes
    upstream; ``note`` events add what the upstream reported (``usage``, ``answered``, ``relayedTokens``)."""

    id: str
    time: str
    client: str | None
    sessionId: str | None
    model: str
    endpoint: str | None
    deployment: NotRequired[str | None]
    reservation: float | None
    inputTokens: int | None
    # The model's rates when the call was made (``calls.entry_rates``): a recovery prices the call at them.
    rates: NotRequired[dict[str, Any]]
    purpose: NotRequired[str]  # a call the gateway made on its own account ("compact")
    serviceTier: NotRequired[str]  # the service tier the request asked for (OpenAI's "priority", "flex")
    inferenceGeo: NotRequired[str]  # where the request asked to run (Anthropic's "us", which costs more)


@dataclass
class Listing:
    """Every readable session's summary, most recent activity first, and the files in ``sessions/`` that
    are damaged (moved aside, or not readable as a session)."""

    sessions: builtins.list[dict[str, Any]] = field(default_factory=list)
    damaged_files: builtins.list[str] = field(default_factory=list)


def validate_session_id(session_id: object) -> str:
    if isinstance(session_id, str) and SESSION_ID.fullmatch(session_id):
        return session_id
    raise InvalidSessionId(
        f"invalid session id {str(session_id)[:40]!r}: use 1-128 characters from A-Z, a-z, 0-9, '_' and '-'"
    )


def is_valid_session_id(session_id: object) -> bool:
    return isinstance(session_id, str) and SESSION_ID.fullmatch(session_id) is not None


def as_seen(session: dict[str, Any]) -> dict[str, Any]:
    """The session as its client sees it (a view, an export): without the answers given again (``replaced``)."""
    messages = session.get("messages") or []
    if not any(m.get("replaced") for m in messages):
        return session
    return {**session, "messages": [m for m in messages if not m.get("replaced")]}


def title_from(message: dict[str, Any]) -> str | None:
    """A session's title from its first user message: its text, else the names of the files it attaches (a
    message of files only, an image sent without a word)."""
    content = message.get("content")
    parts = [p for p in message.get("parts") or [] if isinstance(p, dict)]
    if not isinstance(content, str) or not content.strip():
        content = "".join(str(p.get("text") or "") for p in parts if p.get("type") == "text")
    if not content.strip():
        content = ", ".join(str(p["filename"]) for p in parts if p.get("type") == "file" and p.get("filename"))
    title = " ".join(content.split())[:TITLE_LENGTH].rstrip()
    return title or None


def detached(data: Any) -> Any:
    """A JSON-only deep copy: callers can't change the cache through it, and bad values fail here."""
    return json.loads(json.dumps(data))


class FrozenDict(dict[str, Any]):
    """A JSON object that refuses every change: the session cache's messages are handed out as they are, so a
    caller that changed one would change the cache (and every later reader's view). A ``dict`` to every
    reader (``isinstance``, ``json.dumps``, ``{**d}``); ``thawed`` (or ``copy.deepcopy``) gives a copy to change.

    ``memo`` (unset until a reader sets it): what a reader derived from the object, kept with it for the next read
    (``context.py``: a message's provider parts). It cannot go stale: the object cannot change, and the cache
    stores a changed message as a new object (``frozen``), whose memo starts unset. Copies never carry it."""

    __slots__ = ("memo",)
    memo: Any

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("a stored message is read-only: change a copy (storage.shapes.thawed)")

    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse

    def __copy__(self) -> dict[str, Any]:
        return dict(self)

    def __deepcopy__(self, _memo: dict[int, Any]) -> Any:
        return thawed(self)

    def __reduce__(self) -> Any:  # pickled (a copy sent elsewhere) as a plain dict
        return (dict, (dict(self),))


class FrozenList(list[Any]):
    """A JSON array that refuses every change (see ``FrozenDict``)."""

    __slots__ = ()

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("a stored message is read-only: change a copy (storage.shapes.thawed)")

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse
    append = extend = insert = pop = remove = clear = sort = reverse = _refuse

    def __copy__(self) -> list[Any]:
        return list(self)

    def __deepcopy__(self, _memo: dict[int, Any]) -> Any:
        return thawed(self)

    def __reduce__(self) -> Any:
        return (list, (list(self),))


def frozen(data: Any) -> Any:
    """JSON data in a form that refuses changes (``FrozenDict``, ``FrozenList``; strings and numbers are so
    already); parts frozen already are kept, not copied."""
    kind = data.__class__
    if kind is dict:
        return FrozenDict({key: frozen(value) for key, value in data.items()})
    if kind is list:
        return FrozenList([frozen(value) for value in data])
    return data


def thawed(data: Any) -> Any:
    """A changeable deep copy of JSON data (frozen or not)."""
    if isinstance(data, dict):
        return {key: thawed(value) for key, value in data.items()}
    if isinstance(data, list):
        return [thawed(value) for value in data]
    return data


def stored_message(message: dict[str, Any]) -> dict[str, Any]:
    """A message as it is stored: a snapshot, ``id`` and ``createdAt`` filled in when absent."""
    message = detached(message)
    message.setdefault("id", new_id("msg_"))
    message.setdefault("createdAt", now_iso())
    return message
