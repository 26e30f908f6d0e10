"""The Anthropic relay: the upstream side of the pass-through of ``/v1/messages`` and
``/v1/messages/count_tokens`` (docs/protocol.md), a provider call like every other (``calls.ProviderCall``,
admitted and written ahead by the transport before it comes here).

The client's body goes upstream as sent (only a ``anthropic/`` prefix is taken off the model id), with the
client's ``anthropic-version`` and ``anthropic-beta`` headers and our key. The upstream's bytes come back
as they arrive, unbuffered and unchanged, while ``UsageScanner`` reads the usage on the way; errors, before
or inside the stream, reach the client with their status and body (every configured secret redacted), but for
the gateway's own key refused (401, 403): that is the gateway's problem, answered as a missing key is (424),
never a 401 that blames the caller's credential. A client that goes away stops the
upstream request. Usage the upstream reports (``message_start``) is noted in the ledger as it arrives, and
the output relayed now and then, for a recovery after a crash. Every call ends with exactly one usage record.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import replace
from typing import Any

import aiohttp
from aiohttp import web

from ..calls import ProviderCall, cut_short_usage
from ..limits import SHUTTING_DOWN_MESSAGE
from ..logs import StreamRedactor, redact, redact_bytes, redact_headers, warn_limited
from ..protocols.anthropic_messages import (
    DEFAULT_VERSION,
    UsageScanner,
    error_body,
    error_code_for_status,
    error_code_for_type,
    local_input_tokens,
    message_usage,
    with_seen_server_tools,
)
from ..registry import Registry
from ..types import TokenUsage, json_bytes, reported_count
from ..vault import key_name, missing_key_message, resolve_key
from .anthropic import FINISH_REASONS, UNREADABLE_MESSAGE
from .sse import SSEDecoder
from .upstream_http import answers_shutdown, client_gone, http_client, watch_client

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.anthropic.com"
# Response headers relayed from the upstream (plus every ``anthropic-*`` one): what the SDKs read.
RELAYED_HEADERS = frozenset({"content-type", "request-id", "retry-after", "retry-after-ms", "x-should-retry"})
# Request headers of the client that go upstream.
FORWARDED_HEADERS = ("anthropic-version", "anthropic-beta")
# Upstream statuses that refuse the key sent: always the gateway's (a caller's x-api-key is its gateway credential,
# never sent upstream), so never relayed as they are (Claude Code answers a 401 by sending its user to /login).
KEY_REFUSED = frozenset({401, 403})


def upstream(gw: Registry) -> tuple[str, float]:
    """The Anthropic base URL and the read timeout, from ``[providers.anthropic]``."""
    settings = gw.config.provider_settings("anthropic")
    return (settings["base_url"] or DEFAULT_BASE_URL).rstrip("/"), float(settings["timeout_seconds"])


def upstream_headers(request: web.Request, key: str) -> dict[str, str]:
    headers = {"x-api-key": key, "content-type": "application/json", "anthropic-version": DEFAULT_VERSION}
    for name in FORWARDED_HEADERS:
        value = request.headers.get(name)
        if value:
            headers[name] = value
    return headers


def _query(request: web.Request) -> str:
    """The client's query string, passed on (Claude Code calls ``/v1/messages?beta=true``)."""
    return "?" + request.query_string if request.query_string else ""


def relayed_headers(up: aiohttp.ClientResponse) -> dict[str, str]:
    """The upstream's headers a client gets, every configured secret redacted."""
    return redact_headers(
        {k: v for k, v in up.headers.items() if k.lower() in RELAYED_HEADERS or k.lower().startswith("anthropic-")}
    )


def upstream_body(body: dict[str, Any], raw: bytes, model: str) -> bytes:
    """The client's bytes, unless the model id carries our ``anthropic/`` prefix, which the API does not know."""
    if body.get("model") == model.split("/", 1)[1]:
        return raw
    return json.dumps({**body, "model": model.split("/", 1)[1]}, ensure_ascii=False).encode()


