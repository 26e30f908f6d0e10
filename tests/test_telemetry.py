"""OpenTelemetry spans (issue 21) from the built-in telemetry plugin, captured with the SDK's
in-memory exporter: one ``chat {model}`` span per provider call with the GenAI attributes, the child of one
``invoke_agent agentspace`` span per turn; a tool loop and a failed call; prompt and answer text only with
``[telemetry] capture_content``; the /v1 calls traced too.

The process's tracer provider is an SDK one here (as an embedding application would install it), so the
plugin traces without ``otlp_endpoint``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anthropic
import openai
import pytest
from aiohttp.test_utils import TestClient
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from agentspace.plugins import create_plugin_manager
from agentspace.transports import state as STATE
from tests.fakes import anthropic_upstream as fa
from tests.support.ws import chat, connect
from tests.tool_plugins import WeatherTools

MODEL = "anthropic/claude-sonnet-4-5"
USAGE = {"input_tokens": 30, "cache_read_input_tokens": 7, "cache_creation_input_tokens": 4, "output_tokens": 9}
EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def tracer_provider() -> None:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)  # once per process: OpenTelemetry's global
    assert isinstance(trace.get_tracer_provider(), TracerProvider)
    trace.get_tracer_provider().add_span_processor(SimpleSpanProcessor(EXPORTER))  # type: ignore[attr-defined]


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    EXPORTER.clear()
    yield EXPORTER
    EXPORTER.clear()


@pytest.fixture
async def app(
    make_client: Callable[..., Awaitable[TestClient]], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Awaitable[TestClient]]:
    monkeypatch.setenv("AGENTSPACE_LOAD_PLUGINS", "telemetry")

    async def make(**sections: Any) -> TestClient:
        pm = create_plugin_manager()
        pm.register(WeatherTools())
        return await make_client(pm=pm, **sections)

    return make


def ours(spans: InMemorySpanExporter) -> list[ReadableSpan]:
    """The gateway's spans (a span not the gateway's would have no endpoint)."""
    return [s for s in spans.get_finished_spans() if "agentspace.endpoint" in (s.attributes or {})]


def by_name(spans: InMemorySpanExporter) -> tuple[ReadableSpan, list[ReadableSpan]]:
    finished = ours(spans)
    (turn,) = [s for s in finished if s.name == "invoke_agent agentspace"]
    calls = sorted((s for s in finished if s.name.startswith("chat ")), key=lambda s: s.start_time or 0)
    return turn, calls


def content_keys(span: ReadableSpan) -> set[str]:
    keys = {"gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.system_instructions"}
    return keys & set(span.attributes or {})


async def test_a_plain_chat_is_one_call_span_under_the_turn_span(
    app: Any, token: str, fake_anthropic: fa.FakeAnthropic, spans: InMemorySpanExporter
) -> None:
    client = await app()
    fake_anthropic.enqueue(fa.text_response("Paris is the capital.", usage=USAGE))
    ws = await connect(client, token)
    frames = await chat(ws, "capital of France? my secret is 4242")
    session_id = frames[0]["sessionId"]
    await ws.close()
    turn, (call,) = by_name(spans)
    # One span per provider call, the gateway's: the SDK's own call span (it makes one where a tracer provider
    # is installed, as here) is turned off.
    assert len(spans.get_finished_spans()) == len(ours(spans)) == 2
    assert call.parent is not None and call.parent.span_id == turn.context.span_id
    assert call.context.trace_id == turn.context.trace_id
    assert call.name == f"chat {MODEL}" and call.kind is SpanKind.CLIENT
    a = dict(call.attributes or {})
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "anthropic"
    assert a["gen_ai.request.model"] == MODEL and a["gen_ai.response.model"] == MODEL
    assert a["gen_ai.response.finish_reasons"] == ("stop",)
    assert a["gen_ai.usage.input_tokens"] == 30 + 7 + 4  # cached tokens included
    (record,) = await client.server.app[STATE.REGISTRY].usage.records(session_id=session_id)
    assert a["gen_ai.usage.output_tokens"] == record["outputTokens"] > 0
    assert a["agentspace.cost_usd"] == record["totalCost"] and a["agentspace.usage_record_id"] == record["id"]
    assert a["gen_ai.conversation.id"] == session_id
    assert a["agentspace.client"] == "admin" and a["agentspace.endpoint"] == "ws"
    assert a["agentspace.cost_usd"] > 0 and a["agentspace.attempts"] == 1
    assert "error.type" not in a and call.status.status_code is not StatusCode.ERROR
    t = dict(turn.attributes or {})
    assert t["gen_ai.operation.name"] == "invoke_agent" and t["gen_ai.conversation.id"] == session_id
    # No prompt or answer text unless capture_content is on.
    for span in (turn, call):
        assert not content_keys(span)
        assert "4242" not in json.dumps(dict(span.attributes or {}), default=str)


async def test_a_tool_loop_is_one_call_span_per_step(
    app: Any, token: str, fake_anthropic: fa.FakeAnthropic, spans: InMemorySpanExporter
) -> None:
    client = await app()
    fake_anthropic.enqueue(
        fa.tool_use_response("get_weather", {"city": "Paris"}),
        fa.tool_use_response("broken", {}, id="toolu_02"),
        fa.text_response("Sunny."),
    )
    ws = await connect(client, token)
    await chat(ws, "weather?")
    await ws.close()
    turn, calls = by_name(spans)
    assert len(calls) == 3
    assert all(c.parent is not None and c.parent.span_id == turn.context.span_id for c in calls)
    assert [c.attributes["agentspace.step"] for c in calls] == [0, 1, 2]  # type: ignore[index]
    finish = [c.attributes["gen_ai.response.finish_reasons"] for c in calls]  # type: ignore[index]
    assert finish == [("tool-calls",), ("tool-calls",), ("stop",)]
    assert (turn.attributes or {})["gen_ai.response.finish_reasons"] == ("stop",)


async def test_a_failed_call_has_its_error_type(
    app: Any, token: str, fake_anthropic: fa.FakeAnthropic, spans: InMemorySpanExporter
) -> None:
    client = await app(chat={"max_retries": 0})
    fake_anthropic.enqueue(fa.error_status(429, retry_after=1))
    ws = await connect(client, token)
    assert (await chat(ws, "hi"))[-1]["code"] == "RATE_LIMITED"
    await ws.close()
    turn, (call,) = by_name(spans)
    assert call.parent is not None and call.parent.span_id == turn.context.span_id
    assert (call.attributes or {})["error.type"] == "RATE_LIMITED" and call.status.status_code is StatusCode.ERROR
    assert (call.attributes or {})["gen_ai.usage.input_tokens"] == 0  # never answered: nothing billed
    assert (turn.attributes or {})["error.type"] == "RATE_LIMITED" and turn.status.status_code is StatusCode.ERROR


async def test_content_only_when_captured(
    app: Any, token: str, fake_anthropic: fa.FakeAnthropic, spans: InMemorySpanExporter
) -> None:
    client = await app(telemetry={"capture_content": True})
    fake_anthropic.enqueue(fa.text_response("The answer is 42."))
    ws = await connect(client, token)
    await chat(ws, "what is the answer?")
    await ws.close()
    _, (call,) = by_name(spans)
    a = dict(call.attributes or {})
    assert content_keys(call) == {"gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.system_instructions"}
    assert "what is the answer?" in json.loads(str(a["gen_ai.input.messages"]))[-1]["parts"][0]["text"]
    output = json.loads(str(a["gen_ai.output.messages"]))
    assert output[0]["parts"][0]["content"] == "The answer is 42." and output[0]["role"] == "assistant"


async def test_a_v1_call_is_a_span_of_its_own(
    app: Any, token: str, fake_anthropic: fa.FakeAnthropic, spans: InMemorySpanExporter
) -> None:
    client = await app()
    fake_anthropic.enqueue(fa.text_response("relayed", usage=USAGE))
    api = anthropic.AsyncAnthropic(api_key=token, base_url=f"http://127.0.0.1:{client.port}", max_retries=0)
    await api.messages.create(model="claude-sonnet-4-5", max_tokens=64, messages=[{"role": "user", "content": "Hello"}])
    (call,) = ours(spans)
    a = dict(call.attributes or {})
    assert call.name == f"chat {MODEL}" and call.parent is None
    assert a["agentspace.endpoint"] == "anthropic" and a["gen_ai.usage.input_tokens"] == 41
    assert a["gen_ai.usage.output_tokens"] == 3  # the fake's final count


async def test_no_spans_without_a_tracer(
    make_client: Callable[..., Awaitable[TestClient]],
    token: str,
    fake_anthropic: fa.FakeAnthropic,
    spans: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Left out (AGENTSPACE_LOAD_PLUGINS without it), the plugin makes no spans."""
    monkeypatch.setenv("AGENTSPACE_LOAD_PLUGINS", "")
    client = await make_client(pm=create_plugin_manager())
    fake_anthropic.enqueue(fa.text_response("hi"))
    ws = await connect(client, token)
    await chat(ws, "hi")
    await ws.close()
    assert ours(spans) == []


async def test_a_translated_v1_call_captures_content_when_enabled(
    app: Any, token: str, fake_anthropic: fa.FakeAnthropic, spans: InMemorySpanExporter
) -> None:
    client = await app(telemetry={"capture_content": True})
    fake_anthropic.enqueue(fa.text_response("Bonjour."))
    api = openai.AsyncOpenAI(api_key=token, base_url=f"http://127.0.0.1:{client.port}/v1", max_retries=0)
    await api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello in French"}])
    (call,) = ours(spans)
    a = dict(call.attributes or {})
    assert call.parent is None and a["agentspace.endpoint"] == "openai"
    assert "Say hello in French" in str(a["gen_ai.input.messages"])
    assert json.loads(str(a["gen_ai.output.messages"]))[0]["parts"][0]["content"] == "Bonjour."
