"""Finding old conversations: a case-insensitive phrase search over session titles and message text.

Works on any session store through its interface (``listing`` and ``get``), so every backend gets it. The
text of each session is kept in memory per store, lower-cased, with the summary it was read at; a session
is read again only when its summary changed (a new message, a new title), so a search costs one listing
and a substring scan. The first search of a process reads every session once.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from .base import SessionStoreAPI

SNIPPET = 60  # characters of context either side of a match


@dataclass(slots=True)
class _Entry:
    stamp: tuple[Any, ...]
    text: str  # what is searched: the title and every message's text, lower-cased
    original: str  # the same text as written, for snippets (same length as ``text`` where case maps 1:1)


# One index per store object, gone with the store.
_INDEXES: weakref.WeakKeyDictionary[Any, dict[str, _Entry]] = weakref.WeakKeyDictionary()


def message_text(message: dict[str, Any]) -> str:
    """The searchable text of a stored message: its content, else its text and reasoning parts."""
    content = message.get("content")
    if isinstance(content, str) and content:
        return content
    parts = message.get("parts") or ()
    return "\n".join(str(p.get("text") or "") for p in parts if isinstance(p, dict) and p.get("type") == "text")


def _stamp(summary: dict[str, Any]) -> tuple[Any, ...]:
    return (summary.get("lastActivityAt"), summary.get("messageCount"), summary.get("title"))


def _document(session: dict[str, Any]) -> str:
    texts = [str(session.get("title") or "")]
    texts += [message_text(m) for m in session.get("messages", ())]
    return "\n".join(texts)


def _snippet(entry: _Entry, at: int, length: int) -> str:
    source = entry.original if len(entry.original) == len(entry.text) else entry.text
    start, end = max(0, at - SNIPPET), min(len(source), at + length + SNIPPET)
    text = " ".join(source[start:end].split())
    return ("…" if start else "") + text + ("…" if end < len(source) else "")


async def search_sessions(
    store: SessionStoreAPI, query: str, *, client: str | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    """Summaries of the sessions (of ``client`` only, when given) whose title or messages contain ``query``,
    most recent activity first, each with ``match``: the text around the first hit."""
    needle = query.strip().lower()
    index = _INDEXES.setdefault(store, {})
    listing = await store.listing()
    found: list[dict[str, Any]] = []
    seen: set[str] = set()
    for summary in listing.sessions:  # most recent activity first
        session_id = str(summary["id"])
        seen.add(session_id)
        if client is not None and summary.get("client") != client:
            continue
        entry = index.get(session_id)
        stamp = _stamp(summary)
        if entry is None or entry.stamp != stamp:
            session = await store.get(session_id)
            if session is None:
                continue
            original = _document(session)
            entry = index[session_id] = _Entry(stamp, original.lower(), original)
        at = entry.text.find(needle)
        if at >= 0:
            found.append({**summary, "match": _snippet(entry, at, len(needle))})
            if len(found) >= limit:
                break
    if len(found) < limit:
        for gone in set(index) - seen:  # deleted sessions
            del index[gone]
    return found