def _error(status: int, message: str, error_type: str | None = None) -> web.Response:
    return web.json_response(error_body(status, message, error_type), status=status)


def _is_api_error(data: bytes) -> bool:
    """Whether an error status's body is an API error (``{"type": "error", "error": {...}}``)."""
    try:
        parsed = json.loads(data)
    except ValueError:
        return False
    return isinstance(parsed, dict) and isinstance(parsed.get("error"), dict)


def _is_count(data: bytes) -> bool:
    """Whether a count_tokens answer is one (``{"input_tokens": N}``)."""
    try:
        parsed = json.loads(data)
    except ValueError:
        return False
    return isinstance(parsed, dict) and reported_count(parsed.get("input_tokens")) is not None


def key_refused(gw: Registry, base_url: str, status: int, data: bytes) -> web.Response:
    """Anthropic refused the gateway's key: 424 in the Anthropic shape, as a missing key is, and logged with
    the upstream's reason (redacted), once a minute per upstream (each deployment of a model group its own)."""
    try:
        reason = str(json.loads(data)["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        reason = data[:300].decode("utf-8", "replace")
    warn_limited(
        log,
        f"anthropic-key-refused {base_url}",
        "Anthropic at %s refused the gateway's API key (HTTP %d): %s",
        base_url,
        status,
        redact(reason),
    )
    name = key_name(gw.config, "anthropic")
    return _error(424, f"Anthropic refused the gateway's API key (HTTP {status}). Run: agentspace keys add {name}")


async def messages(
    request: web.Request,
    gw: Registry,
    body: dict[str, Any],
    raw: bytes,
    model: str,
    meter: ProviderCall,
    *,
    key: str | None = None,
    base_url: str | None = None,
) -> web.StreamResponse:
    """Relay one Messages call to Anthropic and meter it (with ``key`` and ``base_url`` when a model group's
    deployment gives them, routed_call.relay_group)."""
    meter.begin()
    key = key or resolve_key(gw.config, "anthropic")
    if not key:
        await meter.record(TokenUsage(), "error", error="NO_API_KEY", answered=False)
        return _error(424, missing_key_message("anthropic", gw.config))

    default_url, read_timeout = upstream(gw)
    base_url = (base_url or default_url).rstrip("/")
    if not body.get("stream"):
        meter.sent_whole()
    try:
        try:
            up = await http_client(request.app).post(
                f"{base_url}/v1/messages" + _query(request),
                data=upstream_body(body, raw, model),
                headers=upstream_headers(request, key),
                timeout=aiohttp.ClientTimeout(total=None, connect=min(10.0, read_timeout), sock_read=read_timeout),
            )
        except aiohttp.SocketTimeoutError as e:  # connected and sent, but no answer within the read timeout
            log.warning("Anthropic pass-through: %s did not answer in time: %r", base_url, e)
            await meter.record(TokenUsage(), "error", error="LLM_ERROR", answered=False)
            return _error(502, "Anthropic did not answer in time. Try again.")
        except (aiohttp.ClientError, TimeoutError) as e:
            log.warning("Anthropic pass-through: could not reach %s: %r", base_url, e)
            await meter.record(TokenUsage(), "error", error="LLM_ERROR", answered=False)
            return _error(502, "Could not connect to Anthropic. Check the network and [providers.anthropic] base_url.")
        try:
            if up.status != 200:
                data = await up.read()
                await meter.record(TokenUsage(), "error", error=error_code_for_status(up.status), answered=False)
                if up.status in KEY_REFUSED:
                    return key_refused(gw, base_url, up.status, data)
                if not _is_api_error(data):  # a proxy's HTML page, an empty body: no SDK reads it as an error
                    return _error(up.status, f"Anthropic answered HTTP {up.status} without an API error body.")
                return web.Response(status=up.status, body=redact_bytes(data), headers=relayed_headers(up))
            # A stream is answered at its message_start (noted with its usage, ``_Relay.note``), not at its status:
            # ``_record_stream`` voids a stream cut or left before it, and a recovery must bill what it would.
            if not body.get("stream"):
                return await _whole(up, body, meter)
            return await _stream(request, up, body, meter)
        finally:
            up.close()  # a no-op for a finished response; drops the connection of an unfinished one
    except asyncio.CancelledError:
        # The client went away while we waited for the upstream (a server that cancels handlers then; once it
        # answered, ``_whole`` and ``_stream`` record).
        if not body.get("stream"):
            await meter.left_whole()  # a whole answer: the upstream has the request and bills its input
        elif meter.recorded is None:  # no message_start yet: voided, as ``_stream`` voids a client gone before it
            pending = meter.record(TokenUsage(), "aborted", error="ABORTED", answered=False)
            await asyncio.shield(asyncio.ensure_future(pending))
        if not answers_shutdown(request):
            raise
        # the server's shutdown, before the answer began: a 503 the SDKs retry, not a dropped connection
        return _error(503, SHUTTING_DOWN_MESSAGE)


async def _whole(up: aiohttp.ClientResponse, body: dict[str, Any], meter: ProviderCall) -> web.Response:
    try:
        data = await up.read()
    except (aiohttp.ClientError, TimeoutError) as e:
        log.warning("Anthropic pass-through: the answer broke off: %r", e)
        cut = cut_short_usage(None, lambda: local_input_tokens(body), lambda: 0)  # a whole answer cut: none read
        await meter.record(cut, "error", error="LLM_ERROR")
        return _error(502, "Anthropic's answer broke off before it was complete. Try again.")
    try:
        message = json.loads(data)
    except ValueError:
        message = None
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        # No Message (an empty body, text, other JSON): what a client's SDK cannot read is a 502 here, as on
        # the translated endpoints, not a 200 it fails to parse. The upstream took the request: counted.
        warn_limited(
            log, "anthropic-relay-no-message", "Anthropic pass-through: an answer was no Message: %r", data[:200]
        )
        await meter.record(
            cut_short_usage(None, lambda: local_input_tokens(body), lambda: 0), "error", error="LLM_ERROR"
        )
        return _error(502, UNREADABLE_MESSAGE + ". Try again.")
    usage = message_usage(message)
    if usage is None:  # an answer without its usage: counted here, as a call cut short is
        await meter.record(cut_short_usage(None, lambda: local_input_tokens(body), lambda: 0), "other")
    else:
        stop_reason = message.get("stop_reason") if isinstance(message, dict) else None
        await meter.record(usage, FINISH_REASONS.get(stop_reason or "", "other"))
    return web.Response(status=200, body=redact_bytes(data), headers=relayed_headers(up))


async def _stream(
    request: web.Request, up: aiohttp.ClientResponse, body: dict[str, Any], meter: ProviderCall
) -> web.StreamResponse:
    resp = web.StreamResponse(
        status=200, headers={**relayed_headers(up), "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    relay = _Relay()
    # An error event inside the stream may quote the key it was sent, like an error status's body.
    redactor = StreamRedactor()

    stop_watching = watch_client(request, up.close)  # closing ends the read in progress: the upstream sees it
    recorded = False
    at_event_end = True  # whether the bytes written so far end an event (or none were)
    try:
        await resp.prepare(request)
        async for read in up.content.iter_any():
            relay.feed(read)
            relay.note(meter)
            chunk = redactor.feed(read)
            if not recorded and relay.ended:
                chunk += redactor.flush()
                # The last event (message_stop, or an error) waits for the record to be durable, as every
                # answer's end does (docs/accounting.md): a client that reads its usage after the stream finds it. What
                # came before it in the same read goes first.
                last = last_event_offset(chunk)
                if last > 0:
                    await resp.write(chunk[:last])
                    meter.first_output()  # also when the whole body came in this one read
                    chunk = chunk[last:]
                recorded = True
                await _record_stream(meter, relay.scanner, body, disconnected=False, cut=False)
            if chunk:
                await resp.write(chunk)
                at_event_end = chunk.endswith(b"\n\n")
                meter.first_output()  # the time to first byte of the relayed stream
    except ConnectionResetError:  # the client went away (aiohttp's ClientConnectionResetError on write)
        relay.disconnected = True
    except (aiohttp.ClientError, TimeoutError):
        relay.disconnected = client_gone(request)  # we closed the upstream because the client went away
        relay.cut = not relay.disconnected
    except asyncio.CancelledError:
        # A server that cancels handlers when their client goes away: still one record for the call. Or the
        # server's shutdown stopped it at its grace's end: recorded alike (aborted), and the client still there
        # gets an error event, as Anthropic ends a stream that fails, where the bytes sent end an event.
        up.close()
        relay.disconnected = True
        if not recorded:
            await asyncio.shield(
                asyncio.ensure_future(_record_stream(meter, relay.finish(), body, disconnected=True, cut=False))
            )
        if not (resp.prepared and answers_shutdown(request)):
            raise
        if not at_event_end and request.transport is not None:
            request.transport.close()  # mid-event: an incomplete body, as for a stream cut
            return resp
        with contextlib.suppress(ConnectionResetError):
            if not recorded:  # (recorded: its last event, message_stop or error, came already)
                error = json_bytes(error_body(503, SHUTTING_DOWN_MESSAGE))
                await resp.write(b"event: error\ndata: " + error + b"\n\n")
            await resp.write_eof()
        return resp
    finally:
        stop_watching()
    scanner = relay.finish()
    cut = relay.cut or not (scanner.complete or scanner.error_type)
    if not recorded:
        await _record_stream(meter, scanner, body, disconnected=relay.disconnected, cut=cut)
    if relay.disconnected:
        return resp
    if cut and not scanner.error_type and request.transport is not None:
        request.transport.close()  # like the upstream: the client sees an incomplete body, not a clean end
        return resp
    await resp.write_eof(redactor.flush())  # not on a cut: what is held back may begin a secret
    return resp


def last_event_offset(chunk: bytes) -> int:
    """Where the stream's last event (``message_stop`` or ``error``) starts in ``chunk``; 0 if not in it."""
    return max(chunk.rfind(b"event: message_stop"), chunk.rfind(b"event: error"), 0)


class _Relay:
    """What a relayed stream has shown so far: its events, read as the bytes go by, and how it ended."""

    __slots__ = ("decoder", "scanner", "unreadable", "disconnected", "cut", "_noted", "_deltas_noted")

    def __init__(self) -> None:
        self.decoder = SSEDecoder()
        self.scanner = UsageScanner()
        self.unreadable = False
        self.disconnected = False
        self.cut = False
        self._noted: tuple[object, ...] | None = None  # the usage last noted in the ledger
        self._deltas_noted = 0

    def note(self, call: ProviderCall) -> None:
        """Into the ledger: reported usage as it arrives, the output relayed (counted when it is noted)."""
        usage = self.scanner.usage
        if usage is not None:
            tools = self.scanner.server_tools_seen
            seen = (usage.input_tokens, usage.output_tokens, usage.cache_read_tokens, usage.cache_write_tokens, len(tools), sum(tools.values()))  # fmt: skip
            if seen != self._noted:
                self._noted = seen
                if not self.scanner.final_delta:  # the server tools seen to run, until their count is reported
                    usage = replace(usage)
                    if with_seen_server_tools(usage, tools):
                        usage.estimated_fields = (*usage.estimated_fields, "serverToolUse")
                call.note(usage, final=self.scanner.final_delta)
        deltas = len(self.scanner._deltas)
        if deltas != self._deltas_noted:
            self._deltas_noted = deltas
            call.relayed_tokens(self.scanner.output_tokens_so_far)

    def feed(self, chunk: bytes) -> None:
        if self.unreadable:
            return
        try:
            self.scanner.feed(self.decoder.feed(chunk))
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            # The client got the bytes as they were; only our reading of them stops.
            log.warning("Anthropic pass-through: unreadable event; the output is counted locally")
            self.unreadable = True

    @property
    def ended(self) -> bool:
        """The stream's last event has been read: ``message_stop`` or an ``error`` event."""
        return not self.unreadable and (self.scanner.complete or self.scanner.error_type is not None)

    def finish(self) -> UsageScanner:
        if not self.unreadable:
            try:
                self.scanner.feed(self.decoder.close())
            except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
                self.unreadable = True
        if self.unreadable:
            self.scanner.final_delta = False  # what came after is unknown: count the output received
        return self.scanner


async def _record_stream(
    meter: ProviderCall, scanner: UsageScanner, body: dict[str, Any], *, disconnected: bool, cut: bool
) -> None:
    """The stream's one record: the reported usage, and local counts only for what was not reported."""
    if not scanner.started:  # an error event or a cut before message_start: the upstream never answered
        error = (
            error_code_for_type(scanner.error_type)
            if scanner.error_type
            else ("ABORTED" if disconnected else "LLM_ERROR")
        )
        await meter.record(TokenUsage(), "aborted" if disconnected else "error", error=error, answered=False)
        return
    reported = scanner.usage
    if reported is not None and not scanner.final_delta:  # the server tools seen to run, not reported yet
        reported = replace(reported)
        if with_seen_server_tools(reported, scanner.server_tools_seen):
            reported.estimated_fields = (*reported.estimated_fields, "serverToolUse")
    # By the one rule (``calls.cut_short_usage``); a whole stream's final report is its usage as it is.
    usage = cut_short_usage(
        reported,
        lambda: local_input_tokens(body),
        scanner.received_output_tokens,
        output_after_report=not scanner.final_delta,
    )
    if disconnected:
        await meter.record(usage, "aborted")
    elif scanner.error_type:
        await meter.record(usage, "error", error=error_code_for_type(scanner.error_type))
    elif cut:
        await meter.record(usage, "error", error="LLM_ERROR")
    else:
        await meter.record(usage, FINISH_REASONS.get(scanner.stop_reason or "", "other"))


async def count_tokens(
    request: web.Request,
    gw: Registry,
    body: dict[str, Any],
    raw: bytes,
    model: str,
    *,
    key: str | None = None,
    base_url: str | None = None,
) -> web.Response | None:
    """Anthropic's own count (with ``key`` and ``base_url`` when a model group's deployment gives them); None
    when it has none to give (no key, no such endpoint, unreachable), so the caller counts locally. A refused
    key is 424 (``key_refused``); other upstream errors are relayed, redacted."""
    key = key or resolve_key(gw.config, "anthropic")
    if not key:
        return None

    default_url, read_timeout = upstream(gw)
    base_url = (base_url or default_url).rstrip("/")
    try:
        async with http_client(request.app).post(
            f"{base_url}/v1/messages/count_tokens" + _query(request),
            data=upstream_body(body, raw, model),
            headers=upstream_headers(request, key),
            timeout=aiohttp.ClientTimeout(total=min(60.0, read_timeout), connect=min(10.0, read_timeout)),
        ) as up:
            data = await up.read()
            if up.status in (404, 405):
                return None
            if up.status in KEY_REFUSED:
                return key_refused(gw, base_url, up.status, data)
            if up.status == 200 and not _is_count(data):  # a proxy that answered something else: counted here
                return None
            if up.status != 200 and not _is_api_error(data):
                return _error(up.status, f"Anthropic answered HTTP {up.status} without an API error body.")
            return web.Response(status=up.status, body=redact_bytes(data), headers=relayed_headers(up))
    except (aiohttp.ClientError, TimeoutError) as e:
        log.warning("Anthropic count_tokens: could not reach %s: %r", base_url, e)
        return None
