"""Reading and decoding large JSON bodies (the ``/v1`` routes) without letting one client take the process.

- The size limit is enforced while reading (and from ``Content-Length`` before reading), and on a compressed
  body (``Content-Encoding: gzip``, ``deflate``) again once inflated, on a worker thread; the caller's
  credential was checked by the security middleware before any of the body was read.
- What a body costs once decoded depends on its containers more than on its bytes: ``[{},{},...]`` turns
  3 bytes into an empty dict and a list slot, about 70 bytes. Objects and arrays are counted while reading
  (every ``{`` and ``[``, those inside strings too: an upper bound), and a body past ``MAX_CONTAINERS`` is
  refused before it is decoded.
- The bytes of large bodies being read at once are bounded (``IN_FLIGHT_BYTES``): a large body waits for
  its share before reading (unread, it stays in the socket: the kernel's buffer, then TCP back-pressure).
- A body past ``OFF_LOOP_BYTES`` is decoded on a worker thread, so the event loop's other work (``/healthz``,
  streams) is not queued behind it.
- A body must keep coming: after ``[server] header_timeout_seconds`` it must have arrived at ``MIN_BYTES_PER_SECOND``
  on average, else the request is answered 408 and its connection closed. A body trickled in (a byte a second)
  would otherwise hold its connection and its share of the budget above for as long as its sender likes.
"""

from __future__ import annotations

import asyncio
import enum
import json
import math
import zlib
from typing import Any

from aiohttp import StreamReader, hdrs, web

from . import state

MAX_CONTAINERS = 1_000_000  # about 70 MB decoded at most
OFF_LOOP_BYTES = 1024 * 1024
IN_FLIGHT_BYTES = 96 * 1024 * 1024  # large bodies being read or decoded at once, per process
WAIT_SECONDS = 30.0  # how long a large body waits for its share before 503
MIN_BYTES_PER_SECOND = 16 * 1024  # a body's average rate at least (128 kbit/s: slow links pass), after the grace


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"The request body exceeds {limit} bytes.")
        self.limit = limit


class BodyInvalid(ValueError):
    """Not JSON, not UTF-8, too many objects and arrays, or nested too deep to decode."""


BUSY_MESSAGE = "The gateway is reading too many large requests at once; try again in a moment."


class GatewayBusy(Exception):
    """Too many large bodies in flight: try again in a moment."""


class _Budget:
    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self.changed = asyncio.Condition()

    async def take(self, n: int) -> None:
        n = min(n, self.total)
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: self.used + n <= self.total), WAIT_SECONDS)
            self.used += n

    async def give(self, n: int) -> None:
        async with self.changed:
            self.used -= min(n, self.total)
            self.changed.notify_all()


_BUDGET = web.AppKey("body_budget", _Budget)


class Unread(enum.Enum):
    """How a request refused before its body was read whole ends its connection (``close_after``)."""

    # Refused for its size: the rest is read and dropped (``_drain``), then the connection is closed. Closed at
    # once with the rest unread, the kernel resets it, and a proxy still sending the body (nginx with
    # ``proxy_request_buffering off``, docs/deploy.md) loses the answer: a 502.
    DRAIN = "drain"
    # Too slow, its encoding broken, or a container bomb (no client sends one by mistake; reading its rest would
    # only spend the event loop's time): closed at once.
    CLOSE = "close"


UNREAD = web.RequestKey("body_unread", Unread)
# What ``_drain`` reads and drops of a refused body at most: a body past /v1's 32 MiB by up to this much, and
# for this long (what aiohttp allows a body it did not read, its "lingering").
DRAIN_BYTES = 64 * 1024 * 1024
DRAIN_SECONDS = 10.0


def install(app: web.Application) -> None:
    """Give ``app`` its body budget before it starts: set on a running app, aiohttp warns (a
    DeprecationWarning a plugin author's tests show)."""
    app[_BUDGET] = _Budget(IN_FLIGHT_BYTES)


def _budget(app: web.Application) -> _Budget:
    budget = app.get(_BUDGET)
    if budget is None:
        budget = _Budget(IN_FLIGHT_BYTES)
        app[_BUDGET] = budget
    return budget


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode(raw: bytes) -> Any:
    """``json.loads`` with a refusal (``BodyInvalid``) instead of a ``RecursionError`` for deep nesting, and
    without the ``NaN`` / ``Infinity`` that Python's decoder accepts and JSON does not have."""
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise BodyInvalid("nested too deep") from None
    except ValueError as e:  # UnicodeDecodeError is a ValueError
        raise BodyInvalid(str(e)) from None


