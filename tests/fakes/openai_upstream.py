"""A fake OpenAI Chat Completions API (and /v1/embeddings, /v1/responses) on 127.0.0.1, speaking the real wire
format over HTTP.

Responses are scripted with the builders below and served in order (``default`` when the queue is empty)::

    async with started_fake_openai() as fake:
        fake.enqueue(text_response("Hello!", reasoning="Let me think", usage=usage(12, 3, cached=4)))
        fake.enqueue(tool_calls_response(tool_call("call_1", "get_weather", ['{"city"', ': "Paris"}'])))
        fake.enqueue(error_status(429, "Rate limit reached", retry_after=2))
        fake.enqueue(text_response("Hi").cut_after(2))        # drop the connection after 2 SSE events
        ...  # point a client at fake.url ("http://127.0.0.1:PORT/v1"): litellm's api_base, the SDK's base_url
        fake.requests[0].body["messages"], fake.requests[0].headers["authorization"]

In tests, use the ``fake_openai`` fixture (import it into a conftest) instead of the context manager.

A streamed answer is a sequence of ``data: JSON\\n\\n`` server-sent events::

    {"id", "object": "chat.completion.chunk", "created", "model",
     "choices": [{"index": 0, "delta": {role, content, reasoning_content, annotations,
                                        tool_calls: [{index, id, type, function: {name, arguments}}]},
                  "finish_reason": null}]}                                       (one per delta)
    {... "choices": [{"index": 0, "delta": {}, "finish_reason": "stop" | "length" | "tool_calls" | ...}]}
    {... "choices": [], "usage": {prompt_tokens, completion_tokens, total_tokens,
                                  prompt_tokens_details: {cached_tokens},
                                  completion_tokens_details: {reasoning_tokens}}}  (if stream_options.include_usage)
    [DONE]

Tool-call arguments arrive in pieces: the first delta of a call carries ``id``, ``type`` and ``function.name``,
the later ones only ``index`` and an ``arguments`` piece. Failures before streaming are HTTP statuses with
the JSON body ``{"error": {"message", "type", "param", "code"}}``. ``stream: false`` gets the same script
folded into one ``chat.completion`` object.

Run ``python -m tests.fakes.openai_upstream [PORT]`` to serve the default answer for manual tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import sys
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from aiohttp import web

from tests.fakes.server import FakeUpstream

DEFAULT_TEXT = "Hello from the fake OpenAI upstream."

# A delta is a chunk's ``choices[0].delta``; a str is sent verbatim as an event's data (malformed chunks).
Delta = dict[str, Any] | str


# The service tiers a request may ask for that the upstream then serves it at (OpenAI's chunks say which).
SERVED_TIERS = ("priority", "flex")


@dataclass(frozen=True)
class FakeResponse:
    """One scripted answer: a 200 event stream, or an error status with OpenAI's JSON error body.

    ``usage`` is None for a server that sends no usage chunk even when asked. Modifiers return a changed
    copy, so a response can be reused (e.g. as ``default``).
    """

    deltas: tuple[Delta, ...] = ()
    finish_reason: str | None = "stop"
    usage: dict[str, Any] | None = None
    status: int = 200
    error: dict[str, Any] | None = None  # the JSON body of an error status
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds between events
    cut: int | None = None  # end the stream after this many events, before the finish chunk
    abort: bool = True  # how to cut: drop the TCP connection (True) or end the HTTP body cleanly
    stall_after: int | None = None  # stop sending for ``stall_seconds`` after this many events
    stall_seconds: float = 0.0

    def cut_after(self, n_events: int, *, abort: bool = True) -> FakeResponse:
        """End the stream after ``n_events`` delta events: no finish_reason, no usage, no ``[DONE]``."""
        return replace(self, cut=n_events, abort=abort)

    def stall(self, seconds: float, *, after: int = 1) -> FakeResponse:
        return replace(self, stall_after=after, stall_seconds=seconds)

    def with_delay(self, seconds: float) -> FakeResponse:
        return replace(self, delay=seconds)

    def without_usage(self) -> FakeResponse:
        return replace(self, usage=None)

    def _encoded(self, head: dict[str, Any], include_usage: bool) -> list[bytes]:
        events: list[dict[str, Any] | str] = [
            d
            if isinstance(d, str)
            else {**head, "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": None}]}
            for d in self.deltas
        ]
        if self.cut is not None:
            return [_sse(e) for e in events[: self.cut]]
        if self.finish_reason is not None:
            events.append(
                {**head, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": self.finish_reason}]}
            )
        if include_usage and self.usage is not None:
            events.append({**head, "choices": [], "usage": self.usage})
        events.append("[DONE]")
        return [_sse(e) for e in events]


@dataclass
class RecordedRequest:
    path: str
    body: Any  # the parsed JSON body (None if it was not JSON)
    headers: dict[str, str]  # lower-case names
    disconnected: bool = False  # the client hung up before the stream was complete


def _sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


# --- builders -------------------------------------------------------------------------------------


def usage(prompt: int, completion: int, *, cached: int = 0, reasoning: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; ``prompt`` includes the ``cached`` tokens, ``completion`` the ``reasoning`` ones."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0},
    }


def _pieces(text: str, chunks: int | Sequence[str]) -> list[str]:
    if not isinstance(chunks, int):
        return list(chunks)
    size = max(1, -(-len(text) // max(1, chunks)))
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def text_deltas(text: str, chunks: int | Sequence[str] = 3) -> list[Delta]:
    return [{"content": p} for p in _pieces(text, chunks)]


def reasoning_deltas(text: str, chunks: int | Sequence[str] = 2) -> list[Delta]:
    """``reasoning_content`` deltas, as DeepSeek, vLLM and most OpenAI-compatible reasoning servers send them."""
    return [{"reasoning_content": p} for p in _pieces(text, chunks)]


def annotations_delta(*sources: tuple[str, str | None]) -> Delta:
    """``url_citation`` annotations, as OpenAI's search models stream them: ``(url, title)`` pairs."""
    return {
        "annotations": [
            {"type": "url_citation", "url_citation": {"url": url, "title": title, "start_index": 0, "end_index": 0}}
            for url, title in sources
        ]
    }


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: tuple[str, ...]  # streamed in these pieces; joined, they are the JSON arguments


