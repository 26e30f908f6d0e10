"""Keys, models, thinking forms and the CLI's --config (issue 14, items 2, 5, 6 and 7), through the real
interfaces: the WebSocket and /api/chat against the running app and the fake upstreams, the CLI through
click's CliRunner."""

from __future__ import annotations

import importlib
import json
import logging
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from click.testing import CliRunner

from agentspace.cli import main
from agentspace.config import load_config, parse_config
from agentspace.pricing import cost_map
from agentspace.transports import state
from scripts.harness import GatewayProcess, child_env
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


# --- issue 14 item 5: a current default model -------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"


def cost_entry(model: str) -> dict[str, Any] | None:
    """litellm's cost-map entry of ``provider/model`` (it keys Anthropic and OpenAI models without prefix)."""
    return cost_map().get(model) or cost_map().get(model.partition("/")[2])


def test_example_and_built_in_default_are_current() -> None:
    """Fails once the example's default passes its deprecation date in litellm's cost map: pick a newer one."""
    default = load_config(EXAMPLE)["models"]["default"]
    assert default == parse_config({})["models"]["default"]
    entry = cost_entry(default)
    assert entry is not None, f"{default} is not in litellm's cost map"
    deprecation = entry.get("deprecation_date")
    assert deprecation is None or deprecation > date.today().isoformat(), f"{default} is past its date ({deprecation})"


def _serve(config: Path, data: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentspace", "serve", "--config", str(config), "--port", "0"],
                          env=child_env(data), capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("default", ["anthropic/claude-sonet-4-6", "nosuchprovider/model", "no-slash"])
def test_serve_refuses_an_unknown_default_model(tmp_path: Path, default: str) -> None:
    config = tmp_path / "agentspace.toml"
    config.write_text(f'[storage]\ndata_dir = "{tmp_path / "data"}"\n\n[models]\ndefault = "{default}"\n', encoding="utf-8")
    result = _serve(config, tmp_path / "data")
    assert result.returncode == 1
    assert f"{config}: models.default: expected a model" in result.stderr and default in result.stderr
    assert "listening" not in result.stdout and "Traceback" not in result.stderr


async def test_serve_warns_about_a_default_past_its_date(tmp_path: Path, fake_anthropic: Any) -> None:
    server = GatewayProcess(tmp_path / "data", fake_anthropic.url, models={"default": "anthropic/claude-sonnet-4-5"})
    try:
        await server.start()
        await server.wait_for_log("anthropic/claude-sonnet-4-5 is past its deprecation date (2026-11-30)")
        assert "use a current model such as anthropic/claude-sonnet-4-6" in server.log()
    finally:
        await server.aclose()


async def test_a_future_deprecation_date_is_not_called_deprecated(
    make_client: Any, token: str, fake_openai: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    deprecation = cost_entry("openai/gpt-4o-mini")["deprecation_date"]  # type: ignore[index]
    assert deprecation > date.today().isoformat()  # the cost map's date for it is still ahead
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-0123456789abcdef")
    client = await make_client(providers={"openai": {"base_url": fake_openai.url}})
    ws = await connect(client, token)
    with caplog.at_level(logging.WARNING, logger="agentspace"):
        frames = await chat(ws, "hi", model="openai/gpt-4o-mini")
    await ws.close()
    assert frames[-1]["type"] == "chat.stream.end"
    notes = [r.getMessage() for r in caplog.records if "gpt-4o-mini" in r.getMessage()]
    assert notes == [f"openai/gpt-4o-mini will be retired on {deprecation}"]


def _models(*args: str) -> dict[str, dict[str, Any]]:
    result = CliRunner().invoke(main, ["models", "--json", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return {m["id"]: m for m in json.loads(result.output)}


def test_models_hide_retired_and_non_chat_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-0123456789")
    monkeypatch.setenv("GEMINI_API_KEY", "gemini-test-0123456789")
    listed = _models()
    assert "anthropic/claude-sonnet-4-6" in listed and listed["anthropic/claude-sonnet-4-6"]["default"]
    assert "anthropic/claude-sonnet-4-5" not in listed  # retired on 2026-11-30
    assert not any(m["deprecated"] for m in listed.values())
    everything = _models("--all")
    assert everything["anthropic/claude-sonnet-4-5"]["deprecated"] is True
    # The cost map files text-to-speech and music models under mode "chat"; they answer no chat.
    for models in (listed, everything):
        assert "gemini/gemini-2.5-pro-preview-tts" not in models and "gemini/lyria-3.5" not in models
    table = CliRunner().invoke(main, ["models", "--all"]).output
    assert "anthropic/claude-sonnet-4-5 " in table and "DEPRECATED" in table


# --- issue 14 item 6: thinking in the form each model takes ------------------------------------------

THINKING_FORMS = {
    "claude-sonnet-4-5": "enabled",  # budget only
    "claude-haiku-4-5": "enabled",
    "claude-opus-4-6": "adaptive",  # accepts both; the budget form is deprecated for it (the SDK warns)
    "claude-sonnet-4-6": "adaptive",
    "claude-opus-4-7": "adaptive",  # adaptive only
    "claude-sonnet-5-5": "adaptive",
}


@pytest.mark.parametrize("models_api", [True, False], ids=["models-api", "cost-map"])
async def test_thinking_form_per_model_family(make_client: Any, token: str, fake_anthropic: Any, models_api: bool,
                                              recwarn: pytest.WarningsRecorder) -> None:
    fake_anthropic.any_model = models_api  # without it, the Models API answers 404 and the cost map decides
    client = await make_client()
    ws = await connect(client, token)
    for i, name in enumerate(THINKING_FORMS):
        frames = await chat(ws, "hi", f"r{i}", model=f"anthropic/{name}")
        assert frames[-1]["type"] == "chat.stream.end", frames
    await ws.close()
    sent = {r.body["model"]: r.body["thinking"] for r in fake_anthropic.requests}
    assert {model: thinking["type"] for model, thinking in sent.items()} == THINKING_FORMS
    assert all(t == {"type": "enabled", "budget_tokens": 8000} for t in sent.values() if t["type"] == "enabled")
    assert all(t == {"type": "adaptive"} for t in sent.values() if t["type"] == "adaptive")
    thinking_warnings = [str(w.message) for w in recwarn if "thinking" in str(w.message) or "deprecated" in str(w.message)]
    assert thinking_warnings == []
