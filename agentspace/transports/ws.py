"""The WebSocket protocol at ``/gateway`` (docs/protocol.md#the-websocket-protocol).

JSON text frames; every client message has ``type`` and ``id``, every reply carries ``requestId``. This
module parses frames, dispatches them, and encodes the pipeline's events as frames. The chat logic
itself is ``agentspace.pipeline``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import struct
import time
from collections.abc import Callable
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from .. import attachments, security
from .. import events as ev
from ..clients import ADMIN, hash_key, looks_like_key
from ..connections import PreAuthBudget
from ..errors import ApiError, outage_error
from ..gateway_token import token_matches
from ..logs import warn_limited
from ..pipeline import Turn
from ..providers.upstream_http import answers_shutdown
from ..service import (
    SHUTTING_DOWN_MESSAGE,
    ChatInput,
    chat_request,
    invalid,
    parse_json,
    request_id_ok,
    until_stopped,
)
from ..types import FilePart, compact_json, usage_to_wire
from . import state
from .fences import FenceTracker

log = logging.getLogger(__name__)

# Frames before authentication must be small: nothing but {"type": "auth", ...} is expected.
PRE_AUTH_MAX_BYTES = 4096
# Bytes a client may send before it has authenticated (its auth frame, pings, what it sends right behind
# the auth frame); past that the socket is closed (1009) before anything more is buffered.
PRE_AUTH_BUDGET_BYTES = 4 * PRE_AUTH_MAX_BYTES
# How long a refused client has to answer our close frame before its socket is closed anyway.
REFUSED_CLOSE_SECONDS = 1.0
# An authenticated client whose credential was revoked gets longer: on a busy machine a second is not
# enough to read the close frame, and it would see an abnormal closure (1006) instead of REVOKED_CLOSE_CODE.
REVOKED_CLOSE_SECONDS = 5.0
# At shutdown, how long a connection's last frames (the end of its turn) may take to go out.
SHUTDOWN_FLUSH_SECONDS = 5.0
# How often a burst written for a slow reader checks whether the socket's buffer has drained.
DRAIN_POLL_SECONDS = 0.01
# A socket whose key or gateway token was rotated or removed is closed with this code and reason.
REVOKED_CLOSE_CODE = 4001
REVOKED_REASON = b"credential revoked"
# How often open sockets' credentials are checked against the current token and clients (a change made
# through /api/clients, on this replica or, through Redis, on another, is checked at once).
CREDENTIAL_CHECK_SECONDS = 1.0


# Frames larger than this are decoded on a worker thread.
LARGE_FRAME = 1024 * 1024


def frame_limit(config: Any) -> int:
    """The largest frame read: ``[server] max_frame_bytes``, plus for a ``chat.send`` its attachments' base64
    data up to ``[attachments] max_session_bytes`` (as ``POST /api/chat`` bodies)."""
    return int(config["server"]["max_frame_bytes"]) + -(-int(config["attachments"]["max_session_bytes"]) * 4 // 3)


def _attachment_bytes(msg: dict[str, Any]) -> int:
    """The bytes of a chat.send's attachments' data: ``data``, or a ``data:`` URL in ``url``."""
    items = msg.get("attachments")
    total = 0
    for item in items if isinstance(items, list) else ():
        if isinstance(item, dict):
            if isinstance(item.get("data"), str):
                total += len(item["data"])
            elif isinstance(item.get("url"), str) and item["url"].startswith("data:"):
                total += len(item["url"])
    return total


def _attachments(value: Any) -> list[FilePart]:
    """``chat.send``'s ``attachments``: ``[{mediaType, data (base64) | url, filename?}]`` (docs/attachments.md)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid({"attachments": "must be an array of {mediaType, data or url, filename?}"})
    files = []
    for i, item in enumerate(value):
        path = f"attachments[{i}]"
        if not isinstance(item, dict):
            raise invalid({path: "must be an object {mediaType, data or url, filename?}"})
        unknown = sorted(set(item) - {"mediaType", "data", "url", "filename"})
        if unknown:
            raise invalid(
                {f"{path}.{unknown[0]}"[:120]: "is not a field of an attachment (mediaType, data, url, filename)"}
            )
        if item.get("data") is not None:
            if item.get("url") is not None:
                raise invalid({f"{path}.url": "give the file's data or its url, not both"})
            files.append(attachments.from_base64(item.get("mediaType"), item["data"], item.get("filename"), path))
        else:
            files.append(attachments.from_url(item.get("url"), item.get("mediaType"), item.get("filename"), path))
    return files


