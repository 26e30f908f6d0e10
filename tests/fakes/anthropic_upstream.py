"""A fake Anthropic API on 127.0.0.1 (Messages with streaming, Models), speaking the real wire format over HTTP.

Responses are scripted with the builders below and served in order (``default`` when the queue is empty)::

    async with started_fake_anthropic() as fake:
        fake.enqueue(text_response("Hello world", chunks=2, usage={"input_tokens": 12}))
        fake.enqueue(tool_use_response("get_weather", {"city": "Paris"}, pieces=3))
        fake.enqueue(error_status(429, retry_after=1))
        fake.enqueue(text_response("Hi").cut_after(4))       # drop the connection after 4 SSE events
        ...  # point the SDK at fake.url: anthropic.AsyncAnthropic(api_key="sk-test", base_url=fake.url)
        fake.requests[0].body["thinking"], fake.requests[0].api_key

In tests, use the ``fake_anthropic`` fixture (import it into a conftest) instead of the context manager.

A streamed answer is a sequence of server-sent events ``event: NAME\\ndata: JSON\\n\\n``::

    message_start        {"message": {..., "content": [], "usage": {input, cache write, cache read, output}}}
    ping
    content_block_start  {"index": i, "content_block": {"type": "text" | "thinking" | "tool_use" | ...}}
    content_block_delta  {"index": i, "delta": {"type": "text_delta" | "thinking_delta" | "signature_delta"
                                                | "input_json_delta" | "citations_delta", ...}}   (any number)
    content_block_stop   {"index": i}
    ... more blocks ...
    message_delta        {"delta": {"stop_reason": ...}, "usage": {"output_tokens": N}}  (usage is CUMULATIVE)
    message_stop

An ``error`` event (``{"type": "error", "error": {"type": "overloaded_error", ...}}``) may replace the rest
of a stream after HTTP 200. Failures before streaming are HTTP statuses with the JSON body
``{"type": "error", "error": {"type", "message"}, "request_id"}``.

Like the real API, requests are checked first (``validate=False`` turns it off): an API key header, the
``anthropic-version`` header, ``model``/``max_tokens``/``messages``, and with extended thinking
``budget_tokens >= 1024``, ``max_tokens > budget_tokens``, no ``temperature`` other than 1 and a last assistant
message that calls tools starting with its thinking (budget thinking only). A rejected request is recorded but does not use up a queued response.

With ``caching=True`` the fake keeps a prompt cache as the real API does and reports the request's own input
(replacing the scripted counts): tokens are counted with ``fake_tokens`` (4 UTF-8 bytes a token, per content
block); a ``cache_control`` breakpoint caches the prefix that ends there (tools, then system, then messages)
for its ``ttl`` (5m or 1h) if it is at least the model's minimum (``MIN_CACHEABLE``), and a request reads the
longest prefix cached within 20 blocks before one of its breakpoints. ``input_tokens`` is what follows the
last breakpoint, ``cache_read_input_tokens`` what was read, ``cache_creation_input_tokens`` the rest up to the
last breakpoint. ``fake.advance(seconds)`` moves its clock (for expiry); at most 4 breakpoints are accepted, and
none of 1h after one of 5m.

Run ``python -m tests.fakes.anthropic_upstream [PORT] [--deltas N]`` to serve the default answer (or one of N text
deltas) for manual tests and benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from aiohttp import web

from tests.fakes.server import FakeUpstream

DEFAULT_TEXT = "Hello from the fake Anthropic upstream."
DEFAULT_SIGNATURE = "EqQBCkYIBxgCKkBfakeSignatureForTests"

# An SSE event: its name and its data, a dict sent as JSON or a str sent verbatim (malformed data).
Event = tuple[str, "dict[str, Any] | str"]


@dataclass(frozen=True)
class FakeResponse:
    """One scripted answer: a 200 event stream, or an error status with Anthropic's JSON error body.

    Modifiers return a changed copy, so a response can be reused (e.g. as ``default``).
    """

    events: tuple[Event, ...] = ()
    status: int = 200
    error: dict[str, Any] | None = None  # the JSON body of an error status
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds between events
    cut: int | None = None  # end the stream after this many events, without message_stop
    abort: bool = True  # how to cut: drop the TCP connection (True) or end the HTTP body cleanly
    stall_after: int | None = None  # stop sending for ``stall_seconds`` after this many events
    stall_seconds: float = 0.0
    silent: float = 0.0  # seconds before answering at all (no status line, no headers): a hung upstream
    gate: asyncio.Event | None = None  # after ``stall_after`` events, send nothing more until it is set

    def silent_for(self, seconds: float) -> FakeResponse:
        """Answer nothing for ``seconds`` (the client times out waiting for the status), then as scripted."""
        return replace(self, silent=seconds)

    def cut_after(self, n_events: int, *, abort: bool = True) -> FakeResponse:
        """End the stream after ``n_events`` SSE events (message_start and ping count)."""
        return replace(self, cut=n_events, abort=abort)

    def stall(self, seconds: float, *, after: int = 1) -> FakeResponse:
        """Send nothing for ``seconds`` after ``after`` events, then go on (if the client is still there)."""
        return replace(self, stall_after=after, stall_seconds=seconds)

    def with_delay(self, seconds: float) -> FakeResponse:
        return replace(self, delay=seconds)

    def held(self, gate: asyncio.Event, *, after: int = 1) -> FakeResponse:
        """Send nothing after ``after`` events until the test sets ``gate`` (a step that lasts exactly as long as
        the test needs, however slow the machine), then go on (if the client is still there)."""
        return replace(self, stall_after=after, gate=gate)

    @cached_property
    def _encoded(self) -> list[bytes]:
        # Encoded once per response object: a benchmark serving the same default answer pays for it once.
        return [_sse(name, data) for name, data in self.events]


@dataclass
class RecordedRequest:
    path: str
    body: Any  # the parsed JSON body (None when it was not JSON)
    headers: dict[str, str]  # lower-cased names, e.g. headers["anthropic-version"]
    raw: bytes = b""  # the body's bytes as they arrived
    query: str = ""  # the query string, e.g. "beta=true"
    disconnected: bool = False  # the client hung up before the stream was complete

    @property
    def api_key(self) -> str | None:
        """The key, from ``x-api-key`` or ``Authorization: Bearer`` (which the SDK uses since 2.x)."""
        auth = self.headers.get("authorization", "")
        return self.headers.get("x-api-key") or (auth[7:] if auth.startswith("Bearer ") else None)


def _sse(name: str, data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"event: {name}\ndata: {payload}\n\n".encode()


# --- content blocks -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """One content block: its ``content_block_start`` payload and its deltas (indexes are added later)."""

    start: dict[str, Any]
    deltas: tuple[dict[str, Any], ...] = ()


def _pieces(text: str, chunks: int | Sequence[str]) -> list[str]:
    if not isinstance(chunks, int):
        return list(chunks)
    size = max(1, -(-len(text) // max(1, chunks)))
    return [text[i : i + size] for i in range(0, len(text), size)]


def text_block(text: str, *, chunks: int | Sequence[str] = 3, citations: Iterable[dict[str, Any]] = ()) -> Block:
    """A text block streamed in ``chunks`` pieces (a number, or the pieces themselves).

    Citations arrive as ``citations_delta`` events before the text they support, as the API sends them.
    """
    deltas = [{"type": "citations_delta", "citation": c} for c in citations]
    deltas += [{"type": "text_delta", "text": p} for p in _pieces(text, chunks)]
    return Block({"type": "text", "text": ""}, tuple(deltas))


def thinking_block(text: str, *, signature: str = DEFAULT_SIGNATURE, chunks: int | Sequence[str] = 2) -> Block:
    """Extended thinking: ``thinking_delta`` pieces, then one ``signature_delta`` just before the block stops."""
    deltas = [{"type": "thinking_delta", "thinking": p} for p in _pieces(text, chunks)]
    deltas.append({"type": "signature_delta", "signature": signature})
    return Block({"type": "thinking", "thinking": "", "signature": ""}, tuple(deltas))


def redacted_thinking_block(data: str = "EmwKAhgBEgy3va3pzix/LafPsn4aDFIT2Xlxh0L5L8rLVyIwxtE3rAFBa8cr3qpP") -> Block:
    """Safety-redacted thinking: opaque ``data`` in the start event, no deltas."""
    return Block({"type": "redacted_thinking", "data": data})


def _json_deltas(value: Any, pieces: int | Sequence[str]) -> tuple[dict[str, Any], ...]:
    # The API opens with an empty partial_json, then sends the arguments' JSON in arbitrary cuts.
    text = value if isinstance(value, str) else json.dumps(value)
    return tuple({"type": "input_json_delta", "partial_json": p} for p in ["", *_pieces(text, pieces)])


def tool_use_block(name: str, input: Any, *, id: str = "toolu_01FakeToolUse", pieces: int | Sequence[str] = 3) -> Block:
    """A client tool call. ``input`` is a JSON value, or a str sent as is (e.g. broken JSON)."""
    return Block({"type": "tool_use", "id": id, "name": name, "input": {}}, _json_deltas(input, pieces))


def server_tool_use_block(query: str, *, id: str = "srvtoolu_01FakeWebSearch") -> Block:
    """The model calling the server-side web search tool (the API runs it; no tool_result is expected)."""
    return Block(
        {"type": "server_tool_use", "id": id, "name": "web_search", "input": {}}, _json_deltas({"query": query}, 2)
    )


def web_search_result_block(
    results: Iterable[tuple[str, str]], *, tool_use_id: str = "srvtoolu_01FakeWebSearch"
) -> Block:
    """The search results, complete in the start event: ``(url, title)`` pairs."""
    content = [
        {
            "type": "web_search_result",
            "url": url,
            "title": title,
            "encrypted_content": "EqgfCioIARgBIiQ3",
            "page_age": None,
        }
        for url, title in results
    ]
    return Block({"type": "web_search_tool_result", "tool_use_id": tool_use_id, "content": content})


def web_citation(url: str, title: str | None, cited_text: str = "cited text") -> dict[str, Any]:
    return {
        "type": "web_search_result_location",
        "url": url,
        "title": title,
        "cited_text": cited_text,
        "encrypted_index": "Eo8BCioIAhgB",
    }


def char_citation(
    cited_text: str, *, document_index: int = 0, document_title: str | None = "Document"
) -> dict[str, Any]:
    """A citation into a plain-text document of the request (it has no URL)."""
    return {
        "type": "char_location",
        "cited_text": cited_text,
        "document_index": document_index,
        "document_title": document_title,
        "start_char_index": 0,
        "end_char_index": len(cited_text),
    }


# --- whole responses ----------------------------------------------------------------------------


def message_response(
    *blocks: Block,
    stop_reason: str | None = "end_turn",
    usage: dict[str, Any] | None = None,
    delta_usages: Sequence[dict[str, Any]] | None = None,
    stop: bool = True,
) -> FakeResponse:
    """A complete streamed message of ``blocks``.

    ``usage`` overrides fields of message_start's usage. ``delta_usages`` are the usage objects of one or more
    message_delta events (cumulative, like the API's; only the last carries ``stop_reason``); by default one
    with an output count derived from the blocks and, when the model used server tools, their
    ``server_tool_use`` counts (``{"web_search_requests": N}``). ``stop=False`` leaves out message_stop.
    """
    start_usage = {
        "input_tokens": 25,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 1,
    }
    start_usage.update(usage or {})
    message = {
        "id": "msg_01FakeMessage",
        "type": "message",
        "role": "assistant",
        "model": None,  # filled with the requested model when served
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": start_usage,
    }
    events: list[Event] = [("message_start", {"type": "message_start", "message": message}), ("ping", {"type": "ping"})]
    for index, block in enumerate(blocks):
        events.append(
            ("content_block_start", {"type": "content_block_start", "index": index, "content_block": block.start})
        )
        events += [
            ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d}) for d in block.deltas
        ]
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    if delta_usages is None:
        delta_usages = [{"output_tokens": max(1, sum(len(b.deltas) for b in blocks))}]
        # Like the API: the server tools the model used, counted in the final usage (billed per use).
        server_tools: dict[str, int] = {}
        for b in blocks:
            if b.start.get("type") == "server_tool_use":
                name = f"{b.start.get('name')}_requests"
                server_tools[name] = server_tools.get(name, 0) + 1
        if server_tools:
            delta_usages[0]["server_tool_use"] = server_tools
    for i, delta_usage in enumerate(delta_usages):
        last = i == len(delta_usages) - 1
        delta = {"stop_reason": stop_reason if last else None, "stop_sequence": None}
        events.append(("message_delta", {"type": "message_delta", "delta": delta, "usage": delta_usage}))
    if stop:
        events.append(("message_stop", {"type": "message_stop"}))
    return FakeResponse(tuple(events))


def text_response(text: str = DEFAULT_TEXT, *, chunks: int | Sequence[str] = 3, **kwargs: Any) -> FakeResponse:
    """A plain answer; ``chunks`` text deltas. Takes ``message_response``'s keyword arguments."""
    return message_response(text_block(text, chunks=chunks), **kwargs)


def thinking_response(
    thinking: str = "Let me think about this.",
    text: str = "The answer is 42.",
    *,
    signature: str = DEFAULT_SIGNATURE,
    redacted: bool = False,
    **kwargs: Any,
) -> FakeResponse:
    """Thinking (with its signature), optionally a redacted thinking block, then the answer."""
    blocks = [thinking_block(thinking, signature=signature)]
    if redacted:
        blocks.append(redacted_thinking_block())
    return message_response(*blocks, text_block(text), **kwargs)


def tool_use_response(
    name: str,
    input: Any,
    *,
    id: str = "toolu_01FakeToolUse",
    text: str | None = None,
    pieces: int | Sequence[str] = 3,
    **kwargs: Any,
) -> FakeResponse:
    """Optional text, then one tool call; ``stop_reason`` is ``tool_use``."""
    blocks = [text_block(text)] if text else []
    blocks.append(tool_use_block(name, input, id=id, pieces=pieces))
    kwargs.setdefault("stop_reason", "tool_use")
    return message_response(*blocks, **kwargs)


def citations_response(
    results: Sequence[tuple[str, str]] = (
        ("https://example.com/a", "Page A"),
        ("https://example.com/b", "Page B"),
    ),
    cited: Sequence[tuple[str, str]] = (("https://example.com/a", "Page A"), ("https://example.com/c", "Page C")),
    *,
    query: str = "fake query",
    text: str = "According to the sources, it is so.",
    **kwargs: Any,
) -> FakeResponse:
    """A web search answer: a server_tool_use block, its results, then text citing ``cited`` plus a document.

    The defaults cite one URL twice (result and citation), so sources must be deduplicated.
    """
    return message_response(
        text_block("Let me search.", chunks=1),
        server_tool_use_block(query),
        web_search_result_block(results),
        text_block(text, citations=[*(web_citation(u, t) for u, t in cited), char_citation("so")]),
        usage={"server_tool_use": {"web_search_requests": 1}},
        **kwargs,
    )


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def error_body(type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": type, "message": message}, "request_id": "req_01FakeRequest"}


def error_status(
    status: int, message: str | None = None, *, type: str | None = None, retry_after: float | None = None
) -> FakeResponse:
    """An HTTP error before any streaming, with Anthropic's JSON error body (and ``retry-after`` if given)."""
    error_type = type or _ERROR_TYPES.get(status, "api_error")
    headers = {"request-id": "req_01FakeRequest"}
    if retry_after is not None:
        headers["retry-after"] = f"{retry_after:g}"
    return FakeResponse(
        status=status, error=error_body(error_type, message or error_type.replace("_", " ")), headers=headers
    )


def error_event(
    type: str = "overloaded_error", message: str = "Overloaded", *, text: str | None = None
) -> FakeResponse:
    """HTTP 200, message_start, optionally some ``text``, then an ``error`` event; the stream ends there."""
    events = list(message_response(*([text_block(text)] if text else []), stop=False).events)
    while events[-1][0] == "message_delta":
        events.pop()
    if text:
        events.pop()  # the block does not get to its content_block_stop either
    events.append(("error", error_body(type, message)))
    return FakeResponse(tuple(events))


def malformed_response(
    raw: str = '{"type": "content_block_delta", "index": 0, "delta": {"type": "text_de',
) -> FakeResponse:
    """A stream that starts well, then sends ``raw`` as the data of an event (by default, truncated JSON)."""
    events = list(text_response("Hello", chunks=1).events[:4])  # message_start, ping, block start, one delta
    events.append(("content_block_delta", raw))
    return FakeResponse(tuple(events))


# Models whose Models API objects say they accept adaptive thinking (4.6 and later); older ones take only
# the budget form. Unknown ids are treated as new models.
ADAPTIVE_MODELS = (
    "claude-opus-4-6",
    "claude-sonnet-4-6",
    "claude-opus-4-7",
    "claude-opus-4-8",
    "claude-sonnet-5",
    "claude-opus-5",
    "claude-haiku-5",
    "claude-mythos",
    "claude-fable",
)
BUDGET_ONLY_MODELS = ("claude-3", "claude-sonnet-4", "claude-opus-4", "claude-haiku-4")


EFFORT_LEVELS = ("low", "medium", "high", "max")


def accepts_adaptive(model_id: str) -> bool:
    return model_id.startswith(ADAPTIVE_MODELS) or not model_id.startswith(BUDGET_ONLY_MODELS)


def model_object(
    id: str,
    *,
    thinking: bool = True,
    adaptive_only: bool = False,
    adaptive: bool | None = None,
    max_input_tokens: int = 200_000,
    max_tokens: int = 64_000,
    deprecated_at: str | None = None,
) -> dict[str, Any]:
    """A Models API object; ``capabilities.thinking.types`` says which thinking forms the model accepts
    (``adaptive``: whether it takes adaptive thinking; by default as the real API says for that model)."""
    yes, no = {"supported": True}, {"supported": False}
    adaptive = accepts_adaptive(id) if adaptive is None else adaptive
    types = {
        "enabled": yes if thinking and not adaptive_only else no,
        "adaptive": yes if thinking and (adaptive or adaptive_only) else no,
        "disabled": yes,
        "between_tools": no,
    }
    return {
        "type": "model",
        "id": id,
        "display_name": id.replace("-", " ").title(),
        "created_at": "2025-09-29T00:00:00Z",
        "deprecated_at": deprecated_at,
        "lifecycle": "deprecated" if deprecated_at else "active",
        "max_input_tokens": max_input_tokens,
        "max_tokens": max_tokens,
        "capabilities": {
            "batch": yes,
            "citations": yes,
            "code_execution": no,
            "context_management": {"supported": False},
            # effort (output_config.effort) on the models that take adaptive thinking, as the real API has it
            "effort": {"supported": adaptive, **{level: yes if adaptive else no for level in EFFORT_LEVELS}},
            "image_input": yes,
            "pdf_input": yes,
            "server_tools": {"supported": True, "code_execution": no, "web_search": yes},
            "structured_outputs": yes,
            "thinking": {"supported": thinking, "types": types},
        },
    }


# --- prompt caching -----------------------------------------------------------------------------

# The shortest prefix a model caches, as the real API has it (by model name prefix); others: 1024 tokens.
MIN_CACHEABLE = {"claude-opus-4-5": 4096, "claude-haiku-4-5": 4096, "claude-3-5-haiku": 2048, "claude-3-haiku": 2048}
CACHE_TTLS = {"5m": 300.0, "1h": 3600.0}
LOOKBACK_BLOCKS = 20


def fake_tokens(text: str) -> int:
    """The fake's tokenizer: one token per 4 UTF-8 bytes, rounded up (deterministic, no vocabulary)."""
    return -(-len(text.encode()) // 4)


def _block_text(block: Any) -> str:
    if isinstance(block, str):
        return block
    kind = block.get("type")
    if kind == "text":
        return str(block.get("text", ""))
    if kind == "thinking":
        return str(block.get("thinking", ""))
    if kind == "tool_result":
        content = block.get("content", "")
        return content if isinstance(content, str) else json.dumps(content)
    if kind == "tool_use":
        return block.get("name", "") + json.dumps(block.get("input"))
    return json.dumps({k: v for k, v in block.items() if k != "cache_control"}, sort_keys=True)


def prompt_blocks(body: dict[str, Any]) -> list[tuple[str, int, dict[str, Any] | None]]:
    """The request's prompt as (block fingerprint, tokens, cache_control) in cache order: tools, system, messages."""
    out: list[tuple[str, int, dict[str, Any] | None]] = []
    for tool in body.get("tools") or []:
        plain = {k: v for k, v in tool.items() if k != "cache_control"}
        text = json.dumps(plain, sort_keys=True)
        out.append(("tool" + text, fake_tokens(text), tool.get("cache_control")))
    system = body.get("system")
    for block in [system] if isinstance(system, str) else system or []:
        text = _block_text(block)
        out.append(("system" + text, fake_tokens(text), None if isinstance(block, str) else block.get("cache_control")))
    for message in body.get("messages") or []:
        content = message.get("content")
        for block in [content] if isinstance(content, str) else content or []:
            text = _block_text(block)
            control = None if isinstance(block, str) else block.get("cache_control")
            out.append((message.get("role", "") + text, fake_tokens(text), control))
    return out


class PromptCache:
    """Prefixes cached by earlier requests (fingerprint -> expiry), and the usage a request reports."""

    def __init__(self) -> None:
        self.entries: dict[str, float] = {}
        self.offset = 0.0

    def now(self) -> float:
        return time.monotonic() + self.offset

    def usage(self, body: dict[str, Any]) -> dict[str, Any]:
        blocks = prompt_blocks(body)
        # The API keeps a cache per model: another model's prefix is never read.
        keys, totals, running, total = [], [], hashlib.sha256(str(body.get("model", "")).encode() + b"\0"), 0
        for fingerprint, tokens, _ in blocks:
            running.update(fingerprint.encode() + b"\0")
            keys.append(running.hexdigest())
            total += tokens
            totals.append(total)
        name = str(body.get("model", ""))
        minimum = next((n for prefix, n in MIN_CACHEABLE.items() if name.startswith(prefix)), 1024)
        now = self.now()
        breakpoints = [i for i, b in enumerate(blocks) if b[2] is not None and totals[i] >= minimum]
        if not breakpoints:
            return {"input_tokens": total, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        read_at = -1
        for bp in breakpoints:
            for j in range(bp, max(-1, bp - LOOKBACK_BLOCKS), -1):
                if self.entries.get(keys[j], 0.0) > now:
                    read_at = max(read_at, j)
                    break
        last = breakpoints[-1]
        read = totals[read_at] if read_at >= 0 else 0
        written = {"5m": 0, "1h": 0}
        start = read
        for bp in breakpoints:
            control = blocks[bp][2] or {}
            ttl = control.get("ttl", "5m")
            if totals[bp] > start:
                written[ttl] = written.get(ttl, 0) + totals[bp] - start
                start = totals[bp]
            self.entries[keys[bp]] = max(self.entries.get(keys[bp], 0.0), now + CACHE_TTLS.get(ttl, 300.0))
        if read_at >= 0:  # a read refreshes the entry's lifetime
            self.entries[keys[read_at]] = max(self.entries[keys[read_at]], now + 300.0)
        return {
            "input_tokens": total - totals[last],
            "cache_creation_input_tokens": totals[last] - read,
            "cache_read_input_tokens": read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": written["5m"],
                "ephemeral_1h_input_tokens": written["1h"],
            },
        }


# --- the server ---------------------------------------------------------------------------------


class FakeAnthropic(FakeUpstream[FakeResponse]):
    """The fake upstream. ``url`` is the ``base_url`` for the SDK (the SDK adds ``/v1/...``).

    ``api_key``: when set, other keys get a 401. ``models``: Models API objects by id; with ``any_model``
    an unknown id gets a default ``model_object`` instead of a 404. ``count_tokens``: the ``input_tokens``
    that ``/v1/messages/count_tokens`` answers (None: that endpoint answers 404, like an older proxy);
    ``count_requests`` records its calls.
    """

    def __init__(
        self,
        default: FakeResponse | None = None,
        *,
        api_key: str | None = None,
        validate: bool = True,
        caching: bool = False,
    ) -> None:
        super().__init__(default or text_response())
        self.caching = caching
        self.prompt_cache = PromptCache()
        self.reported: list[dict[str, Any]] = []  # with caching: the input usage each answered request reported
        self.api_key = api_key
        self.validate = validate
        self.requests: list[RecordedRequest] = []
        # Whether ``requests`` keeps what came: a standalone fake (benchmarks) keeps nothing, as nobody reads it and a
        # long session's bodies (2 MB each, a thousand turns) added up to gigabytes and slowed every side's answers.
        self.keep_requests = True
        self.models: dict[str, dict[str, Any]] = {}
        self.any_model = True
        self.model_requests: list[str] = []
        self.count_tokens: int | None = 42
        self.count_requests: list[RecordedRequest] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def advance(self, seconds: float) -> None:
        """Move the prompt cache's clock forward (cached prefixes expire)."""
        self.prompt_cache.offset += seconds

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/messages/count_tokens", self._count_tokens)
        app.router.add_get("/v1/models", self._list_models)
        app.router.add_get("/v1/models/{model_id}", self._retrieve_model)

    # --- Messages API ---

    async def _count_tokens(self, request: web.Request) -> web.Response:
        body, headers = await self.read(request)
        recorded = RecordedRequest(request.path, body, headers, await request.read(), request.query_string)
        self.count_requests.append(recorded)
        if self.count_tokens is None:
            return web.json_response(error_body("not_found_error", "Not Found"), status=404)
        if recorded.api_key is None:
            return web.json_response(error_body("authentication_error", "x-api-key header is required"), status=401)
        if self.api_key is not None and recorded.api_key != self.api_key:
            return web.json_response(error_body("authentication_error", "invalid x-api-key"), status=401)
        return web.json_response({"input_tokens": self.count_tokens})

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body, headers = await self.read(request)
        recorded = RecordedRequest(request.path, body, headers, await request.read(), request.query_string)
        if self.keep_requests:
            self.requests.append(recorded)
        problem = self._check(recorded) if self.validate else None
        if problem is not None:
            return web.json_response(error_body(*problem[1:]), status=problem[0])
        script = self.next_response()
        if script.silent and not await self.pause(request, script.silent):
            recorded.disconnected = True
            return web.Response()
        if script.status != 200:
            return web.json_response(script.error or {}, status=script.status, headers=script.headers)
        if self.caching and isinstance(body, dict):
            reported = self.prompt_cache.usage(body)
            self.reported.append(reported)
            script = _with_start_usage(script, reported)
        model = body.get("model") if isinstance(body, dict) else None
        if not (isinstance(body, dict) and body.get("stream")):
            return web.json_response(_fold(script.events, model), headers=script.headers)
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            return await self._stream(request, recorded, script, model)
        finally:
            self._handlers.discard(task)

    def _check(self, request: RecordedRequest) -> tuple[int, str, str] | None:
        """The request errors the real API reports before streaming: (status, error type, message)."""
        body, key = request.body, request.api_key
        if key is None:
            return 401, "authentication_error", "x-api-key header is required"
        if self.api_key is not None and key != self.api_key:
            return 401, "authentication_error", "invalid x-api-key"
        if "anthropic-version" not in request.headers:
            return 400, "invalid_request_error", "anthropic-version: header is required"
        if not isinstance(body, dict):
            return 400, "invalid_request_error", "There was an error parsing the body of your request"
        for name in ("model", "max_tokens", "messages"):
            if name not in body:
                return 400, "invalid_request_error", f"{name}: Field required"
        if (problem := _thinking_problem(body)) is not None:
            return 400, "invalid_request_error", problem
        effort = (body.get("output_config") or {}).get("effort")
        if effort is not None and (effort not in EFFORT_LEVELS or not accepts_adaptive(str(body["model"]))):
            return 400, "invalid_request_error", f"output_config.effort: {effort!r} is not supported by this model"
        if (problem := _structured_problem(body)) is not None:
            return 400, "invalid_request_error", problem
        marked = sum(1 for b in prompt_blocks(body) if b[2] is not None)
        if marked > 4:
            return (
                400,
                "invalid_request_error",
                f"A maximum of 4 blocks with cache_control may be provided. Found {marked}.",
            )
        ttls = [(b[2] or {}).get("ttl", "5m") for b in prompt_blocks(body) if b[2] is not None]
        first_short = ttls.index("5m") if "5m" in ttls else len(ttls)
        if "1h" in ttls[first_short:]:
            # A longer-lived entry must come first: its prefix would hold the shorter one's.
            return (
                400,
                "invalid_request_error",
                "a ttl='1h' cache_control block must not come after a ttl='5m' cache_control block. Note that "
                "blocks are processed in the following order: `tools`, `system`, `messages`.",
            )
        return None

    async def _stream(
        self, request: web.Request, recorded: RecordedRequest, script: FakeResponse, model: Any
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "request-id": "req_01FakeRequest",
                **script.headers,
            }
        )
        await resp.prepare(request)
        chunks = list(script._encoded)
        if chunks and script.events[0][0] == "message_start":
            start = script.events[0][1]
            assert isinstance(start, dict)
            chunks[0] = _sse("message_start", {**start, "message": {**start["message"], "model": model}})
        end = len(chunks) if script.cut is None else min(script.cut, len(chunks))
        try:
            if not script.delay and script.stall_after is None:
                await resp.write(b"".join(chunks[:end]))  # zero delay: one write, cheap for benchmarks
            else:
                for i, chunk in enumerate(chunks[:end]):
                    if i == script.stall_after and script.gate is not None:
                        while not script.gate.is_set():
                            if not await self.pause(request, 0.05):
                                recorded.disconnected = True
                                return resp
                    elif i == script.stall_after:
                        if not await self.pause(request, script.stall_seconds):
                            recorded.disconnected = True
                            return resp
                    elif i and script.delay:
                        await asyncio.sleep(script.delay)
                    await resp.write(chunk)
            if script.cut is not None and script.abort:
                assert request.transport is not None
                request.transport.abort()  # the client sees an incomplete chunked body
                return resp
            await resp.write_eof()
        except ConnectionResetError:
            recorded.disconnected = True  # the client hung up (e.g. timed out during a stall)
        return resp

    # --- Models API ---

    def _model(self, model_id: str) -> dict[str, Any] | None:
        if model_id in self.models:
            return self.models[model_id]
        return model_object(model_id) if self.any_model else None

    async def _retrieve_model(self, request: web.Request) -> web.Response:
        model_id = request.match_info["model_id"]
        self.model_requests.append(model_id)
        model = self._model(model_id)
        if model is None:
            return web.json_response(error_body("not_found_error", f"model: {model_id}"), status=404)
        return web.json_response(model)

    async def _list_models(self, request: web.Request) -> web.Response:
        data = list(self.models.values())
        return web.json_response(
            {
                "data": data,
                "has_more": False,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        )


# What structured outputs' schemas may not hold (the API's documented limits).
UNSUPPORTED_SCHEMA_KEYWORDS = (
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minLength",
    "maxLength",
    "maxItems",
    "uniqueItems",
)


def _structured_problem(body: dict[str, Any]) -> str | None:
    """Why the API refuses the schema of structured outputs or of a strict tool (the same grammar), or None."""
    output_format = (body.get("output_config") or {}).get("format")
    if isinstance(output_format, dict) and (problem := _schema_problem(output_format.get("schema"))):
        return f"output_config.format.schema: {problem}"
    for i, tool in enumerate(body.get("tools") or ()):
        if isinstance(tool, dict) and tool.get("strict") and (problem := _schema_problem(tool.get("input_schema"))):
            return f"tools.{i}.custom.input_schema: {problem}"
    return None


def _schema_problem(schema: Any) -> str | None:
    """Why structured outputs refuse ``schema`` (the first problem met), or None: every object must set
    ``additionalProperties: false``, and numeric, string-length and most array bounds are not supported."""
    if isinstance(schema, list):
        return next((p for p in map(_schema_problem, schema) if p is not None), None)
    if not isinstance(schema, dict):
        return None
    kind = schema.get("type")
    if kind == "object" and schema.get("additionalProperties") is not False:
        return "For 'object' type, 'additionalProperties' must be explicitly set to false"
    for keyword in UNSUPPORTED_SCHEMA_KEYWORDS:
        if keyword in schema:
            return f"For '{kind}' type, property '{keyword}' is not supported"
    for key in ("properties", "$defs", "definitions"):
        if isinstance(schema.get(key), dict):
            problem = _schema_problem(list(schema[key].values()))
            if problem is not None:
                return problem
    return _schema_problem([schema.get(k) for k in ("items", "anyOf", "allOf", "oneOf") if k in schema])


def _thinking_problem(body: dict[str, Any]) -> str | None:
    """What the real API refuses in ``thinking`` (and what goes with it), or None."""
    thinking = body.get("thinking") or {}
    if thinking.get("type") in ("enabled", "adaptive") and body.get("temperature", 1) != 1:
        return "`temperature` may only be set to 1 when thinking is enabled"
    if thinking.get("type") == "enabled":
        budget = thinking.get("budget_tokens", 0)
        if budget < 1024:
            return "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"
        if body["max_tokens"] <= budget:
            return "`max_tokens` must be greater than `thinking.budget_tokens`"
    # (With adaptive thinking the model may call tools without thinking first, so it is not asked back.)
    if thinking.get("type") == "enabled" and _tool_turn_without_thinking(body["messages"]):
        return (
            "Expected `thinking` or `redacted_thinking`, but found `tool_use`. When `thinking` is enabled, a "
            "final `assistant` message must start with a thinking block (preceeding the lastmost set of "
            "`tool_use` and `tool_result` blocks). To avoid this requirement, disable `thinking`."
        )
    if thinking.get("display", "summarized") not in ("summarized", "omitted"):
        return "thinking.display: Input should be 'summarized' or 'omitted'"
    return None


def _tool_turn_without_thinking(messages: Any) -> bool:
    """Whether the last assistant message calls tools without starting with a thinking block (what the API
    refuses while thinking is enabled: the signed thinking of a tool loop must come back)."""
    assistant = [m for m in messages if isinstance(m, dict) and m.get("role") == "assistant"] if messages else []
    blocks = assistant[-1].get("content") if assistant else None
    if not isinstance(blocks, list) or not any(isinstance(b, dict) and b.get("type") == "tool_use" for b in blocks):
        return False
    return not (isinstance(blocks[0], dict) and blocks[0].get("type") in ("thinking", "redacted_thinking"))


def _with_start_usage(script: FakeResponse, usage: dict[str, Any]) -> FakeResponse:
    """``script`` with message_start's input counts replaced (what the prompt cache computed)."""
    events = list(script.events)
    if events and events[0][0] == "message_start" and isinstance(events[0][1], dict):
        start = events[0][1]
        message = {**start["message"], "usage": {**start["message"]["usage"], **usage}}
        events[0] = ("message_start", {**start, "message": message})
    return replace(script, events=tuple(events))


def _fold(events: Iterable[Event], model: Any) -> dict[str, Any]:
    """A script folded into one non-streamed Message (``stream: false``)."""
    message: dict[str, Any] = {}
    partial_json: dict[int, str] = {}
    for name, data in events:
        if not isinstance(data, dict):
            continue
        if name == "message_start":
            message = {**data["message"], "model": model, "content": [], "usage": dict(data["message"]["usage"])}
        elif name == "content_block_start":
            message["content"].append(dict(data["content_block"]))
        elif name == "content_block_delta":
            block, delta = message["content"][data["index"]], data["delta"]
            kind = delta["type"]
            if kind == "text_delta":
                block["text"] += delta["text"]
            elif kind == "thinking_delta":
                block["thinking"] += delta["thinking"]
            elif kind == "signature_delta":
                block["signature"] = delta["signature"]
            elif kind == "citations_delta":
                block.setdefault("citations", []).append(delta["citation"])
            elif kind == "input_json_delta":
                partial_json[data["index"]] = partial_json.get(data["index"], "") + delta["partial_json"]
        elif name == "content_block_stop" and data["index"] in partial_json:
            message["content"][data["index"]]["input"] = json.loads(partial_json[data["index"]] or "{}")
        elif name == "message_delta":
            message.update(data["delta"])
            message["usage"].update(data["usage"])
    return message


@asynccontextmanager
async def started_fake_anthropic(
    default: FakeResponse | None = None, *, api_key: str | None = None, validate: bool = True, caching: bool = False
) -> AsyncIterator[FakeAnthropic]:
    fake = await FakeAnthropic(default, api_key=api_key, validate=validate, caching=caching).start()
    try:
        yield fake
    finally:
        await fake.close()


async def _serve(port: int, deltas: int | None) -> None:
    default = text_response("tok " * deltas, chunks=deltas) if deltas else None
    fake = await FakeAnthropic(default).start(port)
    fake.keep_requests = False
    print(f"fake Anthropic upstream at {fake.url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await fake.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Serve the fake Anthropic API on 127.0.0.1.")
    parser.add_argument("port", type=int, nargs="?", default=0)
    parser.add_argument("--deltas", type=int, help="answer every request with this many text deltas")
    args = parser.parse_args()
    try:
        asyncio.run(_serve(args.port, args.deltas))
    except KeyboardInterrupt:
        pass