def tool_call(id: str, name: str, arguments: str | Sequence[str] | dict[str, Any]) -> ToolCall:
    """A call whose arguments (a JSON string, its pieces, or a dict sent as JSON in 3 pieces) are streamed."""
    if isinstance(arguments, dict):
        arguments = _pieces(json.dumps(arguments), 3)
    return ToolCall(id, name, (arguments,) if isinstance(arguments, str) else tuple(arguments))


def tool_call_deltas(*calls: ToolCall, interleave: bool = False) -> list[Delta]:
    """All deltas of ``calls``; ``interleave`` alternates argument pieces between calls, as vLLM may."""
    heads: list[Delta] = [
        {"tool_calls": [{"index": i, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": ""}}]}
        for i, c in enumerate(calls)
    ]
    pieces = [
        [{"tool_calls": [{"index": i, "function": {"arguments": a}}]} for a in c.arguments] for i, c in enumerate(calls)
    ]
    if not interleave:
        return [d for head, ps in zip(heads, pieces) for d in (head, *ps)]
    out: list[Delta] = list(heads)
    for round_ in range(max((len(p) for p in pieces), default=0)):
        out.extend(p[round_] for p in pieces if round_ < len(p))
    return out


def stream_response(
    *deltas: Delta | Iterable[Delta], finish_reason: str | None = "stop", usage: dict[str, Any] | None = None
) -> FakeResponse:
    """A 200 stream of ``deltas`` (single deltas or lists of them), opened by ``{"role": "assistant"}``."""
    flat: list[Delta] = [{"role": "assistant", "content": ""}]
    for d in deltas:
        flat.extend([d] if isinstance(d, (dict, str)) else d)
    return FakeResponse(tuple(flat), finish_reason, usage if usage is not None else _DEFAULT_USAGE)


def text_response(
    text: str = DEFAULT_TEXT,
    *,
    chunks: int | Sequence[str] = 3,
    reasoning: str | None = None,
    finish_reason: str = "stop",
    usage: dict[str, Any] | None = None,
) -> FakeResponse:
    return stream_response(
        reasoning_deltas(reasoning) if reasoning else [],
        text_deltas(text, chunks),
        finish_reason=finish_reason,
        usage=usage,
    )


def tool_calls_response(
    *calls: ToolCall, text: str | None = None, interleave: bool = False, usage: dict[str, Any] | None = None
) -> FakeResponse:
    return stream_response(
        text_deltas(text) if text else [],
        tool_call_deltas(*calls, interleave=interleave),
        finish_reason="tool_calls",
        usage=usage,
    )


def annotations_response(
    text: str, *sources: tuple[str, str | None], usage: dict[str, Any] | None = None
) -> FakeResponse:
    """Text followed by its ``url_citation`` annotations in one delta, as gpt-4o-search-preview sends them."""
    return stream_response(text_deltas(text), annotations_delta(*sources), usage=usage)


def malformed_response(raw: str = '{"id": "chatcmpl-fake", "choices": [{"index": 0, "delta": {"cont') -> FakeResponse:
    """A stream that starts well, then sends ``raw`` as an event's data (by default, truncated JSON)."""
    return stream_response(text_deltas("Hello", 1), raw)


_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None),
    503: ("server_error", None),
}


def error_body(message: str, type: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": None, "code": code}}


def error_status(
    status: int,
    message: str | None = None,
    *,
    type: str | None = None,
    code: str | None = None,
    retry_after: float | None = None,
) -> FakeResponse:
    """An HTTP error before any streaming, with OpenAI's JSON error body (and ``retry-after`` if given)."""
    default_type, default_code = _ERROR_TYPES.get(status, ("server_error", None))
    headers = {"x-request-id": "req_fake"}
    if retry_after is not None:
        headers["retry-after"] = f"{retry_after:g}"
    body = error_body(message or f"fake error {status}", type or default_type, code or default_code)
    return FakeResponse(status=status, error=body, headers=headers)


_DEFAULT_USAGE = usage(20, 10)


# --- the server -----------------------------------------------------------------------------------


class FakeOpenAI(FakeUpstream[FakeResponse]):
    """The fake upstream. ``url`` is the base URL clients use; it ends in ``/v1``.

    ``api_key``: when set, requests without ``Authorization: Bearer <api_key>`` get OpenAI's 401.
    """

    def __init__(self, default: FakeResponse | None = None, *, api_key: str | None = None) -> None:
        super().__init__(default or text_response())
        self.api_key = api_key
        self.requests: list[RecordedRequest] = []
        self.embedding_tokens: int | None = None  # the usage /v1/embeddings reports (None: one per word)
        self._created = int(time.time())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/embeddings", self._embeddings)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_post("/responses", self._responses)

    async def _embeddings(self, request: web.Request) -> web.Response:
        """OpenAI's embeddings: a deterministic vector per input (``dimensions`` long, 8 by default), as floats
        or base64 little-endian float32 (``encoding_format``); ``usage.prompt_tokens`` is
        ``embedding_tokens`` when set, else one per word (or token id)."""
        body, headers = await self.read(request)
        self.requests.append(RecordedRequest(request.path, body, headers))
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            return web.json_response(
                error_body("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"), status=401
            )
        script = self.next_response()
        if script.delay and not await self.pause(request, script.delay):  # a slow answer (``with_delay``)
            return web.Response()  # the client hung up meanwhile
        if script.status != 200:
            return web.json_response(script.error or {}, status=script.status, headers=script.headers)
        inputs = body.get("input")
        inputs = [inputs] if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)) else inputs
        size = int(body.get("dimensions") or 8)
        data = []
        for i, item in enumerate(inputs):
            vector = [((hash(str(item)) >> (k % 32)) % 1000) / 1000 for k in range(size)]
            encoded: Any = vector
            if body.get("encoding_format") == "base64":
                encoded = base64.b64encode(struct.pack(f"<{size}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": encoded})
        tokens = self.embedding_tokens
        if tokens is None:
            tokens = sum(len(item.split()) if isinstance(item, str) else len(item) for item in inputs)
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": body.get("model"),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body, headers = await self.read(request)
        recorded = RecordedRequest(request.path, body, headers)
        self.requests.append(recorded)
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            message = (
                "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys."
            )
            return web.json_response(error_body(message, "invalid_request_error", "invalid_api_key"), status=401)
        if not isinstance(body, dict):
            message = "We could not parse the JSON body of your request."
            return web.json_response(error_body(message, "invalid_request_error"), status=400)
        not_data = _file_data_not_inline(body)
        if not_data is not None:  # file_data is the file's bytes: the API fetches no URL
            message = (
                f"Invalid value for '{not_data}': Expected a base64-encoded data URL with an application/pdf MIME "
                "type (e.g. 'data:application/pdf;base64,SGVsbG8sIFdvcmxkIQ=='), but got a value without the "
                "'data:' prefix."
            )
            error = error_body(message, "invalid_request_error", "invalid_value")
            error["error"]["param"] = not_data
            return web.json_response(error, status=400)
        missing = _file_without_name(body)
        if missing is not None:  # the API takes inline file data only with a filename
            message = f"Missing required parameter: '{missing}'."
            error = error_body(message, "invalid_request_error", "missing_required_parameter")
            return web.json_response(error, status=400)
        not_strict = _strict_schema_problem(body)
        if not_strict is not None:  # Structured Outputs' rules for a strict schema
            return web.json_response(error_body(not_strict, "invalid_request_error", "invalid_json_schema"), status=400)
        too_large = _output_limit_passed(body)
        if too_large is not None:  # the API refuses an output limit past the model's own
            error = error_body(too_large, "invalid_request_error", "invalid_value")
            error["error"]["param"] = "max_tokens"
            return web.json_response(error, status=400)
        script = self.next_response()
        if script.status != 200:
            return web.json_response(script.error or {}, status=script.status, headers=script.headers)
        model = body.get("model", "gpt-4o-mini")
        if not body.get("stream"):
            return web.json_response(_fold(script, model, self._created), headers=script.headers)
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return await self._stream(request, recorded, script, model, include_usage)
        finally:
            self._handlers.discard(task)

    async def _stream(
        self, request: web.Request, recorded: RecordedRequest, script: FakeResponse, model: str, include_usage: bool
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache", **script.headers}
        )
        await resp.prepare(request)
        head = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": model,
            "system_fingerprint": "fp_fake",
            "service_tier": recorded.body.get("service_tier")
            if recorded.body.get("service_tier") in SERVED_TIERS
            else "default",
        }
        chunks = script._encoded(head, include_usage)
        try:
            if not script.delay and script.stall_after is None:
                await resp.write(b"".join(chunks))  # zero delay: one write, cheap for benchmarks
            else:
                for i, chunk in enumerate(chunks):
                    if i == script.stall_after:
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
            recorded.disconnected = True  # the client hung up (abort, or a timeout during a stall)
        return resp

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        """The Responses API (what OpenAI's Responses-only models, such as gpt-5.3-codex, answer on): the same
        scripts, as Responses events (streamed) or one ``response`` object."""
        body, headers = await self.read(request)
        self.requests.append(RecordedRequest(request.path, body, headers))
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            return web.json_response(
                error_body("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"), status=401
            )
        if not isinstance(body, dict):
            message = "We could not parse the JSON body of your request."
            return web.json_response(error_body(message, "invalid_request_error"), status=400)
        script = self.next_response()
        if script.status != 200:
            return web.json_response(script.error or {}, status=script.status, headers=script.headers)
        events = _responses_events(script, body, self._created)
        if not body.get("stream"):
            return web.json_response(events[-1]["response"], headers=script.headers)
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache", **script.headers}
        )
        await resp.prepare(request)
        frames = [f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events]
        await resp.write(b"".join(frames if script.cut is None else frames[: script.cut]))
        await resp.write_eof()
        return resp


