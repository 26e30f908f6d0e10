"""Images and PDFs on the translated ``/v1`` paths (base64 and URL), through the official SDKs: each arrives
at the upstream in its API's own shape (Chat Completions content parts through litellm, Messages API blocks)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import openai
import pytest
from aiohttp.test_utils import TestClient

from tests.fakes import anthropic_upstream as fa
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.openai_upstream import FakeOpenAI, text_response

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
PDF = "JVBERi0xLjQKJcfsj6IKMSAwIG9iago8PC9UeXBlL0NhdGFsb2c+PgplbmRvYmoKdHJhaWxlcgo8PC9Sb290IDEgMCBSPj4KJSVFT0YK"


@pytest.fixture
async def client(
    make_client: Callable[..., Awaitable[TestClient]], fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> TestClient:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")
    return await make_client(providers={"openai": {"base_url": fake_openai.url}})


def base_url(client: TestClient) -> str:
    return f"http://127.0.0.1:{client.port}"


async def test_chat_completions_image_and_pdf_to_an_openai_model(
    client: TestClient, token: str, fake_openai: FakeOpenAI
) -> None:
    fake_openai.enqueue(text_response("A pixel and a PDF"))
    api = openai.AsyncOpenAI(api_key=token, base_url=base_url(client) + "/v1", max_retries=0)
    content: list[Any] = [
        {"type": "text", "text": "What are these?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
        {"type": "file", "file": {"file_data": f"data:application/pdf;base64,{PDF}", "filename": "a.pdf"}},
    ]
    reply = await api.chat.completions.create(
        model="openai/gpt-4o-mini", messages=[{"role": "user", "content": content}]
    )
    assert reply.choices[0].message.content == "A pixel and a PDF"
    (user,) = [m for m in fake_openai.requests[0].body["messages"] if m["role"] == "user"]
    kinds = [p["type"] for p in user["content"]]
    assert kinds == ["text", "image_url", "image_url", "file"]
    assert user["content"][1]["image_url"]["url"] == f"data:image/png;base64,{PNG}"
    assert user["content"][2]["image_url"]["url"] == "https://example.com/cat.jpg"
    assert user["content"][3]["file"]["file_data"] == f"data:application/pdf;base64,{PDF}"


async def test_chat_completions_image_and_pdf_to_a_claude_model(
    client: TestClient, token: str, fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.enqueue(fa.text_response("Seen"))
    api = openai.AsyncOpenAI(api_key=token, base_url=base_url(client) + "/v1", max_retries=0)
    content: list[Any] = [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
        {"type": "file", "file": {"file_data": f"data:application/pdf;base64,{PDF}"}},
        {"type": "text", "text": "Describe"},
    ]
    await api.chat.completions.create(
        model="anthropic/claude-sonnet-4-6", messages=[{"role": "user", "content": content}]
    )
    (message,) = fake_anthropic.requests[0].body["messages"]
    assert message["content"][:2] == [
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": PDF}},
    ]


async def test_messages_image_and_pdf_to_an_openai_model(
    client: TestClient, token: str, fake_openai: FakeOpenAI
) -> None:
    fake_openai.enqueue(text_response("Both seen"))
    unknown_beta = {"anthropic-beta": "mid-conversation-system-2026-04-07,no-such-beta-2099-01-01"}  # ignored here
    api = anthropic.AsyncAnthropic(
        api_key=token, base_url=base_url(client), max_retries=0, default_headers=unknown_beta
    )
    content: list[Any] = [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": PDF}},
        {"type": "text", "text": "What are these?", "cache_control": {"type": "ephemeral"}},
    ]
    messages: list[Any] = [
        {"role": "user", "content": content},
        {"role": "system", "content": "Answer in two words."},  # Claude Code's mid-conversation system message
    ]
    reply = await api.messages.create(
        model="openai/gpt-4o-mini", max_tokens=100, system="You are terse.", messages=messages
    )
    assert reply.content[0].text == "Both seen"  # type: ignore[union-attr]
    sent = fake_openai.requests[0].body["messages"]
    assert sent[0] == {"role": "system", "content": "You are terse.\n\nAnswer in two words."}
    (user,) = [m for m in sent if m["role"] == "user"]
    assert [p["type"] for p in user["content"]] == ["image_url", "image_url", "file", "text"]
    assert user["content"][0]["image_url"]["url"] == f"data:image/png;base64,{PNG}"
    assert user["content"][2]["file"]["file_data"] == f"data:application/pdf;base64,{PDF}"


async def test_responses_input_image_and_file(client: TestClient, token: str, fake_openai: FakeOpenAI) -> None:
    fake_openai.enqueue(text_response("Seen"))
    api = openai.AsyncOpenAI(api_key=token, base_url=base_url(client) + "/v1", max_retries=0)
    content: list[Any] = [
        {"type": "input_text", "text": "What are these?"},
        {"type": "input_image", "image_url": "https://example.com/cat.jpg", "detail": "auto"},
        {"type": "input_file", "filename": "a.pdf", "file_data": f"data:application/pdf;base64,{PDF}"},
    ]
    response = await api.responses.create(model="openai/gpt-4o-mini", input=[{"role": "user", "content": content}])
    assert response.output_text == "Seen"
    (user,) = [m for m in fake_openai.requests[0].body["messages"] if m["role"] == "user"]
    assert [p["type"] for p in user["content"]] == ["text", "image_url", "file"]
    assert user["content"][2]["file"] == {"file_data": f"data:application/pdf;base64,{PDF}", "filename": "a.pdf"}


async def test_messages_tool_result_with_a_screenshot_and_tool_choice(
    client: TestClient, token: str, fake_openai: FakeOpenAI
) -> None:
    """What Claude Code sends after a tool that returned an image, on an OpenAI model."""
    fake_openai.enqueue(text_response("A login page"))
    api = anthropic.AsyncAnthropic(api_key=token, base_url=base_url(client), max_retries=0)
    messages: list[Any] = [
        {"role": "user", "content": "Take a screenshot"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "shot", "input": {}}]},
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "content": [
                        {"type": "text", "text": "saved"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
                    ],
                }
            ],
        },
    ]
    tools: list[Any] = [{"name": "shot", "description": "Screenshot", "input_schema": {"type": "object"}}]
    await api.messages.create(
        model="openai/gpt-4o-mini",
        max_tokens=100,
        messages=messages,
        tools=tools,
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
    )
    sent = fake_openai.requests[0].body
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "tool", "user"]
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": "toolu_1", "content": "saved"}
    assert sent["messages"][3]["content"] == [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}
    ]
    assert sent["tool_choice"] == "required" and sent["parallel_tool_calls"] is False
