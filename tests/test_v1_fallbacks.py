"""``[models] fallbacks`` of a plain model on the ``/v1`` endpoints (docs/routing.md), through the real
interface: the official openai and anthropic SDKs against the running app, a fake Anthropic and a fake OpenAI
upstream on 127.0.0.1. A model that fails before anything reached the client goes on to its fallbacks, as a
model group does; each attempt is a provider call with its own record."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anthropic
import openai
import pytest
from aiohttp.test_utils import TestClient
from click.testing import CliRunner

from agentspace.cli import main
from agentspace.transports import state
from tests.fakes import anthropic_upstream as fa
from tests.fakes import openai_upstream as fo
from tests.scale_servers import free_port
from tests.support.openai_sdk import text_until_error

HAIKU = "anthropic/claude-haiku-4-5"
MINI = "openai/gpt-4o-mini"
HI: Any = [{"role": "user", "content": "Hi"}]
ANSWER = "from the fallback"
REPORTED = fo.usage(11, 4)  # what the fake OpenAI reports for the fallback's answer


@dataclass
class Setup:
    """The two fake upstreams and the gateway token; ``gateway`` starts the app with ``[models] fallbacks``."""

    anthropic: fa.FakeAnthropic
    openai: fo.FakeOpenAI
    token: str
    make_client: Callable[..., Awaitable[TestClient]]

    async def gateway(self, fallbacks: dict[str, list[str]], anthropic_url: str | None = None) -> TestClient:
        """The app with ``fallbacks``, the OpenAI provider at its fake (Anthropic at ``anthropic_url`` if given)."""
        providers: dict[str, Any] = {"openai": {"base_url": self.openai.url}}
        if anthropic_url is not None:
            providers["anthropic"] = {"base_url": anthropic_url}
        return await self.make_client(models={"fallbacks": fallbacks}, providers=providers)


@pytest.fixture
def setup(
    make_client: Callable[..., Awaitable[TestClient]],
    fake_anthropic: fa.FakeAnthropic,
    fake_openai: fo.FakeOpenAI,
    token: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Setup:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")  # the OpenAI provider's key
    return Setup(fake_anthropic, fake_openai, token, make_client)


@asynccontextmanager
async def sdks(client: TestClient, token: str) -> AsyncIterator[tuple[openai.AsyncOpenAI, anthropic.AsyncAnthropic]]:
    """The official openai and anthropic SDKs on the app (no retries of their own), closed afterwards."""
    api = openai.AsyncOpenAI(api_key=token, base_url=f"http://127.0.0.1:{client.port}/v1", max_retries=0)
    ant = anthropic.AsyncAnthropic(api_key=token, base_url=f"http://127.0.0.1:{client.port}", max_retries=0)
    try:
        yield api, ant
    finally:
        await api.close()
        await ant.close()


async def records(client: TestClient) -> list[dict[str, Any]]:
    return await client.server.app[state.REGISTRY].usage.records()


def attempts(recs: list[dict[str, Any]]) -> list[tuple[str, bool, str | None]]:
    return sorted((r["model"], r["answered"], r["error"]) for r in recs)


async def ask_everywhere(client: TestClient, token: str, model: str) -> list[str]:
    """The same question on every /v1 endpoint that translates or passes through, streamed and not: what
    each answered."""
    got = []
    async with sdks(client, token) as (api, ant):
        reply = await api.chat.completions.create(model=model, messages=HI)
        got.append(reply.choices[0].message.content or "")
        stream = await api.chat.completions.create(model=model, messages=HI, stream=True)
        got.append("".join([c.choices[0].delta.content or "" async for c in stream if c.choices]))
        response = await api.responses.create(model=model, input="Hi")
        got.append(response.output_text)
        events = await api.responses.create(model=model, input="Hi", stream=True)
        got.append("".join([e.delta async for e in events if e.type == "response.output_text.delta"]))
        message = await ant.messages.create(model=model, max_tokens=100, messages=HI)
        got.append("".join(b.text for b in message.content if b.type == "text"))
        async with ant.messages.stream(model=model, max_tokens=100, messages=HI) as s:
            got.append("".join([t async for t in s.text_stream]))
    return got


@pytest.mark.parametrize("status", [529, 500, 429])
async def test_an_anthropic_model_failing_falls_back_on_every_endpoint(setup: Setup, status: int) -> None:
    """Claude answers 529, 500 or 429 before anything was sent: the client gets one clean answer from the
    fallback on Chat Completions, Responses and Messages (passed through, Claude's being Anthropic's),
    streamed and not; one record per attempt, the failed one an error with nothing billed, the fallback's
    with the usage its upstream reported."""
    setup.anthropic.default = fa.error_status(status)
    setup.openai.default = fo.text_response(ANSWER, usage=REPORTED)
    client = await setup.gateway({HAIKU: [MINI]})
    assert await ask_everywhere(client, setup.token, HAIKU) == [ANSWER] * 6
    assert len(setup.anthropic.requests) == len(setup.openai.requests) == 6
    recs = await records(client)
    code = "RATE_LIMITED" if status == 429 else "LLM_ERROR"
    assert attempts(recs) == [(HAIKU, False, code)] * 6 + [(MINI, True, None)] * 6
    for r in recs:
        if r["answered"]:
            assert (r["inputTokens"], r["outputTokens"], r["estimated"]) == (11, 4, False)
            assert r["totalCost"] > 0
        else:
            assert (r["inputTokens"], r["outputTokens"], r["totalCost"]) == (0, 0, 0)
    assert len(client.server.app[state.REGISTRY].ledger) == 0  # every attempt settled


async def test_a_refused_connection_falls_back(setup: Setup) -> None:
    """Nothing listens where Claude is served: each call goes on to the fallback, the attempt recorded."""
    setup.openai.default = fo.text_response(ANSWER, usage=REPORTED)
    client = await setup.gateway({HAIKU: [MINI]}, anthropic_url=f"http://127.0.0.1:{free_port()}")
    assert await ask_everywhere(client, setup.token, HAIKU) == [ANSWER] * 6
    assert len(setup.openai.requests) == 6
    assert attempts(await records(client)) == [(HAIKU, False, "LLM_ERROR")] * 6 + [(MINI, True, None)] * 6


async def test_another_providers_model_falls_back_to_claude(setup: Setup) -> None:
    """The other way round, translated on every endpoint: OpenAI's model overloaded, Claude answers."""
    setup.openai.default = fo.error_status(503)
    setup.anthropic.default = fa.text_response(ANSWER, usage={"input_tokens": 30}, delta_usages=[{"output_tokens": 7}])
    client = await setup.gateway({MINI: [HAIKU]})
    assert await ask_everywhere(client, setup.token, MINI) == [ANSWER] * 6
    assert len(setup.anthropic.requests) == 6
    recs = await records(client)
    assert attempts(recs) == [(HAIKU, True, None)] * 6 + [(MINI, False, "LLM_ERROR")] * 6
    assert {(r["inputTokens"], r["outputTokens"]) for r in recs if r["answered"]} == {(30, 7)}