def _responses_events(script: FakeResponse, body: dict[str, Any], created: int) -> list[dict[str, Any]]:
    """A script as the Responses API streams it: ``response.created``, each output item (reasoning summary,
    message text, function calls) added, its deltas, done, then ``response.completed`` (``incomplete`` for a
    length finish) with the Responses usage."""
    response: dict[str, Any] = {
        "id": "resp_fake",
        "object": "response",
        "created_at": created,
        "status": "in_progress",
        "model": body.get("model"),
        "output": [],
        "usage": None,
    }
    events: list[dict[str, Any]] = [{"type": "response.created", "response": dict(response)}]
    output: list[dict[str, Any]] = []
    message = _fold(script, str(body.get("model")), created)["choices"][0]["message"]
    if message.get("reasoning_content"):
        text = message["reasoning_content"]
        item = {"id": "rs_fake", "type": "reasoning", "summary": [{"type": "summary_text", "text": text}]}
        events.append(
            {"type": "response.output_item.added", "output_index": len(output), "item": {**item, "summary": []}}
        )
        events.append(
            {
                "type": "response.reasoning_summary_text.delta",
                "item_id": "rs_fake",
                "output_index": len(output),
                "summary_index": 0,
                "delta": text,
            }
        )
        events.append({"type": "response.output_item.done", "output_index": len(output), "item": item})
        output.append(item)
    if message.get("content"):
        text = message["content"]
        part = {"type": "output_text", "text": text, "annotations": []}
        item = {"id": "msg_fake", "type": "message", "role": "assistant", "status": "completed", "content": [part]}
        index = len(output)
        events.append(
            {
                "type": "response.output_item.added",
                "output_index": index,
                "item": {**item, "content": [], "status": "in_progress"},
            }
        )
        events.append(
            {
                "type": "response.content_part.added",
                "item_id": "msg_fake",
                "output_index": index,
                "content_index": 0,
                "part": {**part, "text": ""},
            }
        )
        events.append(
            {
                "type": "response.output_text.delta",
                "item_id": "msg_fake",
                "output_index": index,
                "content_index": 0,
                "delta": text,
            }
        )
        events.append(
            {
                "type": "response.output_text.done",
                "item_id": "msg_fake",
                "output_index": index,
                "content_index": 0,
                "text": text,
            }
        )
        events.append(
            {
                "type": "response.content_part.done",
                "item_id": "msg_fake",
                "output_index": index,
                "content_index": 0,
                "part": part,
            }
        )
        events.append({"type": "response.output_item.done", "output_index": index, "item": item})
        output.append(item)
    for call in message.get("tool_calls") or ():
        fn = call["function"]
        item = {
            "id": f"fc_{call['id']}",
            "type": "function_call",
            "status": "completed",
            "call_id": call["id"],
            "name": fn["name"],
            "arguments": fn["arguments"],
        }
        index = len(output)
        events.append(
            {
                "type": "response.output_item.added",
                "output_index": index,
                "item": {**item, "arguments": "", "status": "in_progress"},
            }
        )
        events.append(
            {
                "type": "response.function_call_arguments.delta",
                "item_id": item["id"],
                "output_index": index,
                "delta": fn["arguments"],
            }
        )
        events.append(
            {
                "type": "response.function_call_arguments.done",
                "item_id": item["id"],
                "output_index": index,
                "arguments": fn["arguments"],
            }
        )
        events.append({"type": "response.output_item.done", "output_index": index, "item": item})
        output.append(item)
    usage = script.usage or _DEFAULT_USAGE
    incomplete = script.finish_reason == "length"
    done = {
        **response,
        "status": "incomplete" if incomplete else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "output": output,
        "usage": {
            "input_tokens": usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]},
            "output_tokens": usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": usage["completion_tokens_details"]["reasoning_tokens"]},
            "total_tokens": usage["total_tokens"],
        },
    }
    events.append({"type": "response.incomplete" if incomplete else "response.completed", "response": done})
    return [{**e, "sequence_number": i} for i, e in enumerate(events)]


