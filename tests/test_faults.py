"""Upstream faults through the real interface: WebSocket and POST /api/chat, the real anthropic SDK and
litellm against the fake upstreams. Retries and fallbacks happen only before the first token reached the
client; a stream that breaks after it is stored (marked failed), billed, and ends with an error."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from agentspace import pipeline
from agentspace.events import ProviderError
from agentspace.transports import state as STATE
from tests.conftest import TEST_KEY
from tests.fakes import anthropic_upstream as fa
from tests.fakes import openai_upstream as fo
from tests.support.ui_stream import DONE, post_chat, read_all, user
from tests.support.ws import chat, connect, of

ANTHROPIC = "anthropic/claude-sonnet-4-5"
OPENAI = "openai/gpt-4o-mini"
OPENAI_KEY = "sk-openai-test-fedcba9876543210"
CHUNKS = ["alpha ", "beta ", "gamma ", "delta "]
PARTIAL = "".join(CHUNKS)


@dataclass
class Outcome:
    """One chat as a client saw it, and what the gateway stored and billed for it."""

    text: str
    error: str | None  # the error message (WS: "CODE: message"), None when the answer ended normally
    finish_reason: str | None
    message: dict[str, Any] = field(default_factory=dict)  # the stored assistant message
    records: list[dict[str, Any]] = field(default_factory=list)  # its usage records
    start_model: str | None = None


class Faults:
    """The same fault, scripted for either fake upstream."""

    def __init__(self, provider: str, anthropic: fa.FakeAnthropic, openai: fo.FakeOpenAI) -> None:
        self.provider = provider
        self.fake: Any = anthropic if provider == "anthropic" else openai
        self.model = ANTHROPIC if provider == "anthropic" else OPENAI

    @property
    def anthropic(self) -> bool:
        return self.provider == "anthropic"

    def ok(self, text: str = "recovered") -> Any:
        return fa.text_response(text) if self.anthropic else fo.text_response(text)

    def status(self, status: int, retry_after: float | None = None) -> Any:
        return (
            fa.error_status(status, retry_after=retry_after)
            if self.anthropic
            else fo.error_status(status, retry_after=retry_after)
        )

    def cut(self) -> Any:
        """Two of four deltas, then the connection drops."""
        # Anthropic: message_start, ping, content_block_start, 2 deltas. OpenAI: the role delta, 2 deltas.
        return (
            fa.text_response(PARTIAL, chunks=CHUNKS).cut_after(5)
            if self.anthropic
            else fo.text_response(PARTIAL, chunks=CHUNKS).cut_after(3)
        )

    def no_stop_reason(self) -> Any:
        """All deltas, then a clean end of the body without a stop reason."""
        if self.anthropic:
            return fa.text_response(PARTIAL, chunks=CHUNKS).cut_after(7, abort=False)
        return fo.text_response(PARTIAL, chunks=CHUNKS).cut_after(5, abort=False)

    def stall(self) -> Any:
        if self.anthropic:
            return fa.text_response(PARTIAL, chunks=CHUNKS).stall(60, after=5)
        return fo.text_response(PARTIAL, chunks=CHUNKS).stall(60, after=3)

    def malformed(self) -> Any:
        return fa.malformed_response() if self.anthropic else fo.malformed_response()


Chat = Callable[[str, str | None], Awaitable[Outcome]]


@pytest.fixture
async def setup(
    make_client: Any,
    fake_anthropic: fa.FakeAnthropic,
    fake_openai: fo.FakeOpenAI,
    token: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[..., Awaitable[tuple[TestClient, Chat]]]:
    """``await setup(transport, **config)``: a client with both providers, and a ``chat(content, model)``."""
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.setattr(pipeline.random, "random", lambda: 0.0)  # shortest backoff: 0.25 s, 0.5 s, ...
    headers = {"Authorization": f"Bearer {token}"}

    async def make(transport: str, **sections: Any) -> tuple[TestClient, Chat]:
        sections.setdefault("providers", {}).setdefault("openai", {"base_url": fake_openai.url})
        client = await make_client(**sections)
        gw = client.server.app[STATE.REGISTRY]
        counter = iter(range(1000))

        async def stored(outcome: Outcome, session_id: str) -> Outcome:
            outcome.message = (await gw.sessions.get(session_id))["messages"][-1]
            outcome.records = await gw.usage.records(session_id=session_id)
            return outcome

        async def ws_chat(content: str, model: str | None) -> Outcome:
            ws = await connect(client, token)
            try:
                frames = await chat(ws, content, **({"model": model} if model else {}))
            finally:
                await ws.close()
            last = frames[-1]
            start = of(frames, "chat.stream.start")
            outcome = Outcome(
                "".join(f["delta"] for f in of(frames, "chat.stream.delta")),
                f"{last['code']}: {last['message']}" if last["type"] == "error" else None,
                last.get("finishReason"),
                start_model=start[0]["model"] if start else None,
            )
            return await stored(outcome, start[0]["sessionId"]) if start else outcome

        async def http_chat(content: str, model: str | None) -> Outcome:
            chat_id = f"chat-{next(counter)}"
            resp = await post_chat(client, headers, chat_id, user(content), **({"model": model} if model else {}))
            assert resp.status == 200, await resp.text()
            chunks = await read_all(resp)
            assert chunks[-1] == DONE
            last = chunks[-2]
            outcome = Outcome(
                "".join(c["delta"] for c in chunks[:-1] if c["type"] == "text-delta"),
                last["errorText"] if last["type"] == "error" else None,
                last.get("finishReason"),
            )
            return await stored(outcome, chat_id)

        return client, ws_chat if transport == "ws" else http_chat

    return make


both_transports = pytest.mark.parametrize("transport", ["ws", "http"])
both_providers = pytest.mark.parametrize("provider", ["anthropic", "openai"])


@pytest.fixture
def faults(request: pytest.FixtureRequest, fake_anthropic: fa.FakeAnthropic, fake_openai: fo.FakeOpenAI) -> Faults:
    return Faults(request.node.callspec.params["provider"], fake_anthropic, fake_openai)


def assert_failed_and_billed(outcome: Outcome, model: str, partial: str) -> None:
    """The client got the partial answer then an error; it is stored as failed and billed (estimated)."""
    assert outcome.text == partial
    assert outcome.error is not None and outcome.finish_reason is None
    message = outcome.message
    assert message["role"] == "assistant" and message["content"] == partial
    assert message["finishReason"] == "error" and message["aborted"] is False
    assert message["error"]["code"] == "LLM_ERROR" and message["model"] == model
    (record,) = outcome.records
    assert record["finishReason"] == "error" and record["model"] == model
    assert record["estimated"] is True and record["inputTokens"] > 0
    assert (record["outputTokens"] > 0) == bool(partial)


# --- retries before the first token ----------------------------------------------------------------


@both_transports
@both_providers
async def test_429_honours_retry_after(
    setup: Any, faults: Faults, transport: str, provider: str, caplog: pytest.LogCaptureFixture
) -> None:
    _, chat_ = await setup(transport)
    faults.fake.enqueue(faults.status(429, retry_after=0.2), faults.ok("recovered"))
    with caplog.at_level(logging.INFO, logger="agentspace.pipeline"):
        outcome = await chat_("hi", faults.model)
    assert (outcome.text, outcome.error, outcome.finish_reason) == ("recovered", None, "stop")
    assert len(faults.fake.requests) == 2
    assert "retry 1 in 0.2s" in caplog.text  # the upstream's Retry-After, not our backoff
    (record,) = outcome.records
    assert record["finishReason"] == "stop" and record["model"] == faults.model


@both_transports
@both_providers
async def test_retries_are_bounded(setup: Any, faults: Faults, transport: str, provider: str) -> None:
    _, chat_ = await setup(transport, chat={"max_retries": 1})
    faults.fake.enqueue(*(faults.status(429, retry_after=0.05) for _ in range(3)))
    outcome = await chat_("hi", faults.model)
    assert len(faults.fake.requests) == 2  # the call and one retry
    assert outcome.error is not None and "rate limit" in outcome.error.lower()
    if transport == "ws":
        assert outcome.error.startswith("RATE_LIMITED: ")
    assert outcome.message["error"]["code"] == "RATE_LIMITED" and outcome.message["content"] == ""
    (record,) = outcome.records
    assert record["finishReason"] == "error" and record["outputTokens"] == 0


@both_transports
@both_providers
async def test_server_errors_are_retried_with_backoff(
    setup: Any, faults: Faults, transport: str, provider: str
) -> None:
    _, chat_ = await setup(transport, chat={"max_retries": 3})
    statuses = (500, 503, 529) if faults.anthropic else (500, 503)
    faults.fake.enqueue(*(faults.status(s) for s in statuses), faults.ok("recovered"))
    outcome = await chat_("hi", faults.model)
    assert (outcome.text, outcome.error) == ("recovered", None)
    assert len(faults.fake.requests) == len(statuses) + 1
    assert len(outcome.records) == 1 and outcome.message["content"] == "recovered"


@both_providers
async def test_a_client_error_is_not_retried(setup: Any, faults: Faults, provider: str) -> None:
    _, chat_ = await setup("ws", chat={"max_retries": 3})
    faults.fake.enqueue(faults.status(400))
    outcome = await chat_("hi", faults.model)
    assert outcome.error is not None and outcome.error.startswith("LLM_ERROR: ")
    assert len(faults.fake.requests) == 1


class RefusingUpstream:
    """Reads each request line and hangs up without an answer: a connection error on every call."""

    def __init__(self) -> None:
        self.calls = 0  # chat calls; the Anthropic provider also asks the Models API (GET)
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> RefusingUpstream:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if (await reader.readline()).startswith(b"POST "):
                self.calls += 1
            writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


@both_transports
@both_providers
async def test_connection_errors_are_retried_then_reported(
    setup: Any, faults: Faults, transport: str, provider: str
) -> None:
    async with RefusingUpstream() as upstream:
        url = upstream.url + ("" if faults.anthropic else "/v1")
        _, chat_ = await setup(transport, chat={"max_retries": 2}, providers={provider: {"base_url": url}})
        outcome = await chat_("hi", faults.model)
        assert upstream.calls == 3
    assert outcome.error is not None and outcome.text == ""
    assert "Traceback" not in outcome.error and "Errno" not in outcome.error
    assert outcome.message["finishReason"] == "error" and len(outcome.records) == 1


# --- failures after the first token ---------------------------------------------------------------


@both_transports
@both_providers
async def test_stream_cut_midway(setup: Any, faults: Faults, transport: str, provider: str) -> None:
    _, chat_ = await setup(transport, chat={"max_retries": 2})
    faults.fake.enqueue(faults.cut())
    outcome = await chat_("hi", faults.model)
    assert len(faults.fake.requests) == 1  # a token had reached the client: no retry
    assert_failed_and_billed(outcome, faults.model, "alpha beta ")


@both_transports
@both_providers
async def test_stream_without_stop_reason(setup: Any, faults: Faults, transport: str, provider: str) -> None:
    _, chat_ = await setup(transport)
    faults.fake.enqueue(faults.no_stop_reason())
    outcome = await chat_("hi", faults.model)
    assert len(faults.fake.requests) == 1
    assert_failed_and_billed(outcome, faults.model, PARTIAL)


@both_transports
@both_providers
async def test_stalled_stream_ends_at_the_idle_timeout(
    setup: Any, faults: Faults, transport: str, provider: str
) -> None:
    _, chat_ = await setup(transport, chat={"idle_timeout_seconds": 0.4})
    faults.fake.enqueue(faults.stall())
    outcome = await chat_("hi", faults.model)
    assert_failed_and_billed(outcome, faults.model, "alpha beta ")
    assert outcome.error is not None and "idle timeout" in outcome.error


@pytest.mark.parametrize("provider", ["anthropic"])
async def test_error_event_after_text_is_not_retried(setup: Any, faults: Faults, provider: str) -> None:
    _, chat_ = await setup("ws", chat={"max_retries": 2})
    faults.fake.enqueue(fa.error_event("overloaded_error", "Overloaded", text="partial answer"))
    outcome = await chat_("hi", faults.model)
    assert len(faults.fake.requests) == 1
    assert_failed_and_billed(outcome, faults.model, "partial answer")


@both_transports
@both_providers
async def test_malformed_upstream_data(setup: Any, faults: Faults, transport: str, provider: str) -> None:
    _, chat_ = await setup(transport)
    faults.fake.enqueue(faults.malformed(), faults.ok("fine again"))
    outcome = await chat_("hi", faults.model)
    assert outcome.error is not None and outcome.text == "Hello"
    if transport == "ws":
        assert outcome.error.startswith("LLM_ERROR: ")
    assert outcome.message["error"]["code"] == "LLM_ERROR" and len(outcome.records) == 1
    assert "Traceback" not in outcome.error and "JSON" not in outcome.error
    following = await chat_("again", faults.model)  # the server is unharmed
    assert (following.text, following.error) == ("fine again", None)


# --- fallbacks ------------------------------------------------------------------------------------


@both_transports
async def test_fallback_answers_when_the_primary_fails_before_the_first_token(
    setup: Any, fake_anthropic: fa.FakeAnthropic, fake_openai: fo.FakeOpenAI, transport: str
) -> None:
    _, chat_ = await setup(transport, chat={"max_retries": 1}, models={"fallbacks": {ANTHROPIC: [OPENAI]}})
    fake_anthropic.enqueue(fa.error_status(529), fa.error_status(529))
    fake_openai.enqueue(fo.text_response("from the fallback", usage=fo.usage(11, 4)))
    outcome = await chat_("hi", None)
    assert (outcome.text, outcome.error, outcome.finish_reason) == ("from the fallback", None, "stop")
    assert len(fake_anthropic.requests) == 2 and len(fake_openai.requests) == 1
    # Each model tried is a call of its own, as on /v1 and over a group's deployments: the primary's two
    # attempts one failed record, the fallback's answer the other.
    failed, record = outcome.records
    assert (failed["model"], failed["answered"], failed["error"], failed["attempts"]) == (
        ANTHROPIC,
        False,
        "LLM_ERROR",
        2,
    )
    assert (record["model"], record["provider"]) == (OPENAI, "openai")
    assert (record["inputTokens"], record["outputTokens"], record["estimated"]) == (11, 4, False)
    assert outcome.message["model"] == OPENAI
    if transport == "ws":
        assert outcome.start_model == ANTHROPIC  # the stream started for the requested model


@both_transports
async def test_no_fallback_after_a_400(
    setup: Any, fake_anthropic: fa.FakeAnthropic, fake_openai: fo.FakeOpenAI, transport: str
) -> None:
    """A 400 is the request's own fault: it would fail on any model, so the turn ends there, as on /v1 -- the
    requested model's 400 and a fallback's alike (a 529 still falls back)."""
    haiku = "anthropic/claude-haiku-4-5"
    _, chat_ = await setup(transport, chat={"max_retries": 0}, models={"fallbacks": {ANTHROPIC: [OPENAI, haiku]}})
    fake_anthropic.enqueue(fa.error_status(400, "messages.0: bad request"))
    outcome = await chat_("hi", None)
    assert outcome.error is not None and "bad request" in outcome.error
    assert len(fake_anthropic.requests) == 1 and fake_openai.requests == []
    (record,) = outcome.records
    assert record["model"] == ANTHROPIC and record["answered"] is False
    fake_anthropic.enqueue(fa.error_status(529))
    fake_openai.enqueue(fo.error_status(400, "bad request from the fallback"))
    outcome = await chat_("again", None)
    assert outcome.error is not None and "bad request from the fallback" in outcome.error
    assert len(fake_anthropic.requests) == 2 and len(fake_openai.requests) == 1  # haiku not tried
    assert [(r["model"], r["answered"]) for r in outcome.records] == [(ANTHROPIC, False), (OPENAI, False)]


async def test_no_fallback_after_the_first_token(
    setup: Any, fake_anthropic: fa.FakeAnthropic, fake_openai: fo.FakeOpenAI
) -> None:
    _, chat_ = await setup("ws", models={"fallbacks": {ANTHROPIC: [OPENAI]}})
    fake_anthropic.enqueue(fa.error_event("overloaded_error", "Overloaded", text="partial answer"))
    outcome = await chat_("hi", None)
    assert not fake_openai.requests
    assert_failed_and_billed(outcome, ANTHROPIC, "partial answer")


async def test_a_failing_fallback_is_billed_as_itself(
    setup: Any, fake_anthropic: fa.FakeAnthropic, fake_openai: fo.FakeOpenAI
) -> None:
    _, chat_ = await setup("ws", chat={"max_retries": 0}, models={"fallbacks": {ANTHROPIC: [OPENAI]}})
    fake_anthropic.enqueue(fa.error_status(529))
    fake_openai.enqueue(fo.text_response(PARTIAL, chunks=CHUNKS).cut_after(3))
    outcome = await chat_("hi", None)
    primary = outcome.records.pop(0)  # the primary's failed attempt, a call of its own
    assert (primary["model"], primary["answered"], primary["inputTokens"]) == (ANTHROPIC, False, 0)
    assert_failed_and_billed(outcome, OPENAI, "alpha beta ")


# --- the retry policy, and abort during a wait ------------------------------------------------------


def test_retry_delay() -> None:
    assert pipeline.retry_delay(ProviderError("RATE_LIMITED", "x", retryable=True, retry_after=2.5), 0) == 2.5
    # Longer than a watching client should wait: fail (or fall back) now.
    assert pipeline.retry_delay(ProviderError("RATE_LIMITED", "x", retryable=True, retry_after=3600), 0) is None
    delays = [pipeline.retry_delay(ProviderError("LLM_ERROR", "x", retryable=True), a) for a in range(12)]
    assert all(d is not None and 0 < d <= pipeline.MAX_RETRY_WAIT_SECONDS for d in delays)
    assert delays[0] < delays[3]  # exponential (jitter is within a factor of 3)


async def test_abort_during_a_retry_wait_stops_the_turn(
    setup: Any, fake_anthropic: fa.FakeAnthropic, token: str
) -> None:
    client, _ = await setup("ws", chat={"max_retries": 3})
    fake_anthropic.enqueue(fa.error_status(429, retry_after=20), fa.text_response("too late"))
    ws = await connect(client, token)
    await ws.send_json({"type": "chat.send", "id": "r1", "content": "hi"})
    frames = [await ws.receive_json(timeout=10) for _ in range(2)]  # session.created, chat.stream.start
    while not fake_anthropic.requests:
        await asyncio.sleep(0.01)
    await ws.send_json({"type": "chat.abort", "id": "a1", "requestId": "r1"})
    end = await ws.receive_json(timeout=10)  # long before the 20 s wait would have ended
    assert (end["type"], end["finishReason"]) == ("chat.stream.end", "aborted")
    assert len(fake_anthropic.requests) == 1
    gw = client.server.app[STATE.REGISTRY]
    stored = (await gw.sessions.get(frames[1]["sessionId"]))["messages"][-1]
    assert stored["aborted"] is True and stored["content"] == ""
    await ws.close()


async def test_upstream_error_quoting_the_key_is_redacted(setup: Any, fake_anthropic: fa.FakeAnthropic) -> None:
    _, chat_ = await setup("ws")
    fake_anthropic.enqueue(fa.error_event("invalid_request_error", f"bad key {TEST_KEY} for this org"))
    outcome = await chat_("hi", None)
    assert outcome.error is not None and TEST_KEY not in outcome.error
    assert TEST_KEY not in json.dumps(outcome.message)