def _error_frame(request_id: Any, code: str, message: str, retry_after: float | None = None) -> str:
    frame: dict[str, Any] = {"type": "error", "requestId": request_id, "code": code, "message": message}
    if retry_after is not None:  # the seconds an HTTP answer's Retry-After would say
        frame["retryAfter"] = max(1, math.ceil(retry_after))
    return compact_json(frame)


def _text_frame(text: str) -> bytes:
    """An unmasked, unfragmented, uncompressed WebSocket text frame (RFC 6455 5.2), as a server sends it."""
    payload = text.encode("utf-8")
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


class Connection:
    """One client connection: at most one stream at a time."""

    def __init__(
        self, request: web.Request, ws: web.WebSocketResponse, caller: str = "admin", token: str | None = None
    ) -> None:
        self.app = request.app
        self.request = request  # its source address: failed auth frames count against it
        self.caller = caller  # "admin" (the gateway token) or the client whose key authenticated
        # The credential the socket authenticated with, checked again before every frame and every
        # CREDENTIAL_CHECK_SECONDS: a rotated or removed one closes the socket.
        self.token = token
        self.revoked = False
        self.revoked_request_id: Any = None
        # The handler's task, and whether it is waiting for the client's next frame: a revocation wakes it
        # there, and the handler itself closes the socket (see ``close_revoked``).
        self.handler_task: asyncio.Task[Any] | None = None
        self.reading = False
        self.credential = request.get(security.CREDENTIAL_KEY)  # that key's SHA-256
        self.service = state.service(request.app, caller)
        self.config = self.service.config
        self.ws = ws
        self.turn: Turn | None = None
        self.turn_request_id: Any = None
        self.turn_aborted = False  # chat.abort was sent for self.turn
        self.forwarder: asyncio.Task[None] | None = None
        self.limiter = security.message_limiter(self.config)
        # The connection's socket, shared with aiohttp's frame writer (both write whole frames, in call order).
        self.transport = request.transport

    async def send(self, obj: dict[str, Any]) -> None:
        if not self.ws.closed:
            await self.ws.send_str(compact_json(obj))

    async def error(self, request_id: Any, code: str, message: str, retry_after: float | None = None) -> None:
        if not self.ws.closed:
            await self.ws.send_str(_error_frame(request_id, code, message, retry_after))

    # --- dispatch -------------------------------------------------------------------------------

    async def handle_frame(self, data: str) -> None:
        """Parse and dispatch one frame. Every ApiError, wherever raised, is answered here as an error frame."""
        request_id = kind = None
        try:
            size = len(data.encode("utf-8"))
            limit = self.config["server"]["max_frame_bytes"]
            if size > frame_limit(self.config):
                raise ApiError("PAYLOAD_TOO_LARGE", "Frame too large; the limit is [server] max_frame_bytes.")
            if not self.limiter():
                raise ApiError("RATE_LIMITED", "Too many messages; slow down.")
            # A frame with attachments may be large: decoded off the loop.
            msg = (
                await asyncio.to_thread(parse_json, data, "a frame")
                if size > LARGE_FRAME
                else parse_json(data, "a frame")
            )
            if not isinstance(msg, dict):
                raise invalid({"": "Frames must be JSON objects."})
            kind = msg.get("type")
            if size > limit and (kind != "chat.send" or size - _attachment_bytes(msg) > limit):
                # Only a chat.send passes max_frame_bytes, by its attachments' data (docs/attachments.md).
                raise ApiError("PAYLOAD_TOO_LARGE", "Frame too large; the limit is [server] max_frame_bytes.")
            if request_id_ok(msg.get("id")):
                request_id = msg["id"]
            elif "id" in msg and msg["id"] is not None:
                raise invalid(
                    {"id": "must be an integer or a string of at most 256 characters without lone surrogates"}
                )
            if request_id is None or not isinstance(kind, str):
                raise invalid({"": "Every message needs a string 'type' and an 'id'."})
            handler = self.HANDLERS.get(kind)
            if handler is None:
                raise invalid({"type": f"unknown message type {kind[:40]!r}"})
            if not await self.credential_valid():
                self.revoke(request_id)
                return
            await handler(self, request_id, msg)
        except ApiError as e:
            await self.error(request_id, e.code, e.message, e.retry_after)
        except Exception as e:
            if (outage := outage_error(e)) is not None:  # the database or Redis is down: no traceback
                log.warning("a %s frame: %s (%r)", kind if isinstance(kind, str) else "malformed", outage.message, e)
                await self.error(request_id, outage.code, outage.message, outage.retry_after)
                return
            # A defect of ours: logged with its traceback, answered without details, the connection kept.
            log.exception("handling a %s frame failed", kind if isinstance(kind, str) else "malformed")
            await self.error(request_id, "INTERNAL_ERROR", "The gateway failed to handle this message; see its log.")

    async def on_chat_send(self, request_id: Any, msg: dict[str, Any]) -> None:
        request = chat_request(
            ChatInput(msg.get("content"), msg.get("sessionId"), msg.get("model"), paths={"session_id": "sessionId"}),
            client=self.caller,
            endpoint="ws",
            files=(
                await asyncio.to_thread(_attachments, msg.get("attachments"))
                if _attachment_bytes(msg) > attachments.OFF_LOOP_BYTES
                else _attachments(msg.get("attachments"))
            ),
        )
        request.credential = self.credential  # each call checks the key is still the client's
        if self.turn is not None and not self.turn.done and self.turn_aborted:
            # chat.abort, then chat.send at once (a stop button, then the next question): the stopped answer is
            # stored and its end sent first, then the new turn starts.
            await until_stopped(self.turn, self.forwarder)
        if self.turn is not None and not self.turn.done:
            raise ApiError("STREAM_IN_PROGRESS", "This connection is already streaming; wait or send chat.abort.")
        turn = await self.service.start_chat(request)
        self.turn, self.turn_request_id, self.turn_aborted = turn, request_id, False
        self.forwarder = asyncio.create_task(self.forward(turn, request_id))

    async def on_chat_abort(self, request_id: Any, msg: dict[str, Any]) -> None:
        target = msg.get("requestId")
        if self.turn is None or self.turn.done or target != self.turn_request_id:
            raise invalid({"requestId": "no running stream with that requestId on this connection"})
        self.turn_aborted = True
        self.turn.abort()

    async def on_context_inspect(self, request_id: Any, msg: dict[str, Any]) -> None:
        reply = await self.service.inspect_context(
            msg.get("sessionId"), msg.get("model"), paths=("sessionId", "model"), user_message=msg.get("userMessage")
        )
        await self.send({"type": "context.inspection", "requestId": request_id, **reply})

    async def on_session_compact(self, request_id: Any, msg: dict[str, Any]) -> None:
        # A task of its own, kept with the /v1 calls: the shutdown stops it when its grace ends, as it stops the
        # HTTP compaction, and has waited for its answer when it closes the socket.
        compaction = asyncio.ensure_future(self.compact(request_id, msg))
        calls = self.app[state.V1_CALLS]
        calls.add(compaction)
        try:
            await compaction
        finally:
            calls.discard(compaction)

    async def compact(self, request_id: Any, msg: dict[str, Any]) -> None:
        try:
            reply = await self.service.compact_session(msg.get("sessionId"), field="sessionId")
        except asyncio.CancelledError:  # (the summarising call is recorded aborted by now)
            if not answers_shutdown(self.request):
                raise
            # the server's shutdown stopped it at its grace's end: said, as over HTTP (a 503)
            await self.error(request_id, "SERVICE_UNAVAILABLE", SHUTTING_DOWN_MESSAGE)
            return
        await self.send({"type": "session.compacted", "requestId": request_id, **reply})

    async def on_usage_query(self, request_id: Any, msg: dict[str, Any]) -> None:
        report = await self.service.usage(session_id=msg.get("sessionId"))
        await self.send({"type": "usage.report", "requestId": request_id, **report})

    async def on_session_list(self, request_id: Any, msg: dict[str, Any]) -> None:
        if msg.get("query") is not None:  # a search: the matching sessions only, each with its ``match``
            found, more = await self.service.search_sessions(msg.get("query"), msg.get("limit"), field="query")
            await self.send(
                {
                    "type": "session.list.result",
                    "requestId": request_id,
                    "sessions": found.sessions,
                    "damagedFiles": found.damaged_files,
                    "more": more,
                }
            )
            return
        listing = await self.service.list_sessions()
        await self.send(
            {
                "type": "session.list.result",
                "requestId": request_id,
                "sessions": listing.sessions,
                "damagedFiles": listing.damaged_files,
            }
        )

    async def on_auth(self, request_id: Any, msg: dict[str, Any]) -> None:
        """Already authenticated: the socket's own credential again is ``auth.ok``; any other is refused and
        counted as a failed authentication (no way round the limit), and the socket keeps its credential."""
        token = msg.get("token")
        if isinstance(token, str) and token_matches(self.token, token):
            await self.send({"type": "auth.ok", "requestId": request_id})
            return
        blocked = security.auth_blocked(self.request)
        security.auth_failed(self.request)
        if blocked:
            raise ApiError("RATE_LIMITED", "Too many failed authentications; try again later.")
        raise ApiError(
            "UNAUTHORIZED",
            "This connection is signed in with another credential; open a new connection to use this one.",
        )

    HANDLERS: dict[str, Callable[[Connection, Any, dict[str, Any]], Any]] = {
        "chat.send": on_chat_send,
        "chat.abort": on_chat_abort,
        "context.inspect": on_context_inspect,
        "usage.query": on_usage_query,
        "session.list": on_session_list,
        "session.compact": on_session_compact,
        "auth": on_auth,
    }

    # --- encoding the pipeline's events ---------------------------------------------------------

    async def forward(self, turn: Turn, request_id: Any) -> None:
        """Encode the turn's events as frames until it ends or the socket closes, a burst per socket write."""
        fences = FenceTracker()
        rid = compact_json(request_id)
        try:
            async for batch in turn.batches():
                if self.ws.closed:
                    return
                frames: list[str] = []
                add = frames.append
                for event in batch:
                    match event:  # the deltas, by far the most frequent, encoded here
                        case ev.TextDelta(text=text):
                            for piece, content_type in fences.feed(text):
                                add(
                                    f'{{"type":"chat.stream.delta","requestId":{rid},"delta":{compact_json(piece)},"contentType":"{content_type}"}}'
                                )
                        case ev.ReasoningDelta(text=text):
                            add(f'{{"type":"chat.stream.reasoning","requestId":{rid},"delta":{compact_json(text)}}}')
                        case _:
                            frames += self._frames(event, request_id, fences)
                if frames:
                    await self.send_frames(frames)
        except (ConnectionResetError, RuntimeError):
            pass  # the client went away; the turn goes on without it

    def _frames(self, event: ev.StreamEvent, request_id: Any, fences: FenceTracker) -> list[str]:
        """The frames of an event other than a delta."""
        match event:
            case ev.SourceEvent(url=url, title=title):
                source = {"url": url} if title is None else {"url": url, "title": title}
                return [compact_json({"type": "chat.stream.source", "requestId": request_id, "source": source})]
            case ev.ToolCallEvent():
                return [
                    compact_json(
                        {
                            "type": "chat.stream.tool_call",
                            "requestId": request_id,
                            "toolCallId": event.tool_call_id,
                            "name": event.name,
                            "input": event.input,
                        }
                    )
                ]
            case ev.ToolResultEvent():
                return [
                    compact_json(
                        {
                            "type": "chat.stream.tool_result",
                            "requestId": request_id,
                            "toolCallId": event.tool_call_id,
                            "name": event.name,
                            "output": event.output,
                            "isError": event.is_error,
                        }
                    )
                ]
            case ev.StreamStart():
                return self._start_frames(event, request_id)
            case ev.StreamEnd() | ev.StreamError():
                return self._end_frames(event, request_id, fences)
        return []

    def _start_frames(self, event: ev.StreamStart, request_id: Any) -> list[str]:
        frames: list[str] = []
        if event.session_created:
            frames.append(
                compact_json(
                    {
                        "type": "session.created",
                        "requestId": request_id,
                        "sessionId": self.service.visible(event.session_id),
                        "model": event.model,
                    }
                )
            )
        frames.append(
            compact_json(
                {
                    "type": "chat.stream.start",
                    "requestId": request_id,
                    "sessionId": self.service.visible(event.session_id),
                    "model": event.model,
                }
            )
        )
        return frames

    def _end_frames(self, event: ev.StreamEnd | ev.StreamError, request_id: Any, fences: FenceTracker) -> list[str]:
        """The text held back by the fence tracker, then the end or the error."""
        frames = [
            compact_json(
                {"type": "chat.stream.delta", "requestId": request_id, "delta": piece, "contentType": content_type}
            )
            for piece, content_type in fences.flush()
        ]
        if isinstance(event, ev.StreamEnd):
            frames.append(
                compact_json(
                    {
                        "type": "chat.stream.end",
                        "requestId": request_id,
                        "finishReason": event.finish_reason,
                        "usage": usage_to_wire(event.usage, event.cost),
                    }
                )
            )
        else:
            frames.append(_error_frame(request_id, event.code, event.message, event.retry_after))
        return frames

    async def send_frames(self, frames: list[str]) -> None:
        """Send text frames in order. Uncompressed, a burst goes out in one socket write instead of one write
        per frame: a send on loopback costs about 20 µs of CPU. Building the frames here and writing them to
        aiohttp's transport measured 0.33 CPU-ms less per chat than ``await ws.send_str(frame)`` per frame
        (slower in 22 and 21 of 24 rounds at a load of 1.4-3; added TTFT 0.15 and 0.06 ms less), with
        ``python benchmarks/ab.py THIS_TREE TREE_WITH_SEND_STR --transport ws`` (docs/performance.md)."""
        ws, transport = self.ws, self.transport
        if self.revoked:  # the close frame is on its way: nothing may follow it (the turn goes on unseen)
            raise ConnectionResetError("the connection's credential was revoked")
        if len(frames) == 1 or ws.compress or transport is None:
            for frame in frames:
                if self.revoked:
                    raise ConnectionResetError("the connection's credential was revoked")
                await ws.send_str(frame)
            return
        if ws.closed or transport.is_closing():
            raise ConnectionResetError("the WebSocket is closed")
        transport.write(b"".join(map(_text_frame, frames)))
        # Flow control for a client that reads slowly: wait while the kernel and asyncio hold a full buffer.
        high = transport.get_write_buffer_limits()[1]
        while transport.get_write_buffer_size() > high and not transport.is_closing():
            await asyncio.sleep(DRAIN_POLL_SECONDS)

    async def credential_valid(self) -> bool:
        """Whether the socket's credential still names its caller (not rotated, not removed)."""
        return self.token is None or await security.credential_caller(self.app, self.token) == self.caller

    def revoke(self, request_id: Any = None) -> None:
        """The credential was rotated or removed: nothing more goes out but the refusal and the close frame,
        which the handler sends (``close_revoked``), woken from its read if it is waiting for a frame. A
        running turn goes on (stored and billed) as after any disconnect."""
        if self.revoked:
            return
        self.revoked, self.revoked_request_id = True, request_id
        log.info("websocket of %s closed: its credential was rotated or removed", self.caller)
        if self.reading and self.handler_task is not None:
            self.handler_task.cancel()

    async def close_revoked(self) -> None:
        """Refuse and close with REVOKED_CLOSE_CODE, from the handler's own task: aiohttp then waits for the
        client's close frame before it drops the connection. Closed from another task while the handler
        reads, aiohttp drops it at once, and a client still answering our close frame (aiohttp's own
        client, for one) reports an abnormal closure (1006) instead of REVOKED_CLOSE_CODE."""
        try:
            if not self.ws.closed:
                message = "This connection's key or token was rotated or removed."
                await self.ws.send_str(_error_frame(self.revoked_request_id, "UNAUTHORIZED", message))
            async with asyncio.timeout(REVOKED_CLOSE_SECONDS):
                await self.ws.close(code=REVOKED_CLOSE_CODE, message=REVOKED_REASON)
        except (TimeoutError, ConnectionResetError, RuntimeError):
            pass  # no close frame back in time: aiohttp has closed the socket

    async def shutdown(self) -> None:
        """The server is going away: let the turn's last frames go out, then close with GOING_AWAY (1001)."""
        if self.forwarder is not None:
            await asyncio.wait([self.forwarder], timeout=SHUTDOWN_FLUSH_SECONDS)
        await self.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")

    async def closed(self) -> None:
        """The socket closed: the turn finishes (stored and billed) unless configured to abort."""
        if self.turn is not None and not self.turn.done and self.config["chat"]["on_disconnect"] == "abort":
            self.turn.abort()
        if self.forwarder is not None:
            self.forwarder.cancel()


