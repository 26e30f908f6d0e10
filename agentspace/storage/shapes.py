"""The shapes every backend stores, and the rules they share: session ids, titles, message snapshots."""

from __future__ import annotations

import builtins
import json
import re
from dataclasses import dataclass, field
from typing import Any

from ..types import new_id, now_iso
from .errors import InvalidSessionId

SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
TITLE_LENGTH = 60
# A client's last use is written at most this often: a busy client must not cause a write per request.
TOUCH_INTERVAL_SECONDS = 60.0


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


def title_from(message: dict[str, Any]) -> str | None:
    content = message.get("content")
    if not isinstance(content, str) or not content.strip():
        parts = message.get("parts") or []
        content = "".join(p.get("text", "") for p in parts if isinstance(p, dict) and p.get("type") == "text")
    title = " ".join(content.split())[:TITLE_LENGTH].rstrip()
    return title or None


def detached(data: Any) -> Any:
    """A JSON-only deep copy: callers can't change the cache through it, and bad values fail here."""
    return json.loads(json.dumps(data))


def stored_message(message: dict[str, Any]) -> dict[str, Any]:
    """A message as it is stored: a snapshot, ``id`` and ``createdAt`` filled in when absent."""
    message = detached(message)
    message.setdefault("id", new_id("msg_"))
    message.setdefault("createdAt", now_iso())
    return message
