"""Keys, models, thinking forms and the CLI's --config (issue 14, items 2, 5, 6 and 7), through the real
interfaces: the WebSocket and /api/chat against the running app and the fake upstreams, the CLI through
click's CliRunner."""

from __future__ import annotations

import importlib
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from agentspace.transports import state
from tests.fakes.anthropic_upstream import error_status
from tests.test_http_chat import post_chat
from tests.test_ws import chat, connect

# --- issue 14 item 2: a missing key is NO_API_KEY at once, for every provider -----------------------

MISSING = {
    "anthropic/claude-sonnet-4-6": "Anthropic API key not configured. Run: agentspace keys add anthropic",
    "openai/gpt-4o-mini": "OpenAI API key not configured. Run: agentspace keys add openai",
}


async def _keyless_client(make_client: Any, monkeypatch: pytest.MonkeyPatch, fake_openai: Any) -> TestClient:
    importlib.import_module("litellm")  # its import (seconds, once per process) is not what the timing measures
    client = await make_client(providers={"openai": {"base_url": fake_openai.url}})
    monkeypatch.delenv("ANTHROPIC_API_KEY")  # make_client sets it; the vault is empty
    return client


async def _records(client: TestClient) -> list[dict[str, Any]]:
    gw = client.server.app[state.GATEWAY]
    await gw.usage.flush()
    return list(await gw.usage.arecords())


def _assert_one_refusal(records: list[dict[str, Any]], model: str) -> None:
    assert len(records) == 1, records
    record = records[0]
    assert (record["model"], record["error"], record["answered"], record["totalTokens"], record["totalCost"]) == (
        model, "NO_API_KEY", False, 0, 0)


@pytest.mark.parametrize("model", sorted(MISSING))
async def test_missing_key_over_websocket(make_client: Any, token: str, monkeypatch: pytest.MonkeyPatch,
                                          fake_anthropic: Any, fake_openai: Any, model: str) -> None:
    client = await _keyless_client(make_client, monkeypatch, fake_openai)
    ws = await connect(client, token)
    started = time.monotonic()
    frames = await chat(ws, "hi", model=model)
    assert time.monotonic() - started < 2  # no retries
    assert [f["type"] for f in frames] == ["error"]  # no session.created, no stream
    assert (frames[0]["code"], frames[0]["message"]) == ("NO_API_KEY", MISSING[model])
    await ws.close()
    assert fake_anthropic.requests == [] and fake_openai.requests == []
    assert await client.server.app[state.GATEWAY].sessions.list() == []
    _assert_one_refusal(await _records(client), model)


@pytest.mark.parametrize("model", sorted(MISSING))
async def test_missing_key_over_api_chat(make_client: Any, auth_headers: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                                         fake_anthropic: Any, fake_openai: Any, model: str) -> None:
    client = await _keyless_client(make_client, monkeypatch, fake_openai)
    started = time.monotonic()
    resp = await post_chat(client, auth_headers, "chat-nokey", model=model)
    assert time.monotonic() - started < 2
    assert 400 <= resp.status < 500
    body = await resp.json()
    assert body["error"]["code"] == "NO_API_KEY" and body["error"]["message"] == MISSING[model]
    assert fake_anthropic.requests == [] and fake_openai.requests == []
    assert await client.server.app[state.GATEWAY].sessions.list() == []
    _assert_one_refusal(await _records(client), model)


async def test_keyless_local_provider_is_not_refused(make_client: Any, token: str, monkeypatch: pytest.MonkeyPatch,
                                                     fake_openai: Any) -> None:
    """An OpenAI-compatible local server (hosted_vllm) needs no key: the call goes upstream."""
    client = await make_client(providers={"hosted_vllm": {"base_url": fake_openai.url}})
    ws = await connect(client, token)
    frames = await chat(ws, "hi", model="hosted_vllm/my-model")
    assert frames[-1]["type"] == "chat.stream.end", frames
    assert len(fake_openai.requests) == 1
    await ws.close()


async def test_key_from_configured_env_var_counts(make_client: Any, token: str, monkeypatch: pytest.MonkeyPatch,
                                                  fake_openai: Any) -> None:
    client = await make_client(providers={"openai": {"base_url": fake_openai.url, "api_key_env": "MY_OPENAI_KEY"}})
    monkeypatch.setenv("MY_OPENAI_KEY", "sk-test-0123456789abcdef")
    ws = await connect(client, token)
    frames = await chat(ws, "hi", model="openai/gpt-4o-mini")
    assert frames[-1]["type"] == "chat.stream.end", frames
    assert fake_openai.requests[0].headers["authorization"] == "Bearer sk-test-0123456789abcdef"
    await ws.close()


async def test_fallback_without_key_is_no_api_key_without_retries(make_client: Any, token: str, fake_anthropic: Any,
                                                                   fake_openai: Any) -> None:
    """A fallback whose key is missing fails at once with NO_API_KEY instead of litellm's retried 500."""
    client = await make_client(chat={"max_retries": 0},
                               providers={"openai": {"base_url": fake_openai.url}},
                               models={"fallbacks": {"anthropic/claude-sonnet-4-6": ["openai/gpt-4o-mini"]}})
    fake_anthropic.enqueue(error_status(500, "boom"))
    ws = await connect(client, token)
    frames = await chat(ws, "hi", model="anthropic/claude-sonnet-4-6")
    assert frames[-1]["code"] == "NO_API_KEY" and "agentspace keys add openai" in frames[-1]["message"]
    assert fake_openai.requests == []
    await ws.close()