async def gateway_handler(request: web.Request) -> web.StreamResponse:
    config = state.config(request.app)
    server = config["server"]
    ws = web.WebSocketResponse(
        heartbeat=float(server["heartbeat_seconds"]),
        # aiohttp closes the socket (1009) past this; between the configured limit and this we answer
        # PAYLOAD_TOO_LARGE and keep the connection. Only authenticated clients get past 16 KiB (PreAuthBudget).
        max_msg_size=max(4 * int(server["max_frame_bytes"]), frame_limit(config)),
    )
    if not ws.can_prepare(request).ok:  # a plain GET (a browser, curl): aiohttp's bare "Bad Request" said nothing
        raise ApiError(
            "INVALID_MESSAGE", "/gateway is a WebSocket: connect with Upgrade: websocket (docs/protocol.md)."
        )
    blocked = security.auth_blocked(request)  # as this attempt began (before its header is counted)
    try:
        caller = await security.bearer_caller(request)
    except Exception as e:
        return security.lookup_failed(request, e)  # an outage: the 503 every route answers, Retry-After included
    token = security.api_token(request) if caller is not None else None
    await ws.prepare(request)
    if caller is None:
        # A header refused (and counted by bearer_caller) and then a refused frame are one failed attempt.
        header_refused = blocked if security.api_token(request) is not None else None
        authenticated = await _authenticate_first_frame(
            request, ws, float(server["auth_timeout_seconds"]), header_refused
        )
        if authenticated is None:
            return ws
        caller, token = authenticated
    conn = Connection(request, ws, caller, token)
    conn.handler_task = asyncio.current_task()
    request.app[state.WEBSOCKETS].add(conn)
    try:
        while not conn.revoked:
            conn.reading = True
            try:
                msg = await ws.receive()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not conn.revoked or task is None or task.uncancel() > 0:
                    raise  # not (only) the revocation's wake-up: the server is going away
                break
            finally:
                conn.reading = False
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                break
            if msg.type == WSMsgType.TEXT:
                await conn.handle_frame(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await conn.error(None, "INVALID_MESSAGE", "Binary frames are not supported; send JSON text frames.")
            elif msg.type == WSMsgType.ERROR:
                log.info("websocket closed with error: %s", ws.exception())
        if conn.revoked:
            await conn.close_revoked()
    finally:
        request.app[state.WEBSOCKETS].discard(conn)
        await conn.closed()
    return ws


async def _authenticate_first_frame(
    request: web.Request, ws: web.WebSocketResponse, timeout: float, header_refused: bool | None = None
) -> tuple[str, str] | None:
    """Browsers cannot set headers on a WebSocket: the first frame must be {"type": "auth", "token"}.
    Returns the caller the token names and the token, or None (refused and closed). ``header_refused``: the
    upgrade's header was refused and counted already (whether the source was blocked before it), so a refused
    frame is the same attempt, not a second failure."""
    started = time.monotonic()
    budget = PreAuthBudget(request, PRE_AUTH_BUDGET_BYTES)
    try:
        async with asyncio.timeout(timeout):  # one deadline: pings, pongs and partial frames do not extend it
            msg = await ws.receive()
    except TimeoutError:
        await _refuse(
            ws, None, f'Authenticate within {timeout:.0f} s: send {{"type": "auth", "id": ..., "token": ...}}.'
        )
        return None
    if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR) or ws.closed:
        return None  # gone, or closed for sending too much before authenticating
    request_id = None
    if msg.type == WSMsgType.TEXT and len(msg.data) <= PRE_AUTH_MAX_BYTES:
        try:
            frame = parse_json(msg.data, "the first frame")
        except ApiError:
            frame = None
        if isinstance(frame, dict):
            request_id = frame.get("id") if request_id_ok(frame.get("id")) else None
            token = frame.get("token")
            try:
                who = await security.token_caller(request, token) if isinstance(token, str) else None
            except Exception as e:
                if (outage := outage_error(e)) is None:
                    raise
                log.warning("websocket authentication: %s (%r)", outage.message, e)
                await _refuse(ws, request_id, outage.message, outage.code, close_code=WSCloseCode.TRY_AGAIN_LATER)
                return None
            if frame.get("type") == "auth" and who is not None and isinstance(token, str):
                budget.release()
                await ws.send_str(compact_json({"type": "auth.ok", "requestId": request_id}))
                return who, token
    if header_refused is None:
        blocked = security.auth_blocked(request)
        security.auth_failed(request)
    else:
        blocked = header_refused
    log.info("websocket authentication failed from %s after %.2fs", request.remote, time.monotonic() - started)
    if blocked:
        await _refuse(ws, request_id, "Too many failed authentications; try again later.", "RATE_LIMITED")
    else:
        await _refuse(
            ws,
            request_id,
            "Authentication failed. Send Authorization: Bearer <token> or an auth frame first; run 'agentspace token'.",
        )
    return None