async def test_a_stream_cut_before_its_first_token_moves(setup: Setup) -> None:
    """Translated: Claude answered (message_start, its input reported) and broke before its first token; nothing
    was written to the client yet, so the call moves. The failed attempt keeps the usage it reported."""
    setup.anthropic.default = fa.text_response("lost").cut_after(1)
    setup.openai.default = fo.text_response(ANSWER, usage=REPORTED)
    client = await setup.gateway({HAIKU: [MINI]})
    async with sdks(client, setup.token) as (api, _):
        stream = await api.chat.completions.create(model=HAIKU, messages=HI, stream=True)
        assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == ANSWER
    recs = await records(client)
    assert attempts(recs) == [(HAIKU, True, "LLM_ERROR"), (MINI, True, None)]
    assert next(r for r in recs if r["model"] == HAIKU)["inputTokens"] == 25  # as message_start reported it


async def test_a_failure_after_the_first_byte_is_not_moved(setup: Setup) -> None:
    """Claude's stream breaks after its first tokens reached the client: the client sees them and an error,
    the fallback is never asked (translated and passed through alike), one record per call."""
    chunks = ["alpha ", "beta ", "gamma ", "delta "]
    setup.anthropic.default = fa.text_response("".join(chunks), chunks=chunks).cut_after(5)
    client = await setup.gateway({HAIKU: [MINI]})
    async with sdks(client, setup.token) as (api, ant):
        stream = await api.chat.completions.create(model=HAIKU, messages=HI, stream=True)
        assert await text_until_error(stream) == "alpha beta "
        passed: list[str] = []
        with pytest.raises((anthropic.APIError, anthropic.APIConnectionError)):
            async with ant.messages.stream(model=HAIKU, max_tokens=100, messages=HI) as s:
                async for text in s.text_stream:
                    passed.append(text)
        assert "".join(passed) == "alpha beta "
    assert not setup.openai.requests
    recs = await records(client)
    assert [(r["model"], r["answered"], r["error"] is not None) for r in recs] == [(HAIKU, True, True)] * 2


