"""``POST /api/chat``: the Vercel AI SDK UI message stream, protocol v1 (docs/protocol.md#the-ui-message-stream).

``useChat`` with its default transport (``DefaultChatTransport``) works against this unchanged: the body is
``{id, messages: UIMessage[], model?, trigger?}``, the answer is server-sent events ``data: <chunk JSON>``
ending with ``data: [DONE]``, and ``GET /api/chat/{id}/stream`` resumes a running answer (204 when there is
none), which is what the SDK's ``resume`` option calls. Chunks carry only the fields of the SDK's
``uiMessageChunkSchema``. This module parses requests and encodes the pipeline's events; the chat logic is
``agentspace.pipeline``, shared with the WebSocket transport.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import hdrs, web

from .. import attachments, security
from .. import events as ev
from ..errors import ApiError
from ..pipeline import ChatRequest, Turn
from ..service import (
    ChatInput,
    chat_request,
    checked,
    clean_text,
    invalid,
    message_id_problem,
    model_id_problem,
    session_id_problem,
)
from ..types import FilePart, compact_json, json_bytes, new_id, now_iso, usage_to_wire
from . import bodies, state

STREAM_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "Connection": "keep-alive",
    "X-Vercel-AI-UI-Message-Stream": "v1",
    "X-Accel-Buffering": "no",  # nginx would otherwise buffer the whole answer
}
DONE = b"data: [DONE]\n\n"

# Our finish reasons are the AI SDK's, plus "aborted", which the SDK says with an ``abort`` chunk.
SDK_FINISH_REASONS = frozenset({"stop", "length", "content-filter", "tool-calls", "error", "other"})

ROLES = ("user", "assistant", "system")
TRIGGERS = ("submit-message", "regenerate-message")
# The UI message part types the AI SDK sends (``tool-<name>`` and ``data-<name>`` by prefix), and those of the
# stored messages ``GET /api/sessions/{id}`` returns (``source``; ``tool-call`` and ``tool-result`` by the prefix),
# which an app that starts useChat from them sends back. A user message may carry text and files; the rest only
# come back in earlier assistant messages, which the store's copy replaces. Any other type is refused, naming it:
# nothing a client sends is dropped unseen.
PART_TYPES = ("text", "reasoning", "file", "source-url", "source-document", "step-start", "dynamic-tool", "source")
PART_PREFIXES = ("tool-", "data-")
USER_PART_TYPES = ("text", "file")


def _frame(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json_bytes(chunk) + b"\n\n"


class UIMessageStreamEncoder:
    """Encodes one turn's ``StreamEvent``s as UI message stream chunks.

    Text and reasoning arrive as deltas; the protocol wants each run of them wrapped in a part with
    ``*-start`` and ``*-end``. At most one part is open: it is ended before the other kind starts, before
    tool chunks, and before ``finish-step``. Part ids count up within the message, so a resumed stream,
    which replays the same events, gets the same ids.
    """

    def __init__(self) -> None:
        self._open: tuple[str, str] | None = None  # (kind, id) of the open text or reasoning part
        self._count = 0

    def _next_id(self, kind: str) -> str:
        self._count += 1
        return f"{kind}-{self._count}"

    def _end_open(self, out: list[dict[str, Any]]) -> None:
        if self._open is not None:
            kind, part_id = self._open
            out.append({"type": f"{kind}-end", "id": part_id})
            self._open = None

    def _delta(self, kind: str, text: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if not text:
            return out
        if self._open is None or self._open[0] != kind:
            self._end_open(out)
            self._open = (kind, self._next_id(kind))
            out.append({"type": f"{kind}-start", "id": self._open[1]})
        out.append({"type": f"{kind}-delta", "id": self._open[1], "delta": text})
        return out

    def _text_delta(self, text: str) -> bytes:
        """``encode`` of a text delta inside an open text part, the bulk of a stream, without building a chunk."""
        assert self._open is not None
        return f'data: {{"type":"text-delta","id":"{self._open[1]}","delta":{compact_json(text)}}}\n\n'.encode()

    def chunks(self, event: ev.StreamEvent) -> list[dict[str, Any]]:
        if isinstance(event, ev.TextDelta):
            return self._delta("text", event.text)
        if isinstance(event, ev.ReasoningDelta):
            return self._delta("reasoning", event.text)
        out: list[dict[str, Any]] = []
        if isinstance(event, ev.StreamStart):
            out.append({"type": "start", "messageId": event.message_id})
        elif isinstance(event, ev.StepStart):
            out.append({"type": "start-step"})
        elif isinstance(event, ev.SourceEvent):
            # A source does not interrupt the text it supports: the open part stays open.
            source: dict[str, Any] = {"type": "source-url", "sourceId": self._next_id("source"), "url": event.url}
            if event.title is not None:
                source["title"] = event.title
            out.append(source)
        elif isinstance(event, ev.ToolCallEvent):
            self._end_open(out)
            out.append(
                {
                    "type": "tool-input-available",
                    "toolCallId": event.tool_call_id,
                    "toolName": event.name,
                    "input": event.input,
                }
            )
        elif isinstance(event, ev.ToolResultEvent):
            if event.is_error:
                out.append(
                    {"type": "tool-output-error", "toolCallId": event.tool_call_id, "errorText": str(event.output)}
                )
            else:
                out.append({"type": "tool-output-available", "toolCallId": event.tool_call_id, "output": event.output})
        elif isinstance(event, ev.StepFinish):
            self._end_open(out)
            out.append({"type": "finish-step"})
        elif isinstance(event, ev.StreamEnd):
            self._end_open(out)
            if event.aborted:
                out.append({"type": "abort"})
            reason = event.finish_reason if event.finish_reason in SDK_FINISH_REASONS else "other"
            metadata: dict[str, Any] = {"usage": usage_to_wire(event.usage, event.cost)}
            if event.ttft_ms is not None:
                metadata["ttftMs"] = round(event.ttft_ms, 3)
            out.append({"type": "finish", "finishReason": reason, "messageMetadata": metadata})
        elif isinstance(event, ev.StreamError):
            self._end_open(out)
            out.append({"type": "error", "errorText": event.message})
        return out

    def encode(self, event: ev.StreamEvent) -> bytes:
        """The SSE frames of one event; the last event of a turn also gets ``[DONE]``."""
        if type(event) is ev.TextDelta and event.text and self._open is not None and self._open[0] == "text":
            return self._text_delta(event.text)
        data = b"".join(_frame(c) for c in self.chunks(event))
        if isinstance(event, (ev.StreamEnd, ev.StreamError)):
            data += DONE
        return data


# --- requests -----------------------------------------------------------------------------------


async def read_chat_json(request: web.Request) -> Any:
    """The body of ``POST /api/chat``: ``[server] max_body_bytes`` for the message answered (the last user
    message; files' data aside) and the rest of the body but the earlier messages. ``useChat`` resends the whole
    conversation with every turn, read only to create a session: the earlier messages and every file's data may
    add up to the ``[attachments] max_session_bytes`` of a session (base64: 4/3 of it), so that a long session's
    text does not make every later turn a 413."""
    config = state.config(request.app)
    base = int(config["server"]["max_body_bytes"])
    limit = base + -(-int(config["attachments"]["max_session_bytes"]) * 4 // 3)
    try:
        body, raw = await bodies.read_json(request, limit)
    except bodies.BodyTooLarge:
        raise ApiError("PAYLOAD_TOO_LARGE", f"Request body too large; the limit is {limit} bytes.") from None
    except bodies.BodyInvalid:
        raise invalid({"": "the body must be JSON (UTF-8, nested at most a few hundred levels)"}) from None
    except bodies.GatewayBusy:
        raise ApiError("SERVICE_UNAVAILABLE", bodies.BUSY_MESSAGE) from None
    if _answered_bytes(body, len(raw)) > base:
        raise ApiError(
            "PAYLOAD_TOO_LARGE", f"Request body too large; the limit is {base} bytes ([server] max_body_bytes)."
        )
    return body


def _answered_bytes(body: Any, size: int) -> int:
    """The bytes of a chat body but its earlier messages (those before the last user message) and its files'
    data, measured as compact JSON (the earlier messages are not measured: a long conversation's); ``size``
    less the files' data when the body has no messages to tell apart."""
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list):
        return size - _file_data_bytes(body)
    users = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"]
    kept = {**body, "messages": [_without_file_data(m) for m in messages[users[-1] if users else 0 :]]}
    text = json.dumps(kept, ensure_ascii=False, separators=(",", ":"))
    return len(text.encode("utf-8", "surrogatepass"))  # a lone surrogate is cleaned later


def _without_file_data(message: Any) -> Any:
    """``message`` with its file parts' ``data:`` URLs left empty (they have an allowance of their own)."""
    parts = message.get("parts") if isinstance(message, dict) else None
    if not isinstance(parts, list):
        return message
    return {
        **message,
        "parts": [
            {**p, "url": ""}
            if isinstance(p, dict) and p.get("type") == "file" and str(p.get("url")).startswith("data:")
            else p
            for p in parts
        ],
    }


def _file_data_bytes(body: Any) -> int:
    """The bytes of the ``data:`` URLs of a chat body's file parts."""
    messages = body.get("messages") if isinstance(body, dict) else None
    total = 0
    for message in messages if isinstance(messages, list) else ():
        parts = message.get("parts") if isinstance(message, dict) else None
        for part in parts if isinstance(parts, list) else ():
            if isinstance(part, dict) and part.get("type") == "file" and isinstance(part.get("url"), str):
                total += len(part["url"]) if part["url"].startswith("data:") else 0
    return total


async def read_json(request: web.Request) -> Any:
    """The JSON body; 413 past ``[server] max_body_bytes``, 400 if not JSON (a compressed body inflated)."""
    limit = int(state.config(request.app)["server"]["max_body_bytes"])
    try:
        body, _ = await bodies.read_json(request, limit)
    except bodies.BodyTooLarge:
        raise ApiError(
            "PAYLOAD_TOO_LARGE", f"Request body too large; the limit is {limit} bytes ([server] max_body_bytes)."
        ) from None
    except bodies.BodyInvalid:
        raise invalid({"": "the body must be JSON (UTF-8, nested at most a few hundred levels)"}) from None
    except bodies.GatewayBusy:
        raise ApiError("SERVICE_UNAVAILABLE", bodies.BUSY_MESSAGE) from None
    return body


def _text(message: dict[str, Any]) -> str:
    return "".join(p["text"] for p in message["parts"] if p["type"] == "text")


def _message_errors(i: int, message: Any) -> dict[str, str]:
    path = f"messages[{i}]"
    if not isinstance(message, dict):
        return {path: "must be an object"}
    errors = {}
    # An empty id is the client's way of having none: the gateway makes one.
    if message.get("id") and (problem := message_id_problem(message["id"])) is not None:
        errors[f"{path}.id"] = problem
    if message.get("role") not in ROLES:
        errors[f"{path}.role"] = f"must be one of {', '.join(ROLES)}"
    parts = message.get("parts")
    if not isinstance(parts, list):
        errors[f"{path}.parts"] = "must be an array"
        return errors
    for j, part in enumerate(parts):
        where = f"{path}.parts[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            errors[where] = "must be an object with a string 'type'"
        elif part["type"] not in PART_TYPES and not part["type"].startswith(PART_PREFIXES):
            errors[f"{where}.type"] = f"part type {part['type'][:60]!r} is not handled by this gateway"
        elif part["type"] in ("text", "reasoning") and not isinstance(part.get("text"), str):
            errors[f"{where}.text"] = "must be a string"
    return errors


def _user_parts_errors(i: int, message: dict[str, Any]) -> dict[str, str]:
    """The parts of the user message being answered: text and files only."""
    return {
        f"messages[{i}].parts[{j}].type": f"part type {part['type'][:60]!r} is not handled in a user message "
        f"(only {', '.join(USER_PART_TYPES)})"
        for j, part in enumerate(message["parts"])
        if part["type"] not in USER_PART_TYPES
    }


def _files(i: int, message: dict[str, Any]) -> list[FilePart]:
    """The file parts of UI message ``i`` (data: URLs decoded, http(s) URLs to fetch)."""
    return [
        attachments.from_url(part.get("url"), part.get("mediaType"), part.get("filename"), f"messages[{i}].parts[{j}]")
        for j, part in enumerate(message["parts"])
        if part["type"] == "file"
    ]


def parse_chat_body(body: Any, caller: str = "admin") -> ChatRequest:
    """Check a ``useChat`` request body; every problem is reported as a field error.

    The UI message structure is checked here; the chat fields (session id, model, message id, text) by
    ``service.chat_request``, as for the WebSocket."""
    if not isinstance(body, dict):
        raise invalid({"": "the body must be a JSON object"})
    errors: dict[str, str] = {}
    session_id = body.get("id", body.get("threadId"))
    if not isinstance(session_id, str):
        errors["id"] = "required: the chat id (a string) names the session"
    elif (problem := session_id_problem(session_id)) is not None:
        errors["id"] = problem
    model = body.get("model")
    if model is not None and (problem := model_id_problem(model)) is not None:
        errors["model"] = problem
    if body.get("trigger") is not None and body["trigger"] not in TRIGGERS:
        errors["trigger"] = f"must be one of {', '.join(TRIGGERS)}"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        errors["messages"] = "must be a non-empty array of UI messages"
        raise invalid(errors)
    seen: dict[str, int] = {}
    for i, message in enumerate(messages):
        errors.update(_message_errors(i, message))
        # A message id names one message of the session: a second message with it would be stored over the
        # first, or answered as an edit of it.
        message_id = message.get("id") if isinstance(message, dict) else None
        if isinstance(message_id, str) and message_id and f"messages[{i}].id" not in errors:
            if message_id in seen:
                errors[f"messages[{i}].id"] = (
                    f"repeats the id of messages[{seen[message_id]}]: each message needs its own"
                )
            seen.setdefault(message_id, i)
    if errors:
        raise invalid(errors)

    last_user = next((i for i in range(len(messages) - 1, -1, -1) if messages[i]["role"] == "user"), None)
    if last_user is None:
        raise invalid({"messages": "no user message to answer"})
    if errors := _user_parts_errors(last_user, messages[last_user]):
        raise invalid(errors)
    files = _files(last_user, messages[last_user])
    chat = ChatInput(
        _text(messages[last_user]),
        session_id,
        model,
        messages[last_user].get("id") or None,
        paths={
            "content": f"messages[{last_user}].parts",
            "session_id": "id",
            "message_id": f"messages[{last_user}].id",
        },
    )
    # A stateless client sends the whole conversation; the store's copy wins once the session exists.
    return chat_request(
        chat,
        client=caller,
        endpoint="http",
        create_if_missing=True,
        history=_stored_history(messages[:last_user]),
        files=files,
    )


def _stored_history(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Earlier UI messages in stored form: text, and the files of user messages (with their data, which the
    turn moves into the blob store). The system prompt is the gateway's, and reasoning or tool parts from a
    client cannot be sent back upstream (Anthropic requires its own signatures)."""
    out = []
    for i, message in enumerate(messages):
        # Lone surrogates become U+FFFD, as in the new message (service.clean_text).
        parts: list[dict[str, Any]] = []
        for p in message["parts"]:
            if p["type"] == "text" and p["text"]:
                parts.append({"type": "text", "text": clean_text(p["text"])})
        if message["role"] == "user":
            parts += [attachments.imported_part(f) for f in _files(i, message)]
        if message["role"] == "system" or not parts:
            continue
        out.append(
            {
                "id": message.get("id") or new_id("msg_"),
                "role": message["role"],
                "content": "".join(p.get("text", "") for p in parts),
                "parts": parts,
                "createdAt": now_iso(),
            }
        )
    return out


# --- handlers -----------------------------------------------------------------------------------


async def stream_turn(request: web.Request, turn: Turn, *, abort_on_disconnect: bool) -> web.StreamResponse:
    """Send the turn's events (from its start, then live) as a UI message stream."""
    batches = turn.batches()
    # The context-window policy refuses before the turn's first call (nothing was sent upstream): that is an
    # error found before the answer starts, answered with its status (413) instead of a stream.
    first = await anext(batches)
    while all(isinstance(e, ev.StreamStart) for e in first):
        first += await anext(batches)
    refused = next((e for e in first if not isinstance(e, ev.StreamStart)), None)
    if isinstance(refused, ev.StreamError) and refused.code in REFUSED_BEFORE_STREAMING:
        raise ApiError(refused.code, refused.message, retry_after=refused.retry_after)
    response = web.StreamResponse(headers=STREAM_HEADERS)
    encoder = UIMessageStreamEncoder()
    try:
        # The step's request goes upstream first (its task is queued behind this one): the headers are sent
        # while the upstream works, not before the request leaves.
        await asyncio.sleep(0)
        await response.prepare(request)
        async for batch in _chain(first, batches):
            # One write per burst of events, not per event: a burst of deltas costs one send.
            data = b"".join(map(encoder.encode, batch))
            if isinstance(batch[-1], (ev.StreamEnd, ev.StreamError)):
                await response.write_eof(data)  # the last chunks and the end of the body in one send
                return response
            await response.write(data)
    except ConnectionResetError:
        # The client went away. The turn is its own task: it goes on, stored and billed, unless
        # [chat] on_disconnect = "abort".
        if abort_on_disconnect:
            turn.abort()
        return response
    except asyncio.CancelledError:
        # The same, when aiohttp runs with handler_cancellation (off by default): only this handler dies.
        if abort_on_disconnect:
            turn.abort()
        raise
    await response.write_eof()
    return response


# Errors a turn reports before its first provider call that are the request's own (not a failure): its context
# too long, or its first call refused at admission (limits.Guard.admit), which checks the input too where the
# turn's own check before it was taken could price only the output it asks for.
REFUSED_BEFORE_STREAMING = frozenset(
    {"CONTEXT_TOO_LONG", "UNAUTHORIZED", "MODEL_NOT_ALLOWED", "RATE_LIMITED", "BUDGET_EXCEEDED", "SERVICE_UNAVAILABLE"}
)


async def _chain(
    first: list[ev.StreamEvent], rest: AsyncIterator[list[ev.StreamEvent]]
) -> AsyncIterator[list[ev.StreamEvent]]:
    yield first
    async for batch in rest:
        yield batch


async def chat_handler(request: web.Request) -> web.StreamResponse:
    # ApiErrors raised here are answered by the app's error middleware (rest.errors_and_preflight).
    caller = security.caller(request)
    service = state.service(request.app, caller)
    body = await read_chat_json(request)
    # Decoding and hashing large files (attachments.py) runs on a worker thread.
    if _file_data_bytes(body) > attachments.OFF_LOOP_BYTES:
        chat = await asyncio.to_thread(parse_chat_body, body, caller)
    else:
        chat = parse_chat_body(body, caller)
    chat.credential = request.get(security.CREDENTIAL_KEY)  # each step of the turn checks the key is still valid
    turn = await service.start_chat(chat)
    return await stream_turn(request, turn, abort_on_disconnect=service.config["chat"]["on_disconnect"] == "abort")


async def resume_handler(request: web.Request) -> web.StreamResponse:
    """Attach to the session's running answer from its first chunk; 204 when nothing is streaming."""
    service = state.service(request.app, security.caller(request))
    session_id = checked(request.match_info["id"], "id", session_id_problem)
    try:
        turn = await service.resumable_turn(session_id)
    except ApiError as e:
        if e.code not in ("SESSION_NOT_FOUND", "SESSION_DAMAGED"):
            raise
        # None of the caller's (a new chat's id, or another client's session), or a session whose file cannot be
        # read (the gateway token's resume does not read it): nothing of the caller's streams there. useChat's
        # resume takes any answer but 204 or a stream as a failure; the next message is told the session is
        # damaged.
        return web.Response(status=204)
    session_id = await service.resolve(session_id)  # the stored id (a client's own namespace)
    chunks = await service.stream_elsewhere(session_id) if turn is None else None
    if turn is None and chunks is None:
        return web.Response(status=204)
    if request.method == hdrs.METH_HEAD:  # the stream's headers only: aiohttp would write its body after them
        return web.Response(headers=STREAM_HEADERS)
    if chunks is not None:
        return await _relay(request, chunks)  # streaming on another replica
    assert turn is not None
    # Only the request that started the answer may stop it by going away.
    return await stream_turn(request, turn, abort_on_disconnect=False)


async def _relay(request: web.Request, chunks: AsyncIterator[bytes]) -> web.StreamResponse:
    """Send a stream another replica publishes in Redis (the same bytes its own clients get)."""
    response = web.StreamResponse(headers=STREAM_HEADERS)
    await response.prepare(request)
    try:
        async for data in chunks:
            await response.write(data)
    except ConnectionResetError:
        return response
    await response.write_eof()
    return response
