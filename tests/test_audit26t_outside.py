"""Issue 26 (every client unchanged) tried from outside once more: the official openai and anthropic SDKs against
the gateway's /v1 routes, the fake upstreams behind (docs: README "Use it from your tools")."""

from __future__ import annotations

import anthropic
import openai
import pytest
from aiohttp.test_utils import TestClient

from tests.fakes import anthropic_upstream as fa
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.openai_upstream import FakeOpenAI
from tests.test_v1_structured import client, sdk  # noqa: F401


def claude_sdk(client: TestClient, token: str) -> anthropic.AsyncAnthropic:  # noqa: F811
    return anthropic.AsyncAnthropic(api_key=token, base_url=f"http://127.0.0.1:{client.port}", max_retries=0)


async def test_a_refusal_on_messages_names_the_field_as_the_client_sent_it(
    client: TestClient,  # noqa: F811
    token: str,
    fake_openai: FakeOpenAI,
) -> None:
    """``stop_sequences`` on ``openai/gpt-5`` (whose API takes no ``stop``) through /v1/messages: the 400 named
    ``stop``, a field the Anthropic SDK's user never sent, as /v1/responses names ``reasoning.effort``."""
    with pytest.raises(anthropic.BadRequestError) as refused:
        await claude_sdk(client, token).messages.create(
            model="openai/gpt-5", max_tokens=100, messages=[{"role": "user", "content": "Hi"}], stop_sequences=["END"]
        )
    message = refused.value.body["error"]["message"]  # type: ignore[index]
    assert message.startswith("stop_sequences: not supported by openai/gpt-5"), message
    assert fake_openai.requests == []


@pytest.mark.parametrize("streamed", [False, True])
async def test_the_message_an_output_limit_cut_is_incomplete(
    client: TestClient,  # noqa: F811
    token: str,
    fake_anthropic: FakeAnthropic,
    streamed: bool,
) -> None:
    """``max_output_tokens`` reached on /v1/responses: OpenAI marks the response and the message it cut
    ``incomplete``. The message said ``completed``, so a client reading the item saw a finished answer."""
    fake_anthropic.enqueue(fa.text_response("The start of", stop_reason="max_tokens"))
    api = sdk(client, token)
    if streamed:
        async with api.responses.stream(model="anthropic/claude-sonnet-4-6", input="Long?", max_output_tokens=16) as s:
            events = [e async for e in s]
        assert events[-1].type == "response.incomplete"
        (done,) = [e.item for e in events if e.type == "response.output_item.done"]
        response = events[-1].response  # type: ignore[union-attr]
        assert done.status == "incomplete"
    else:
        response = await api.responses.create(model="anthropic/claude-sonnet-4-6", input="Long?", max_output_tokens=16)
    assert (response.status, response.incomplete_details and response.incomplete_details.reason) == (
        "incomplete",
        "max_output_tokens",
    )
    assert [(item.type, item.status) for item in response.output] == [("message", "incomplete")]  # type: ignore[union-attr]
    assert response.output_text == "The start of"


async def test_dimensions_on_an_embedding_model_without_them_is_refused_by_name(
    client: TestClient,  # noqa: F811
    token: str,
    fake_openai: FakeOpenAI,
) -> None:
    """``dimensions`` on ``text-embedding-ada-002`` (which has one size): the 400 was litellm's own advice,
    naming the wrong models and a setting of litellm ("... for OpenAI `text-embedding-3` and later models. To drop
    it from the call, set `litellm.drop_params = True`"). It names the field, as OpenAI does."""
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk(client, token).embeddings.create(model="text-embedding-ada-002", input="hi", dimensions=4)
    error = refused.value.body
    assert isinstance(error, dict) and error["param"] == "dimensions", error
    assert error["message"].startswith("dimensions: not supported by openai/text-embedding-ada-002"), error
    assert "litellm" not in error["message"] and "text-embedding-3" not in error["message"]
    assert fake_openai.requests == []
