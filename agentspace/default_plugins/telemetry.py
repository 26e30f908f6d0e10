"""The built-in telemetry plugin: OpenTelemetry spans for turns and provider calls (README.md#metrics-and-traces).

Off by default. It traces when ``[telemetry] otlp_endpoint`` is set (spans go there over OTLP/HTTP; needs
``pip install 'agentspace[otel]'``), or when the process running the gateway has installed an OpenTelemetry
SDK tracer provider of its own (``trace.set_tracer_provider``), which is then used as it is.

Spans follow the OpenTelemetry semantic conventions for generative AI, version 1.37.0 (status:
development): one ``chat {model}`` span (kind CLIENT) per provider call, retries and fallbacks included,
the child of one ``invoke_agent agentspace`` span per chat turn. Cost, client, endpoint and attempts are
under ``agentspace.*``. Prompt and answer text (``gen_ai.system_instructions``, ``gen_ai.input.messages``,
``gen_ai.output.messages``) only with ``[telemetry] capture_content = true``.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from agentspace.hookspecs import hookimpl
from agentspace.types import part_to_dict

if TYPE_CHECKING:
    from aiohttp import web

    from agentspace.config import Config
    from agentspace.observe import CallInfo, TurnInfo
    from agentspace.types import ChatMessage, UsageRecord

log = logging.getLogger(__name__)

SEMCONV_VERSION = "1.37.0"
# Our model-id prefixes -> the convention's gen_ai.provider.name values, where they differ.
PROVIDER_NAMES = {
    "gemini": "gcp.gemini",
    "vertex_ai": "gcp.vertex_ai",
    "bedrock": "aws.bedrock",
    "azure": "azure.ai.openai",
}
SPAN = "otel_span"  # key of the span in TurnInfo.state / CallInfo.state
CALLS = "otel_open_calls"  # key of a turn's call spans not yet ended


class _Telemetry:
    """What this process traces with: a tracer (None: off), whether to capture content, our own provider."""

    tracer: Any = None
    capture_content = False
    provider: Any = None  # the SDK TracerProvider we made for otlp_endpoint, shut down with the server


_t = _Telemetry()


def _sdk_tracer_provider() -> Any:
    """The process's tracer provider when it is a configured SDK one, else None (tracing is off)."""
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        return None
    provider = trace.get_tracer_provider()
    return provider if isinstance(provider, TracerProvider) else None


@hookimpl
def server_startup(app: web.Application, config: Config) -> None:
    settings = config["telemetry"]
    _t.capture_content = bool(settings["capture_content"])
    endpoint = settings["otlp_endpoint"]
    if endpoint:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            raise RuntimeError(
                "[telemetry] otlp_endpoint is set but OpenTelemetry is not installed: pip install 'agentspace[otel]'"
            ) from None
        _t.provider = TracerProvider(resource=Resource.create({"service.name": "agentspace"}))
        _t.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        _t.tracer = _t.provider.get_tracer(
            "agentspace", schema_url=f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"
        )
        log.info("telemetry: spans go to %s", endpoint)
        return
    provider = _sdk_tracer_provider()
    _t.tracer = None if provider is None else provider.get_tracer("agentspace")


@hookimpl
def server_shutdown(app: web.Application, config: Config) -> None:
    if _t.provider is not None:
        _t.provider.shutdown()  # flushes the spans still queued
        _t.provider = None
    _t.tracer = None


def _provider_name(model: str) -> str:
    prefix = model.split("/", 1)[0]
    return PROVIDER_NAMES.get(prefix, prefix)


def _messages_json(messages: list[ChatMessage]) -> str:
    return json.dumps(
        [{"role": m.role, "parts": [part_to_dict(p) for p in m.parts]} for m in messages],
        default=str,
        ensure_ascii=False,
    )


