"""A session as a document: Markdown to read, or JSON (the stored session) to keep or process."""

from __future__ import annotations

import json
from typing import Any

from .storage.shapes import as_seen

EXPORT_FORMATS = ("md", "json")
MEDIA_TYPES = {"md": "text/markdown; charset=utf-8", "json": "application/json"}


def _part_markdown(part: dict[str, Any]) -> str:
    kind = part.get("type")
    if kind == "text":
        return str(part.get("text") or "")
    if kind == "reasoning" and part.get("text"):
        return "> " + str(part["text"]).replace("\n", "\n> ")
    if kind == "tool-call":
        return f"Tool call `{part.get('name')}`:\n\n```json\n{json.dumps(part.get('input'), indent=2)}\n```"
    if kind == "tool-result":
        output = part.get("output")
        body = output if isinstance(output, str) else json.dumps(output, indent=2)
        return f"Tool result `{part.get('name')}`:\n\n```\n{body}\n```"
    if kind == "source":
        return f"Source: <{part.get('url')}>"
    if kind == "file":
        return attached(part)
    return ""


def attached(part: dict[str, Any]) -> str:
    """A stored file part as a line (the export, ``agentspace sessions show``): its bytes stay in the gateway
    (docs/attachments.md)."""
    size = f", {part['size']} bytes" if isinstance(part.get("size"), int) else ""
    return f"Attached: `{part.get('filename') or 'file'}` ({part.get('mediaType')}{size})"


def to_markdown(session: dict[str, Any]) -> str:
    lines = [
        f"# {session.get('title') or session.get('id')}",
        "",
        f"Session `{session.get('id')}` · {session.get('model')} · started {session.get('createdAt')}",
        "",
    ]
    for message in session.get("messages", ()):
        role = "User" if message.get("role") == "user" else "Assistant"
        lines += [f"## {role} · {message.get('createdAt', '')}", ""]
        parts = message.get("parts") or [{"type": "text", "text": message.get("content", "")}]
        body = "\n\n".join(t for t in (_part_markdown(p) for p in parts) if t)
        lines += [body, ""]
        if message.get("error"):
            lines += [f"*Error: {message['error'].get('code')}: {message['error'].get('message')}*", ""]
        summary = message.get("summary")
        if isinstance(summary, dict) and summary.get("text"):
            lines += ["*Summary of the conversation up to here (used in later calls):*", "", summary["text"], ""]
    return "\n".join(lines).rstrip() + "\n"


def export_session(session: dict[str, Any], fmt: str) -> tuple[str, str]:
    """(the document, its media type) for ``fmt`` in ``EXPORT_FORMATS``; answers given again (``replaced``) are
    left out, whoever exports (the REST API, the CLI)."""
    session = as_seen(session)
    if fmt == "json":
        return json.dumps({"session": session}, ensure_ascii=False, indent=2) + "\n", MEDIA_TYPES["json"]
    return to_markdown(session), MEDIA_TYPES["md"]