async def _refuse(
    ws: web.WebSocketResponse, request_id: Any, message: str, code: str = "UNAUTHORIZED", close_code: int = 4401
) -> None:
    await ws.send_str(_error_frame(request_id, code, message))
    try:
        async with asyncio.timeout(REFUSED_CLOSE_SECONDS):
            await ws.close(code=close_code, message=b"unauthorized" if close_code == 4401 else b"try again later")
    except TimeoutError:
        pass  # no close frame back: aiohttp has closed the socket on the timeout (a client let in has no say)


async def revoke_stale_credentials(app: web.Application) -> int:
    """Close every open socket whose credential was rotated or removed; how many were closed. One look at
    the token and one listing of the clients for all sockets (a database store answers one query)."""
    conns = [c for c in app[state.WEBSOCKETS] if c.token is not None and not c.revoked and not c.ws.closed]
    if not conns:
        return 0
    current = app[security.TOKEN_FILE].current()
    by_hash = await state.service(app).key_holders()
    stale = [
        c
        for c in conns
        if not (
            token_matches(current, c.token)
            if c.caller == ADMIN
            else looks_like_key(c.token) and by_hash.get(hash_key(c.token)) == c.caller
        )
    ]
    for conn in stale:
        conn.revoke()
    return len(stale)


async def watch_credentials(app: web.Application) -> None:
    """Runs while the server does: checks open sockets' credentials every CREDENTIAL_CHECK_SECONDS, and at
    once when ``credentials_changed`` is called (an /api/clients change here, or on another replica)."""
    changed = app[state.CREDENTIALS_CHANGED]
    while True:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CREDENTIAL_CHECK_SECONDS):
                await changed.wait()
        changed.clear()
        try:
            await revoke_stale_credentials(app)
        except Exception as e:  # noqa: BLE001 - a store that cannot answer now: the next round tries again
            warn_limited(log, "credential-check", "could not check the open connections' credentials: %r", e)
