"""Server-sent events decoded from the bytes of an HTTP body, as the providers' hot path reads them.

The event-stream format (WHATWG HTML, "server-sent events"): lines end with CRLF, LF or CR; a blank line
dispatches the event; ``event:`` names it, ``data:`` lines are joined with newlines, lines starting with
``:`` are comments, one space after the colon is dropped, an event without data is not dispatched.

Written for speed over the SDK's decoder (which decodes every line through several generator layers):
chunks are split into whole events at once, and the usual ``event: NAME\\ndata: JSON`` pair is read
without going line by line. Anything else takes the general path, which implements the format in full.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator

SSEEvent = tuple["str | None", str]  # (event name, data)


class SSEDecoder:
    """Feed it body chunks; it returns the events each chunk completes."""

    __slots__ = ("_pending", "_cr")

    def __init__(self) -> None:
        self._pending = b""  # the start of an event not yet ended by a blank line (line ends as LF)
        self._cr = False  # the last chunk ended with CR, which may be the first half of a CRLF

    def feed(self, chunk: bytes) -> Iterable[SSEEvent]:
        """The events ``chunk`` completes, decoded as they are iterated (empty when it completes none).

        Lazily: a burst of events read at once (a fast upstream's whole answer can come in one chunk) is
        handed on event by event, so the first token goes out before the rest of the burst is decoded."""
        if self._cr:
            chunk, self._cr = b"\r" + chunk, False
        if b"\r" in chunk:
            if chunk.endswith(b"\r"):
                chunk, self._cr = chunk[:-1], True
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buffer = self._pending + chunk if self._pending else chunk
        end = buffer.rfind(b"\n\n")
        if end == -1:
            self._pending = buffer
            return ()
        self._pending = buffer[end + 2 :]
        return _decode_blocks(buffer[:end].split(b"\n\n"))

    def close(self) -> list[SSEEvent]:
        """The body ended. A held CR still ends its line; an event without its blank line is dropped."""
        if self._cr:
            self._cr = False
            return list(self.feed(b"\n"))
        return []


def _decode_blocks(blocks: list[bytes]) -> Iterator[SSEEvent]:
    for block in blocks:
        if block.startswith(b"event: "):  # the usual shape, "event: NAME\ndata: ONE LINE", read at once
            newline = block.find(b"\n")
            if newline != -1 and block.startswith(b"data: ", newline + 1) and block.find(b"\n", newline + 1) == -1:
                yield (block[7:newline].decode(), block[newline + 7 :].decode())
                continue
        event = _parse_block(block)
        if event is not None:
            yield event


def _parse_block(block: bytes) -> SSEEvent | None:
    """One event's lines, by the format's rules (the general path)."""
    name: str | None = None
    data: list[str] = []
    for raw in block.split(b"\n"):
        if not raw:
            # Blank lines between events: a run of them after ``\n\n`` splits into empty blocks.
            continue
        if raw.startswith(b":"):
            continue  # a comment
        line = raw.decode()
        field, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)
        # "id" and "retry" mean nothing to a provider stream; unknown fields are ignored.
    if not data:
        return None
    return (name or None, "\n".join(data))


async def sse_events(chunks: AsyncIterable[bytes]) -> AsyncIterator[Iterable[SSEEvent]]:
    """The events of an event-stream body, a chunk's worth at a time (each decoded as it is iterated)."""
    decoder = SSEDecoder()
    async for chunk in chunks:
        events = decoder.feed(chunk)
        if events:
            yield events
    events = decoder.close()
    if events:
        yield events
