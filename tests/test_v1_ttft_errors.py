"""``ttftMs`` is the time to the first relayed output byte on every stream (also a pass-through stream whose
whole body arrives in one read) and null on whole answers; OpenAI-shaped errors carry type, code, message
and param as OpenAI sends them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import openai
import pytest
from aiohttp.test_utils import TestClient

from agentspace.transports import state
from tests.fakes import anthropic_upstream as fa
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.openai_upstream import FakeOpenAI, error_status, text_response

MESSAGES: list[Any] = [{"role": "user", "content": "Hello"}]


@pytest.fixture
async def client(
    make_client: Callable[..., Awaitable[TestClient]], fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> TestClient:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")
    return await make_client(providers={"openai": {"base_url": fake_openai.url}})


def url(client: TestClient) -> str:
    return f"http://127.0.0.1:{client.port}"


async def records(client: TestClient) -> list[dict[str, Any]]:
    return await client.app[state.REGISTRY].usage.records()


async def test_ttft_on_streams_only(
    client: TestClient, token: str, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    oa = openai.AsyncOpenAI(api_key=token, base_url=url(client) + "/v1", max_retries=0)
    an = anthropic.AsyncAnthropic(api_key=token, base_url=url(client), max_retries=0)
    fake_openai.enqueue(text_response("a"), text_response("b"), text_response("c"), text_response("d"))
    await oa.chat.completions.create(model="openai/gpt-4o-mini", messages=MESSAGES)
    async for _ in await oa.chat.completions.create(model="openai/gpt-4o-mini", messages=MESSAGES, stream=True):
        pass
    await oa.responses.create(model="openai/gpt-4o-mini", input="Hi")
    async for _ in await oa.responses.create(model="openai/gpt-4o-mini", input="Hi", stream=True):
        pass
    # The fake Anthropic upstream writes a whole stream in one write: the relay gets it in one read.
    fake_anthropic.enqueue(fa.text_response("e"), fa.text_response("f"))
    await an.messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=MESSAGES)
    async with an.messages.stream(model="claude-sonnet-4-6", max_tokens=10, messages=MESSAGES) as s:
        await s.get_final_message()
    got = [(r["endpoint"], r["ttftMs"] is not None) for r in await records(client)]
    assert got == [
        ("openai", False),
        ("openai", True),
        ("responses", False),
        ("responses", True),
        ("anthropic", False),
        ("anthropic", True),
    ]
    assert all(r["ttftMs"] is None or 0 <= r["ttftMs"] <= r["latencyMs"] for r in await records(client))


@pytest.mark.parametrize(
    ("status", "error_type", "code", "answered"),
    [
        # The provider refusing the gateway's key is the gateway's problem, not the caller's: 424, never 401.
        (401, "server_error", "no_api_key", 424),
        (404, "invalid_request_error", "model_not_found", 404),
        (429, "requests", "rate_limit_exceeded", 429),
        (500, "server_error", None, 500),
    ],
)
async def test_openai_error_shape(
    client: TestClient,
    token: str,
    fake_openai: FakeOpenAI,
    status: int,
    error_type: str,
    code: str | None,
    answered: int,
) -> None:
    oa = openai.AsyncOpenAI(api_key=token, base_url=url(client) + "/v1", max_retries=0)
    for call in (
        lambda: oa.chat.completions.create(model="openai/gpt-4o-mini", messages=MESSAGES),
        lambda: oa.responses.create(model="openai/gpt-4o-mini", input="Hi"),
    ):
        fake_openai.enqueue(error_status(status, "upstream says no"))
        with pytest.raises(openai.APIStatusError) as raised:
            await call()
        body = raised.value.body
        assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}
        assert (raised.value.status_code, body["type"], body["code"]) == (answered, error_type, code)


async def test_unknown_v1_routes_answer_in_the_apis_shape(client: TestClient, token: str) -> None:
    """What the SDKs reach that the gateway does not serve (stored responses, files, a wrong method) is a 404
    or 405 in the shape of the API the path speaks, so the SDK raises its usual error with its message."""
    oa = openai.AsyncOpenAI(api_key=token, base_url=url(client) + "/v1", max_retries=0)
    with pytest.raises(openai.NotFoundError) as raised:
        await oa.responses.retrieve("resp_1")
    body = raised.value.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}
    # The stored-response routes say why there is nothing there (tests/test_left_alone3_outside.py has the rest).
    assert body["type"] == "invalid_request_error" and "stores no responses" in body["message"], body
    resp = await client.get("/v1/chat/completions", headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 405 and (await resp.json())["error"]["type"] == "invalid_request_error"
    an = anthropic.AsyncAnthropic(api_key=token, base_url=url(client), max_retries=0)
    with pytest.raises(anthropic.NotFoundError) as not_found:
        await an.messages.batches.retrieve("msgbatch_1")
    assert not_found.value.body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": not_found.value.body["error"]["message"]},  # type: ignore[index]
    }