def _strict_schema_problem(body: dict[str, Any]) -> str | None:
    """OpenAI's message for a strict schema (``response_format`` or a function tool) that breaks Structured
    Outputs' rule that every property of an object is required, or None."""
    response_format = body.get("response_format") or {}
    spec = response_format.get("json_schema") if response_format.get("type") == "json_schema" else None
    if isinstance(spec, dict) and spec.get("strict") and (problem := _open_object(spec.get("schema"))):
        return f"Invalid schema for response_format '{spec.get('name')}': {problem}"
    for tool in body.get("tools") or ():
        fn = tool.get("function") or {}
        if fn.get("strict") and (problem := _open_object(fn.get("parameters"))):
            return f"Invalid schema for function '{fn.get('name')}': {problem}"
    return None


def _open_object(schema: Any) -> str | None:
    if isinstance(schema, list):
        return next((p for p in map(_open_object, schema) if p is not None), None)
    if not isinstance(schema, dict):
        return None
    if schema.get("type") == "object":
        missing = sorted(set(schema.get("properties") or {}) - set(schema.get("required") or ()))
        if missing:
            return (
                "'required' is required to be supplied and to be an array including every key in properties. "
                f"Missing '{missing[0]}'."
            )
    nested = list((schema.get("properties") or {}).values()) + list((schema.get("$defs") or {}).values())
    return _open_object(nested + [schema[k] for k in ("items", "anyOf", "allOf") if k in schema])