async def test_a_bad_request_is_not_tried_elsewhere(setup: Setup) -> None:
    """A 400 is the request's own fault: it would fail on any model, so it is answered as it is."""
    setup.anthropic.default = fa.error_status(400, "messages: bad")
    client = await setup.gateway({HAIKU: [MINI]})
    async with sdks(client, setup.token) as (api, ant):
        with pytest.raises(openai.BadRequestError):
            await api.chat.completions.create(model=HAIKU, messages=HI)
        with pytest.raises(anthropic.BadRequestError):
            await ant.messages.create(model=HAIKU, max_tokens=100, messages=HI)
    assert len(setup.anthropic.requests) == 2 and not setup.openai.requests
    recs = await records(client)  # one code for an upstream's refusal on every way in
    assert sorted((r["model"], r["answered"], r["error"]) for r in recs) == [(HAIKU, False, "LLM_ERROR")] * 2


async def test_a_fallback_the_client_may_not_use_or_without_a_key_is_skipped(setup: Setup) -> None:
    """Each fallback is checked on its own: alice may use Claude and gpt-4o but not gpt-4o-mini, which is
    never called for her; gemini has no key here, so it fails at once (nothing sent) and the next one
    answers."""
    allowed = f"{HAIKU},gemini/gemini-2.5-flash,openai/gpt-4o"
    out = CliRunner().invoke(main, ["clients", "add", "alice", "--models", allowed])  # the test's data directory
    key = out.stdout.strip()
    setup.anthropic.default = fa.error_status(529)
    setup.openai.default = fo.text_response(ANSWER, usage=REPORTED)
    client = await setup.gateway({HAIKU: [MINI, "gemini/gemini-2.5-flash", "openai/gpt-4o"]})
    async with sdks(client, key) as (api, ant):
        reply = await api.chat.completions.create(model=HAIKU, messages=HI)
        assert reply.choices[0].message.content == ANSWER
        message = await ant.messages.create(model=HAIKU, max_tokens=100, messages=HI)
        assert message.content[0].type == "text" and message.content[0].text == ANSWER
    assert [r.body["model"] for r in setup.openai.requests] == ["gpt-4o", "gpt-4o"]
    recs = await records(client)
    assert attempts(recs) == [(HAIKU, False, "LLM_ERROR")] * 2 + [
        ("gemini/gemini-2.5-flash", False, "NO_API_KEY"),
        ("gemini/gemini-2.5-flash", False, "NO_API_KEY"),
        ("openai/gpt-4o", True, None),
        ("openai/gpt-4o", True, None),
    ]
    assert {r["client"] for r in recs} == {"alice"}


async def test_a_fallback_is_not_tried_without_fallbacks_nor_for_embeddings(setup: Setup) -> None:
    """A model with no fallbacks answers its own failure; an embedding model's fallbacks are not tried on
    /v1/embeddings (another model's vectors would not compare), as a group's are not."""
    setup.anthropic.default = fa.error_status(529)
    setup.openai.enqueue(fo.error_status(503))
    client = await setup.gateway({"openai/text-embedding-3-small": ["openai/text-embedding-3-large"]})
    async with sdks(client, setup.token) as (api, _):
        with pytest.raises(openai.InternalServerError):
            await api.chat.completions.create(model=HAIKU, messages=HI)
        with pytest.raises(openai.APIStatusError):
            await api.embeddings.create(model="openai/text-embedding-3-small", input="Hi")
    assert [r.body["model"] for r in setup.openai.requests] == ["text-embedding-3-small"]
    assert attempts(await records(client)) == [
        (HAIKU, False, "LLM_ERROR"),
        ("openai/text-embedding-3-small", False, "LLM_ERROR"),
    ]
