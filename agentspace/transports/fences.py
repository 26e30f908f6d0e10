"""Tracks fenced code blocks in streamed markdown so each delta can carry ``contentType``.

A line that opens or closes a fence (``` or ~~~, up to three spaces of indent) belongs to the code block.
The start of a line is held back only while it could still become a fence (at most three characters),
so a delta that crosses a fence is split into a text and a code piece.
"""

from __future__ import annotations

import re

_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")
_MAYBE_FENCE = re.compile(r" {0,3}(`{0,2}|~{0,2})")


class FenceTracker:
    __slots__ = ("in_code", "fence", "line_type", "pending")

    def __init__(self) -> None:
        self.in_code = False
        self.fence = ""
        self.line_type: str | None = None  # None: at the start of a line, type not decided yet
        self.pending = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        """Split ``text`` into ``(piece, contentType)`` runs, "code" or "text"."""
        if self.line_type is not None and not self.pending and "\n" not in text:
            return [(text, self.line_type)] if text else []  # the common case: mid-line, no newline
        buf = self.pending + text
        self.pending = ""
        out: list[tuple[str, str]] = []
        i, n = 0, len(buf)
        while i < n:
            j = buf.find("\n", i)
            if self.line_type is None:
                head = buf[i:] if j == -1 else buf[i:j]
                decided = self._classify(head, complete=j != -1)
                if decided is None:
                    self.pending = buf[i:]
                    break
                self.line_type = decided
            end = n if j == -1 else j + 1
            piece = buf[i:end]
            if out and out[-1][1] == self.line_type:
                out[-1] = (out[-1][0] + piece, self.line_type)
            else:
                out.append((piece, self.line_type))
            if j != -1:
                self.line_type = None
            i = end
        return out

    def flush(self) -> list[tuple[str, str]]:
        """What was held back at the end of the stream."""
        if not self.pending:
            return []
        piece, self.pending = self.pending, ""
        return [(piece, "code" if self.in_code else "text")]

    def _classify(self, head: str, *, complete: bool) -> str | None:
        m = _FENCE.match(head)
        if m is None:
            if not complete and _MAYBE_FENCE.fullmatch(head):
                return None
            return "code" if self.in_code else "text"
        marker = m.group(1)
        if not self.in_code:
            self.in_code, self.fence = True, marker
            return "code"
        closes = marker[0] == self.fence[0] and len(marker) >= len(self.fence) and not head[m.end() :].strip()
        if closes:
            if not complete:
                return None  # "```" could still be followed by more text on this line
            self.in_code = False
        return "code"