# The most completion tokens a model writes, as the API checks ``max_tokens`` against it (a few models).
MAX_OUTPUT_TOKENS = {"gpt-4o-mini": 16384, "gpt-4o": 16384}


def _output_limit_passed(body: dict[str, Any]) -> str | None:
    """OpenAI's message for a ``max_tokens`` (or ``max_completion_tokens``) past the model's limit, or None."""
    limit = MAX_OUTPUT_TOKENS.get(str(body.get("model")))
    asked = body.get("max_completion_tokens") or body.get("max_tokens")
    if limit is None or not isinstance(asked, int) or asked <= limit:
        return None
    return (
        f"max_tokens is too large: {asked}. This model supports at most {limit} completion tokens, "
        f"whereas you provided {asked}."
    )


def _file_parts(body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Each ``file`` content part of the messages, with its path (``messages[i].content[j].file``)."""
    out: list[tuple[str, dict[str, Any]]] = []
    for i, message in enumerate(body.get("messages") or ()):
        content = message.get("content") if isinstance(message, dict) else None
        for j, part in enumerate(content if isinstance(content, list) else ()):
            file = part.get("file") if isinstance(part, dict) and part.get("type") == "file" else None
            if isinstance(file, dict):
                out.append((f"messages[{i}].content[{j}].file", file))
    return out


def _file_data_not_inline(body: dict[str, Any]) -> str | None:
    """The path OpenAI names when a file's ``file_data`` is no ``data:`` URL (a URL, say), or None."""
    for path, file in _file_parts(body):
        data = file.get("file_data")
        if isinstance(data, str) and not data.startswith("data:"):
            return f"{path}.file_data"
    return None


def _file_without_name(body: dict[str, Any]) -> str | None:
    """The path OpenAI names when a file content part has ``file_data`` but no ``filename`` (it then asks for a
    ``file_id``), or None."""
    for path, file in _file_parts(body):
        if file.get("file_data") and not file.get("filename") and not file.get("file_id"):
            return f"{path}.file_id"
    return None


def _fold(script: FakeResponse, model: str, created: int) -> dict[str, Any]:
    """A script folded into one non-streamed ``chat.completion`` (``stream: false``)."""
    message: dict[str, Any] = {"role": "assistant", "content": None}
    calls: dict[int, dict[str, Any]] = {}
    for d in script.deltas:
        if isinstance(d, str):
            continue
        for key in ("content", "reasoning_content"):
            if d.get(key):
                message[key] = (message.get(key) or "") + d[key]
        if d.get("annotations"):
            message.setdefault("annotations", []).extend(d["annotations"])
        for tc in d.get("tool_calls") or ():
            call = calls.setdefault(
                tc["index"], {"id": tc.get("id"), "type": "function", "function": {"name": None, "arguments": ""}}
            )
            call["function"]["name"] = call["function"]["name"] or tc["function"].get("name")
            call["function"]["arguments"] += tc["function"].get("arguments") or ""
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    out: dict[str, Any] = {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": script.finish_reason}],
    }
    if script.usage is not None:
        out["usage"] = script.usage
    return out


@asynccontextmanager
async def started_fake_openai(
    default: FakeResponse | None = None, *, api_key: str | None = None
) -> AsyncIterator[FakeOpenAI]:
    fake = await FakeOpenAI(default, api_key=api_key).start()
    try:
        yield fake
    finally:
        await fake.close()


async def _serve(port: int) -> None:
    fake = await FakeOpenAI().start(port)
    print(f"fake OpenAI upstream at {fake.url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await fake.close()


if __name__ == "__main__":
    try:
        asyncio.run(_serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
    except KeyboardInterrupt:
        pass