@hookimpl
def turn_started(turn: TurnInfo) -> None:
    if _t.tracer is None:
        return
    from opentelemetry.trace import SpanKind

    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.agent.name": "agentspace",
        "gen_ai.provider.name": _provider_name(turn.model),
        "gen_ai.request.model": turn.model,
        "gen_ai.conversation.id": turn.session_id,
        "agentspace.endpoint": turn.endpoint or "",
    }
    if turn.client:
        attributes["agentspace.client"] = turn.client
    turn.state[SPAN] = _t.tracer.start_span("invoke_agent agentspace", kind=SpanKind.INTERNAL, attributes=attributes)
    turn.state[CALLS] = []


@hookimpl
def turn_finished(turn: TurnInfo, finish_reason: str, error: str | None) -> None:
    span = turn.state.pop(SPAN, None)
    if span is None:
        return
    from opentelemetry.trace import Status, StatusCode

    for call_span in turn.state.pop(CALLS, []):  # calls stopped before they ended (an abort, a failure)
        if call_span.is_recording():
            call_span.end()
    span.set_attribute("gen_ai.response.finish_reasons", [finish_reason])
    if error:
        span.set_attribute("error.type", error)
        span.set_status(Status(StatusCode.ERROR))
    span.end()


@hookimpl
def provider_call_started(call: CallInfo) -> None:
    if _t.tracer is None:
        return
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind

    parent = call.turn.state.get(SPAN) if call.turn is not None else None
    context = trace.set_span_in_context(parent) if parent is not None else None
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": _provider_name(call.model),
        "gen_ai.request.model": call.model,
        "agentspace.endpoint": call.endpoint or "",
    }
    if call.session_id:
        attributes["gen_ai.conversation.id"] = call.session_id
    if call.client:
        attributes["agentspace.client"] = call.client
    if call.turn is not None:
        attributes["agentspace.step"] = call.step
    if _t.capture_content:
        if call.system:
            attributes["gen_ai.system_instructions"] = json.dumps(
                [{"type": "text", "content": call.system}], ensure_ascii=False
            )
        if call.messages is not None:
            attributes["gen_ai.input.messages"] = _messages_json(call.messages)
    span = _t.tracer.start_span(f"chat {call.model}", context=context, kind=SpanKind.CLIENT, attributes=attributes)
    call.state[SPAN] = span
    if call.turn is not None:
        call.turn.state.setdefault(CALLS, []).append(span)


@hookimpl
def provider_call_finished(call: CallInfo, record: UsageRecord) -> None:
    span = call.state.pop(SPAN, None)
    if span is None:
        return
    from opentelemetry.trace import Status, StatusCode

    u = record.usage
    span.set_attributes(
        {
            "gen_ai.response.model": record.model,
            "gen_ai.response.finish_reasons": [record.finish_reason],
            # The convention's input tokens include the cached ones (read and written).
            "gen_ai.usage.input_tokens": u.input_tokens + u.cache_read_tokens + u.cache_write_tokens,
            "gen_ai.usage.output_tokens": u.output_tokens,
            "agentspace.usage.cache_read_tokens": u.cache_read_tokens,
            "agentspace.usage.cache_write_tokens": u.cache_write_tokens,
            "agentspace.usage.reasoning_tokens": u.reasoning_tokens,
            "agentspace.usage.estimated": u.estimated,
            "agentspace.cost_usd": record.cost.total_cost,
            "agentspace.attempts": record.attempts,
            "agentspace.usage_record_id": record.id,
        }
    )
    if call.response_id:
        span.set_attribute("gen_ai.response.id", call.response_id)
    if record.ttft_ms is not None:
        span.set_attribute("agentspace.ttft_ms", record.ttft_ms)
    if _t.capture_content and call.answer is not None:
        span.set_attribute(
            "gen_ai.output.messages",
            json.dumps(
                [
                    {
                        "role": "assistant",
                        "parts": [{"type": "text", "content": call.answer}],
                        "finish_reason": record.finish_reason,
                    }
                ],
                ensure_ascii=False,
            ),
        )
    if record.error:
        span.set_attribute("error.type", record.error)
        span.set_status(Status(StatusCode.ERROR))
    span.end()
    if call.turn is not None:
        calls = call.turn.state.get(CALLS)
        if calls and span in calls:
            calls.remove(span)