async def read_json(request: web.Request, limit: int) -> tuple[Any, bytes]:
    """The decoded body and its bytes. Raises ``BodyTooLarge``, ``BodyInvalid`` or ``GatewayBusy``."""
    declared = request.content_length
    if declared is not None and declared > limit:
        request[UNREAD] = Unread.DRAIN
        raise BodyTooLarge(limit)
    encoding = request.headers.get(hdrs.CONTENT_ENCODING, "").strip().lower()
    compressed = encoding in COMPRESSED
    # Large or unknown sizes take their share of the in-flight budget first (a chunked body: the limit). A
    # compressed body's length says nothing of its size inflated (1 MB of gzip is 1 GB of text): the limit.
    share = 0 if declared is not None and declared <= OFF_LOOP_BYTES and not compressed else (declared or limit)
    if compressed:
        share = limit
    budget = _budget(request.app)
    if share:
        try:
            await budget.take(share)
        except TimeoutError:
            raise GatewayBusy() from None
    grace = float(state.config(request.app)["server"]["header_timeout_seconds"])
    try:
        chunks: list[bytes] = []
        size = containers = 0
        start = asyncio.get_running_loop().time()
        async with asyncio.timeout_at(start + grace) as deadline:
            async for chunk in request.content.iter_any():
                size += len(chunk)
                deadline.reschedule(start + grace + size / MIN_BYTES_PER_SECOND)
                if size > limit:
                    request[UNREAD] = Unread.DRAIN
                    raise BodyTooLarge(limit)
                containers += chunk.count(b"{") + chunk.count(b"[")
                if containers > MAX_CONTAINERS:
                    request[UNREAD] = Unread.CLOSE
                    raise BodyInvalid(f"more than {MAX_CONTAINERS} objects and arrays")
                chunks.append(chunk)
        raw = b"".join(chunks)
        del chunks
        if compressed:  # inflated on a worker thread, never past the limit
            return await asyncio.to_thread(_inflate_and_decode, raw, encoding, limit)
        body = await asyncio.to_thread(decode, raw) if size > OFF_LOOP_BYTES else decode(raw)
        return body, raw
    except TimeoutError:
        request[UNREAD] = Unread.CLOSE
        raise web.HTTPRequestTimeout(
            reason=f"The request body did not arrive in time (at least {MIN_BYTES_PER_SECOND // 1024} KiB/s "
            f"after the first {grace:g} s)."
        ) from None
    finally:
        if share:
            await budget.give(share)


# Request bodies the gateway inflates itself (the app's ``auto_decompress`` is off: aiohttp would inflate them on
# the event loop, seconds of it for a gzip bomb, with every other request waiting). Other encodings are read as
# they come, and are then no JSON.
COMPRESSED = ("gzip", "x-gzip", "deflate")


def _inflate_and_decode(data: bytes, encoding: str, limit: int) -> tuple[Any, bytes]:
    """``data`` inflated (at most ``limit`` bytes of it) and decoded; on a worker thread."""
    if encoding == "deflate":  # zlib's container, or raw deflate as some clients send it (aiohttp takes both)
        wbits = zlib.MAX_WBITS if data[:1] and data[0] & 0x0F == 8 else -zlib.MAX_WBITS
    else:
        wbits = 16 + zlib.MAX_WBITS  # the gzip container
    inflater = zlib.decompressobj(wbits)
    try:
        raw = inflater.decompress(data, limit + 1)
    except zlib.error as e:
        raise BodyInvalid(f"Content-Encoding {encoding}: {e}") from None
    if len(raw) > limit:
        raise BodyTooLarge(limit)
    if not inflater.eof:
        raise BodyInvalid(f"Content-Encoding {encoding}: the compressed data ends early")
    if raw.count(b"{") + raw.count(b"[") > MAX_CONTAINERS:
        raise BodyInvalid(f"more than {MAX_CONTAINERS} objects and arrays")
    return decode(raw), raw


