"""``/v1/chat/completions`` drops nothing silently: structured output (``response_format``), ``tool_choice`` and
``parallel_tool_calls`` reach the upstream of OpenAI and Anthropic models, and what cannot be served is
refused with a 400 naming the field. Driven by the official openai SDK (``.parse()``) and ``llm --schema``."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient
from pydantic import BaseModel, Field

from agentspace.transports import state
from tests.fakes import anthropic_upstream as fa
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.openai_upstream import FakeOpenAI, text_response, usage
from tests.test_v1_serve import README_URL, snippets

MESSAGES: list[Any] = [{"role": "user", "content": "Ada Lovelace, 36"}]
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "lookup", "description": "Look up", "parameters": {"type": "object"}}}
]


class Person(BaseModel):
    name: str
    age: int


@pytest.fixture
async def client(
    make_client: Callable[..., Awaitable[TestClient]], fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> TestClient:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")
    return await make_client(providers={"openai": {"base_url": fake_openai.url}})


def sdk(client: TestClient, token: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=token, base_url=f"http://127.0.0.1:{client.port}/v1", max_retries=0)


async def records(client: TestClient) -> list[dict[str, Any]]:
    return await client.app[state.REGISTRY].usage.records()


async def test_parse_on_an_openai_model(client: TestClient, token: str, fake_openai: FakeOpenAI) -> None:
    fake_openai.enqueue(text_response('{"name": "Ada", "age": 36}', usage=usage(30, 9)))
    completion = await sdk(client, token).chat.completions.parse(
        model="openai/gpt-4o-mini", messages=MESSAGES, response_format=Person
    )
    assert completion.choices[0].message.parsed == Person(name="Ada", age=36)
    sent = fake_openai.requests[0].body["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["strict"] is True
    assert sent["json_schema"]["schema"]["properties"]["age"] == {"title": "Age", "type": "integer"}
    (record,) = await records(client)
    assert (record["inputTokens"], record["outputTokens"]) == (30, 9)


async def test_parse_on_a_claude_model(client: TestClient, token: str, fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.enqueue(fa.text_response('{"name": "Ada", "age": 36}'))
    completion = await sdk(client, token).chat.completions.parse(
        model="anthropic/claude-sonnet-4-6", messages=MESSAGES, response_format=Person
    )
    assert completion.choices[0].message.parsed == Person(name="Ada", age=36)
    output_format = fake_anthropic.requests[0].body["output_config"]["format"]
    assert output_format["type"] == "json_schema" and output_format["schema"]["required"] == ["name", "age"]


class Order(BaseModel):
    item: str = Field(min_length=1)
    quantity: int = Field(ge=1, le=99)
    tags: list[str] = Field(max_length=3)


# What llm --schema and hand-written requests send: a plain JSON schema, objects left open.
PLAIN_SCHEMA = {
    "name": "person",
    "schema": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "pets": {"type": "array", "items": {"type": "object"}}},
        "required": ["name"],
    },
}


async def test_a_schema_claude_takes_in_its_own_form(
    client: TestClient, token: str, fake_anthropic: FakeAnthropic
) -> None:
    """Claude's structured outputs take a narrower JSON schema than OpenAI's: every object closed
    (``additionalProperties: false``), no numeric or length bounds. A pydantic model with bounds, or a plain
    schema, is sent in that form (as the anthropic SDK's ``transform_schema`` makes it: the bounds move into the
    description), not refused upstream."""
    fake_anthropic.enqueue(fa.text_response('{"item": "tea", "quantity": 2, "tags": []}'))
    completion = await sdk(client, token).chat.completions.parse(
        model="anthropic/claude-sonnet-4-6", messages=MESSAGES, response_format=Order
    )
    assert completion.choices[0].message.parsed == Order(item="tea", quantity=2, tags=[])
    schema = fake_anthropic.requests[-1].body["output_config"]["format"]["schema"]
    assert schema["additionalProperties"] is False and "minimum" not in schema["properties"]["quantity"]
    assert "maximum: 99" in schema["properties"]["quantity"]["description"]

    fake_anthropic.enqueue(fa.text_response('{"name": "Ada", "pets": []}'))
    plain = await sdk(client, token).chat.completions.create(
        model="anthropic/claude-sonnet-4-6",
        messages=MESSAGES,
        response_format={"type": "json_schema", "json_schema": PLAIN_SCHEMA},
    )
    assert json.loads(plain.choices[0].message.content or "") == {"name": "Ada", "pets": []}
    schema = fake_anthropic.requests[-1].body["output_config"]["format"]["schema"]
    assert (
        schema["additionalProperties"] is False
        and schema["properties"]["pets"]["items"]["additionalProperties"] is False
    )
    assert [r["error"] for r in await records(client)] == [None, None]


@pytest.mark.parametrize("schema", [None, {"type": "object"}, {"type": "object", "additionalProperties": True}])
async def test_a_schema_of_any_object_on_claude_is_json_mode(
    client: TestClient, token: str, fake_anthropic: FakeAnthropic, schema: Any
) -> None:
    """A json_schema of any object (no schema, or an object without properties) is JSON mode: Claude's
    structured outputs can only close such an object (``additionalProperties: false``), which would force the
    answer ``{}``. It goes as json_object does, an instruction."""
    fake_anthropic.enqueue(fa.text_response('{"name": "Ada", "age": 36}'))
    spec: dict[str, Any] = {"name": "anything"} | ({} if schema is None else {"schema": schema})
    completion = await sdk(client, token).chat.completions.create(
        model="anthropic/claude-sonnet-4-6",
        messages=MESSAGES,
        response_format={"type": "json_schema", "json_schema": spec},  # type: ignore[typeddict-item]
    )
    assert json.loads(completion.choices[0].message.content or "") == {"name": "Ada", "age": 36}
    sent = fake_anthropic.requests[-1].body
    assert "format" not in (sent.get("output_config") or {}) and "one JSON object" in sent["system"]


@pytest.mark.parametrize("model", ["openai/gpt-4o-mini", "anthropic/claude-sonnet-4-6"])
async def test_json_object(
    client: TestClient, token: str, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, model: str
) -> None:
    fake_openai.enqueue(text_response('{"ok": true}'))
    fake_anthropic.enqueue(fa.text_response('{"ok": true}'))
    completion = await sdk(client, token).chat.completions.create(
        model=model, messages=MESSAGES, response_format={"type": "json_object"}
    )
    assert json.loads(completion.choices[0].message.content or "") == {"ok": True}
    if model.startswith("openai/"):
        assert fake_openai.requests[0].body["response_format"] == {"type": "json_object"}
    else:
        assert "one JSON object" in fake_anthropic.requests[0].body["system"]


@pytest.mark.parametrize(
    ("choice", "anthropic_choice"),
    [
        ("auto", {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", {"type": "any", "disable_parallel_tool_use": True}),
        ("none", {"type": "none"}),
        (
            {"type": "function", "function": {"name": "lookup"}},
            {"type": "tool", "name": "lookup", "disable_parallel_tool_use": True},
        ),
    ],
)
async def test_tool_choice_and_parallel_tool_calls_reach_the_upstream(
    client: TestClient,
    token: str,
    fake_openai: FakeOpenAI,
    fake_anthropic: FakeAnthropic,
    choice: Any,
    anthropic_choice: dict[str, Any],
) -> None:
    api = sdk(client, token)
    for model in ("openai/gpt-4o-mini", "anthropic/claude-sonnet-4-6"):
        await api.chat.completions.create(
            model=model, messages=MESSAGES, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False
        )
    sent = fake_openai.requests[0].body
    assert sent["tool_choice"] == choice and sent["parallel_tool_calls"] is False
    assert fake_anthropic.requests[0].body["tool_choice"] == anthropic_choice


async def test_tool_choice_none_without_tools_is_no_refusal(
    client: TestClient, token: str, fake_openai: FakeOpenAI
) -> None:
    await sdk(client, token).chat.completions.create(model="openai/gpt-4o-mini", messages=MESSAGES, tool_choice="none")
    assert "tool_choice" not in fake_openai.requests[0].body


async def test_passed_on_fields(client: TestClient, token: str, fake_openai: FakeOpenAI) -> None:
    await sdk(client, token).chat.completions.create(
        model="openai/gpt-4o-mini",
        messages=MESSAGES,
        seed=7,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        prompt_cache_key="thread-1",
        user="ada",
        metadata={"kept": "by the gateway"},
    )
    sent = fake_openai.requests[0].body
    assert (sent["seed"], sent["presence_penalty"], sent["frequency_penalty"]) == (7, 0.5, 0.25)
    assert (sent["prompt_cache_key"], sent["user"]) == ("thread-1", "ada") and "metadata" not in sent


@pytest.mark.parametrize(
    ("model", "fields", "param"),
    [
        ("openai/gpt-4o-mini", {"n": 2}, "n"),
        ("openai/gpt-4o-mini", {"logprobs": True}, "logprobs"),
        ("openai/gpt-4o-mini", {"top_logprobs": 3}, "top_logprobs"),
        ("openai/gpt-4o-mini", {"modalities": ["text", "audio"]}, "modalities"),
        ("openai/gpt-4o-mini", {"functions": [{"name": "f"}]}, "functions"),
        ("openai/gpt-4o-mini", {"frobnicate": 1}, "frobnicate"),
        ("openai/gpt-4o-mini", {"response_format": {"type": "yaml"}}, "response_format.type"),
        ("openai/gpt-4o-mini", {"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        # A tool choice without tools: OpenAI's 400 (it was dropped, and the model answered in text)
        ("openai/gpt-4o-mini", {"tool_choice": "required"}, "tool_choice"),
        ("anthropic/claude-sonnet-4-6", {"tool_choice": "required"}, "tool_choice"),
        ("openai/gpt-4o-mini", {"tool_choice": "auto"}, "tool_choice"),
        ("openai/gpt-4o-mini", {"tool_choice": {"type": "function", "function": {"name": "lookup"}}}, "tool_choice"),
    ],
)
async def test_refused_with_the_field_named(
    client: TestClient, token: str, fake_openai: FakeOpenAI, model: str, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        await sdk(client, token).chat.completions.create(model=model, messages=MESSAGES, extra_body=fields)
    assert raised.value.param == param and param.split(".")[0] in raised.value.message
    assert raised.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    assert fake_openai.requests == [] and await records(client) == []


async def test_a_parameter_the_provider_has_not_is_refused(
    client: TestClient, token: str, fake_anthropic: FakeAnthropic
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        await sdk(client, token).chat.completions.create(model="anthropic/claude-sonnet-4-6", messages=MESSAGES, seed=7)
    assert "seed" in raised.value.message and raised.value.param == "seed"
    assert fake_anthropic.requests == []
    (record,) = await records(client)
    assert record["answered"] is False and record["totalTokens"] == 0


async def test_neutral_values_of_passed_on_fields_are_no_refusal(
    client: TestClient, token: str, fake_anthropic: FakeAnthropic
) -> None:
    """The OpenAI playground's code (and clients built from it) send the defaults frequency_penalty=0,
    presence_penalty=0 and an empty logit_bias: they ask for nothing, so a Claude model answers; a value
    that asks for something is still refused by name."""
    fake_anthropic.enqueue(fa.text_response("Hi"))
    reply = await sdk(client, token).chat.completions.create(
        model="anthropic/claude-sonnet-4-6",
        messages=MESSAGES,
        frequency_penalty=0,
        presence_penalty=0,
        logit_bias={},
    )
    assert reply.choices[0].message.content == "Hi"
    sent = fake_anthropic.requests[0].body
    assert not {"frequency_penalty", "presence_penalty", "logit_bias"} & set(sent)
    with pytest.raises(openai.BadRequestError) as raised:
        await sdk(client, token).chat.completions.create(
            model="anthropic/claude-sonnet-4-6", messages=MESSAGES, presence_penalty=0.5
        )
    assert raised.value.param == "presence_penalty" and len(fake_anthropic.requests) == 1


async def test_llm_schema(client: TestClient, token: str, fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    """``llm --schema`` with the gateway as an OpenAI-compatible model (the README's extra-openai-models.yaml)."""
    home = tmp_path / "llm"
    home.mkdir()
    lang, models = snippets()["llm-models"]  # the README's extra-openai-models.yaml
    assert lang == "yaml"
    models = models.replace(README_URL, f"http://127.0.0.1:{client.port}")
    (home / "extra-openai-models.yaml").write_text(models, encoding="utf-8")
    (home / "keys.json").write_text(json.dumps({"agentspace": token}), encoding="utf-8")
    fake_openai.enqueue(text_response('{"name": "Ada", "age": 36}', usage=usage(44, 11)))
    llm = Path(sys.executable).parent / "llm"
    process = await asyncio.create_subprocess_exec(
        llm, "-m", "agentspace-gpt", "--schema", "name, age int", "--no-log", "Ada Lovelace, 36",
        env={**os.environ, "LLM_USER_PATH": str(home)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()
    assert json.loads(out) == {"name": "Ada", "age": 36}
    schema = fake_openai.requests[0].body["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["age"] == {"type": "integer"} and schema["required"] == ["name", "age"]
    (record,) = await records(client)
    assert (record["endpoint"], record["inputTokens"], record["outputTokens"]) == ("openai", 44, 11)


async def test_reasoning_effort_and_sampling_values_are_passed_on_or_refused(
    client: TestClient, token: str, fake_openai: FakeOpenAI
) -> None:
    """A value the model would not take is refused with a 400 naming the field, never dropped on the way."""
    api = sdk(client, token)
    await api.chat.completions.create(model="openai/gpt-5", messages=MESSAGES, reasoning_effort="minimal")
    assert fake_openai.requests[0].body["reasoning_effort"] == "minimal"
    refused = [
        ("openai/gpt-5", {"temperature": 0.2}, "temperature"),  # reasoning models take only temperature 1
        ("openai/gpt-5", {"top_p": 0.5}, "top_p"),
        ("openai/o3-mini", {"stop": ["END"]}, None),  # o3-mini takes stop: passed on
        ("openai/gpt-4o-mini", {"reasoning_effort": "high"}, "reasoning_effort"),  # no reasoning
    ]
    for model, fields, param in refused:
        fake_openai.requests.clear()
        if param is None:
            await api.chat.completions.create(model=model, messages=MESSAGES, extra_body=fields)
            assert fake_openai.requests[0].body["stop"] == ["END"]
            continue
        with pytest.raises(openai.BadRequestError) as raised:
            await api.chat.completions.create(model=model, messages=MESSAGES, extra_body=fields)
        assert raised.value.param == param and raised.value.body["message"].startswith(param)  # type: ignore[index]
        assert fake_openai.requests == []
    await api.chat.completions.create(model="openai/gpt-5", messages=MESSAGES, temperature=1)  # its default


@pytest.mark.parametrize(
    ("model", "effort", "sent"),
    [
        ("anthropic/claude-sonnet-4-6", "low", {"thinking": {"type": "adaptive"}, "output_config": {"effort": "low"}}),
        (
            "anthropic/claude-sonnet-4-6",
            "minimal",
            {"thinking": {"type": "adaptive"}, "output_config": {"effort": "low"}},
        ),
        ("anthropic/claude-sonnet-4-6", "xhigh", {"thinking": {"type": "adaptive"}}),  # a level it has not
        ("anthropic/claude-sonnet-4-5", "low", {"thinking": {"type": "enabled", "budget_tokens": 2048}}),
    ],
)
async def test_reasoning_effort_on_claude_models(
    client: TestClient, token: str, fake_anthropic: FakeAnthropic, model: str, effort: str, sent: dict[str, Any]
) -> None:
    """reasoning_effort is adaptive thinking's effort level where the model takes it, else a thinking budget."""
    fake_anthropic.enqueue(fa.text_response("ok"))
    await sdk(client, token).chat.completions.create(model=model, messages=MESSAGES, reasoning_effort=effort)  # type: ignore[arg-type]
    body = fake_anthropic.requests[-1].body
    assert {name: body[name] for name in ("thinking", "output_config") if name in body} == sent


async def test_a_tool_loop_on_a_claude_model_with_reasoning_effort(
    client: TestClient, token: str, fake_anthropic: FakeAnthropic
) -> None:
    """An agent loop of the openai SDK on a Claude model with reasoning_effort: Chat Completions cannot send
    Claude's signed thinking back, and the Messages API refuses thinking after a tool call without it. The step
    after the tool result is answered without thinking; the turn before it thought."""
    tools: Any = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    fake_anthropic.enqueue(
        fa.message_response(
            fa.thinking_block("A tool."), fa.tool_use_block("get_weather", {}, id="toolu_1"), stop_reason="tool_use"
        ),
        fa.text_response("18 C"),
    )
    api = sdk(client, token)
    kwargs: Any = dict(model="anthropic/claude-sonnet-4-5", tools=tools, reasoning_effort="low")
    first = await api.chat.completions.create(messages=MESSAGES, **kwargs)
    call = first.choices[0].message
    assert call.tool_calls is not None and fake_anthropic.requests[0].body["thinking"]["type"] == "enabled"
    history: Any = [
        *MESSAGES,
        call.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.tool_calls[0].id, "content": "18 C"},
    ]
    second = await api.chat.completions.create(messages=history, **kwargs)
    assert second.choices[0].message.content == "18 C"
    assert "thinking" not in fake_anthropic.requests[1].body
    assert [r["error"] for r in await records(client)] == [None, None]