async def _drain(content: StreamReader) -> None:
    """Read and drop what is left of a refused body, at most ``DRAIN_BYTES`` within ``DRAIN_SECONDS``: enough for
    a proxy to finish sending one past a limit; a body without end is cut off (and its proxy may answer 502)."""
    left = DRAIN_BYTES
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            while left > 0 and not content.is_eof():
                chunk = await content.readany()
                if not chunk:
                    return
                left -= len(chunk)
    except (TimeoutError, OSError, web.RequestPayloadError):  # too slow, gone, or garbled: nothing to wait for
        return


async def close_after(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """Send the answer to a request whose body was left unread, then close the connection (``Unread``)."""
    unread = request.get(UNREAD)
    if unread is None or response.prepared:
        return response
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    if unread is Unread.DRAIN:
        await _drain(request.content)
    protocol = request.protocol
    if protocol is not None:
        protocol.force_close()  # aiohttp's RequestHandler; the answer is flushed
    return response


# The most a count may be: far above any model's output, and small enough that a reservation priced from it
# stays a float (an integer of 400 digits is valid JSON, and no float).
MAX_COUNT = 2**31 - 1

# The top-level fields of the /v1 requests whose type is checked before anything reads them: a string
# "false" is not false (read by truthiness it would stream). Kind names as the APIs document them.
_KINDS: dict[str, tuple[type, ...]] = {
    "count": (int,),  # a number of tokens (or of choices, of calls): from 1 to MAX_COUNT
    "boolean": (bool,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "array": (list,),
    "object": (dict,),
    "string or array": (str, list),
    "string or object": (str, dict),
}
OPENAI_FIELDS = {
    "model": "string",
    "messages": "array",
    "stream": "boolean",
    "stream_options": "object",
    "max_tokens": "count",
    "max_completion_tokens": "count",
    "temperature": "number",
    "top_p": "number",
    "stop": "string or array",
    "tools": "array",
    "tool_choice": "string or object",
    "reasoning_effort": "string",
    "n": "count",
    "seed": "integer",
    "user": "string",
    "metadata": "object",
}
ANTHROPIC_FIELDS = {
    "model": "string",
    "messages": "array",
    "system": "string or array",
    "stream": "boolean",
    "max_tokens": "count",
    "temperature": "number",
    "top_p": "number",
    "top_k": "integer",
    "stop_sequences": "array",
    "tools": "array",
    "tool_choice": "object",
    "thinking": "object",
    "metadata": "object",
}

EMBEDDINGS_FIELDS = {
    "model": "string",
    "encoding_format": "string",
    "dimensions": "count",
    "user": "string",
}
RESPONSES_FIELDS = {
    "model": "string",
    "input": "string or array",
    "instructions": "string",
    "stream": "boolean",
    "stream_options": "object",
    "max_output_tokens": "count",
    "temperature": "number",
    "top_p": "number",
    "tools": "array",
    "tool_choice": "string or object",
    "parallel_tool_calls": "boolean",
    "reasoning": "object",
    "text": "object",
    "include": "array",
    "store": "boolean",
    "background": "boolean",
    "metadata": "object",
    "client_metadata": "object",
    "prompt_cache_key": "string",
    "prompt_cache_retention": "string",
    "service_tier": "string",
    "user": "string",
    "safety_identifier": "string",
    "truncation": "string",
    "max_tool_calls": "count",
    "top_logprobs": "integer",
}


def type_problem(body: dict[str, Any], fields: dict[str, str]) -> tuple[str, str] | None:
    """The first field of ``body`` (present and not null) whose type is wrong: (field, "must be a KIND")."""
    for name, kind in fields.items():
        value = body.get(name)
        if value is None:
            continue
        types = _KINDS[kind]
        wrong = not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
        if not wrong and isinstance(value, float) and not math.isfinite(value):
            wrong = True
        if wrong or (kind == "count" and not 1 <= value <= MAX_COUNT):
            return name, f"{name}: must be " + (
                f"a whole number from 1 to {MAX_COUNT}"
                if kind == "count"
                else f"a{'n' if kind[0] in 'aeiou' else ''} {kind}"
            )
    thinking = body.get("thinking") if "thinking" in fields else None
    budget = thinking.get("budget_tokens") if isinstance(thinking, dict) else None
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= MAX_COUNT):
        return "thinking.budget_tokens", f"thinking.budget_tokens: must be a whole number from 1 to {MAX_COUNT}"
    return None
