"""Keys, models, thinking forms and the CLI's --config (issue 14, items 2, 5, 6 and 7), through the real
interfaces: the WebSocket and /api/chat against the running app and the fake upstreams, the CLI through
click's CliRunner."""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import subprocess
import sys
import time
from datetime import UTC, date
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from click.testing import CliRunner

from agentspace.cli import main
from agentspace.config import load_config, parse_config
from agentspace.pricing import cost_map
from agentspace.storage.embedded.sessions import SessionStore
from agentspace.storage.embedded.usage import write_segment
from agentspace.transports import state
from scripts.harness import GatewayProcess, child_env
from tests.fakes.anthropic_upstream import error_status
from tests.support.ui_stream import post_chat
from tests.support.ws import chat, connect

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
    gw = client.server.app[state.REGISTRY]
    await gw.usage.flush()
    return list(await gw.usage.records())


def _assert_one_refusal(records: list[dict[str, Any]], model: str) -> None:
    assert len(records) == 1, records
    record = records[0]
    assert (record["model"], record["error"], record["answered"], record["totalTokens"], record["totalCost"]) == (
        model,
        "NO_API_KEY",
        False,
        0,
        0,
    )


@pytest.mark.parametrize("model", sorted(MISSING))
async def test_missing_key_over_websocket(
    make_client: Any, token: str, monkeypatch: pytest.MonkeyPatch, fake_anthropic: Any, fake_openai: Any, model: str
) -> None:
    client = await _keyless_client(make_client, monkeypatch, fake_openai)
    ws = await connect(client, token)
    started = time.monotonic()
    frames = await chat(ws, "hi", model=model)
    assert time.monotonic() - started < 2  # no retries
    assert [f["type"] for f in frames] == ["error"]  # no session.created, no stream
    assert (frames[0]["code"], frames[0]["message"]) == ("NO_API_KEY", MISSING[model])
    await ws.close()
    assert fake_anthropic.requests == [] and fake_openai.requests == []
    assert await client.server.app[state.REGISTRY].sessions.summaries() == []
    _assert_one_refusal(await _records(client), model)


@pytest.mark.parametrize("model", sorted(MISSING))
async def test_missing_key_over_api_chat(
    make_client: Any,
    auth_headers: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    fake_anthropic: Any,
    fake_openai: Any,
    model: str,
) -> None:
    client = await _keyless_client(make_client, monkeypatch, fake_openai)
    started = time.monotonic()
    resp = await post_chat(client, auth_headers, "chat-nokey", model=model)
    assert time.monotonic() - started < 2
    assert 400 <= resp.status < 500
    body = await resp.json()
    assert body["error"]["code"] == "NO_API_KEY" and body["error"]["message"] == MISSING[model]
    assert fake_anthropic.requests == [] and fake_openai.requests == []
    assert await client.server.app[state.REGISTRY].sessions.summaries() == []
    _assert_one_refusal(await _records(client), model)


async def test_keyless_local_provider_is_not_refused(
    make_client: Any, token: str, monkeypatch: pytest.MonkeyPatch, fake_openai: Any
) -> None:
    """An OpenAI-compatible local server (hosted_vllm) needs no key: the call goes upstream."""
    client = await make_client(providers={"hosted_vllm": {"base_url": fake_openai.url}})
    ws = await connect(client, token)
    frames = await chat(ws, "hi", model="hosted_vllm/my-model")
    assert frames[-1]["type"] == "chat.stream.end", frames
    assert len(fake_openai.requests) == 1
    await ws.close()


async def test_key_from_configured_env_var_counts(
    make_client: Any, token: str, monkeypatch: pytest.MonkeyPatch, fake_openai: Any
) -> None:
    client = await make_client(providers={"openai": {"base_url": fake_openai.url, "api_key_env": "MY_OPENAI_KEY"}})
    monkeypatch.setenv("MY_OPENAI_KEY", "sk-test-0123456789abcdef")
    ws = await connect(client, token)
    frames = await chat(ws, "hi", model="openai/gpt-4o-mini")
    assert frames[-1]["type"] == "chat.stream.end", frames
    assert fake_openai.requests[0].headers["authorization"] == "Bearer sk-test-0123456789abcdef"
    await ws.close()


async def test_fallback_without_key_is_no_api_key_without_retries(
    make_client: Any, token: str, fake_anthropic: Any, fake_openai: Any
) -> None:
    """A fallback whose key is missing fails at once with NO_API_KEY instead of litellm's retried 500."""
    client = await make_client(
        chat={"max_retries": 0},
        providers={"openai": {"base_url": fake_openai.url}},
        models={"fallbacks": {"anthropic/claude-sonnet-4-6": ["openai/gpt-4o-mini"]}},
    )
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
    return subprocess.run(
        [sys.executable, "-m", "agentspace", "serve", "--config", str(config), "--port", "0"],
        env=child_env(data),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("default", ["anthropic/claude-sonet-4-6", "nosuchprovider/model", "no-slash"])
def test_serve_refuses_an_unknown_default_model(tmp_path: Path, default: str) -> None:
    config = tmp_path / "agentspace.toml"
    config.write_text(
        f'[storage]\ndata_dir = "{tmp_path / "data"}"\n\n[models]\ndefault = "{default}"\n', encoding="utf-8"
    )
    result = _serve(config, tmp_path / "data")
    assert result.returncode == 1
    assert f"{config}: models.default: expected a model" in result.stderr and default in result.stderr
    assert "listening" not in result.stdout and "Traceback" not in result.stderr


async def test_serve_warns_about_a_default_past_its_date(tmp_path: Path, fake_anthropic: Any) -> None:
    # The date is set here, not read from the cost map, so that the test does not depend on the calendar.
    server = GatewayProcess(
        tmp_path / "data",
        fake_anthropic.url,
        models={"default": "anthropic/claude-sonnet-4-5"},
        **{'pricing."anthropic/claude-sonnet-4-5"': {"deprecation_date": "2026-01-31"}},
    )
    try:
        await server.start()
        await server.wait_for_log("anthropic/claude-sonnet-4-5 is past its deprecation date (2026-01-31)")
        assert "use a current model such as anthropic/claude-sonnet-4-6" in server.log()
    finally:
        await server.aclose()


async def test_a_future_deprecation_date_is_not_called_deprecated(
    make_client: Any,
    token: str,
    auth_headers: dict[str, str],
    fake_openai: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The date is set here ([pricing]), not read from the cost map (whose date for the model passes one day).
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-0123456789abcdef")
    client = await make_client(
        providers={"openai": {"base_url": fake_openai.url}},
        pricing={"openai/gpt-4o-mini": {"deprecation_date": "2999-01-01"}},
    )
    ws = await connect(client, token)
    with caplog.at_level(logging.WARNING, logger="agentspace"):
        frames = await chat(ws, "hi", model="openai/gpt-4o-mini")
    await ws.close()
    assert frames[-1]["type"] == "chat.stream.end"
    notes = [r.getMessage() for r in caplog.records if "gpt-4o-mini" in r.getMessage()]
    assert notes == ["openai/gpt-4o-mini will be retired on 2999-01-01"]
    listed = {m["id"]: m for m in (await (await client.get("/api/models", headers=auth_headers)).json())["models"]}
    assert (listed["openai/gpt-4o-mini"]["deprecationDate"], listed["openai/gpt-4o-mini"]["deprecated"]) == (
        "2999-01-01",
        False,
    )


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
async def test_thinking_form_per_model_family(
    make_client: Any, token: str, fake_anthropic: Any, models_api: bool, recwarn: pytest.WarningsRecorder
) -> None:
    fake_anthropic.any_model = models_api  # without it, the Models API answers 404 and the cost map decides
    client = await make_client()
    ws = await connect(client, token)
    for i, name in enumerate(THINKING_FORMS):
        frames = await chat(ws, "hi", f"r{i}", model=f"anthropic/{name}")
        assert frames[-1]["type"] == "chat.stream.end", frames
    await ws.close()
    sent = {r.body["model"]: r.body["thinking"] for r in fake_anthropic.requests}
    assert {model: thinking["type"] for model, thinking in sent.items()} == THINKING_FORMS
    # (shown: a session's turn asks for the summarized thinking, which Opus 4.7 and later omit unless asked)
    enabled = {"type": "enabled", "budget_tokens": 8000, "display": "summarized"}
    assert all(t == enabled for t in sent.values() if t["type"] == "enabled")
    assert all(t == {"type": "adaptive", "display": "summarized"} for t in sent.values() if t["type"] == "adaptive")
    thinking_warnings = [
        str(w.message) for w in recwarn if "thinking" in str(w.message) or "deprecated" in str(w.message)
    ]
    assert thinking_warnings == []


# --- issue 14 item 7: --config on every command that reads the config --------------------------------


@pytest.fixture
def other_config(tmp_path: Path) -> tuple[Path, Path]:
    """A config whose data directory is not the default one (AGENTSPACE_HOME), and that directory."""
    data = tmp_path / "other-data"
    config = tmp_path / "other.toml"
    config.write_text(
        f'[storage]\ndata_dir = "{data}"\n\n[server]\nport = 1\n\n[models]\ndefault = "anthropic/claude-opus-4-7"\n',
        encoding="utf-8",
    )
    return config, data


def run(*args: str, input: str | None = None) -> Any:
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def test_config_option_on_models(other_config: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    config, _ = other_config
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-0123456789")
    result = run("models", "--json", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert [m["id"] for m in json.loads(result.output) if m["default"]] == ["anthropic/claude-opus-4-7"]


def test_config_option_on_usage(other_config: tuple[Path, Path]) -> None:
    config, data = other_config
    write_segment(
        data,
        date.today().isoformat(),
        1,
        [
            {
                "id": "usage_1",
                "timestamp": f"{date.today().isoformat()}T10:00:00+00:00",
                "model": "anthropic/claude-opus-4-7",
                "provider": "anthropic",
                "sessionId": "s1",
                "client": "ws",
                "inputTokens": 10,
                "outputTokens": 5,
                "cacheReadTokens": 0,
                "cacheWriteTokens": 0,
                "reasoningTokens": 0,
                "totalTokens": 15,
                "inputCost": 0.0,
                "outputCost": 0.0,
                "totalCost": 0.0,
                "latencyMs": 1.0,
                "finishReason": "stop",
                "estimated": False,
                "priceKnown": True,
                "error": None,
                "answered": True,
                "attempts": 1,
            }
        ],
    )
    assert json.loads(run("usage", "--json").output)["grandTotal"]["totalTokens"] == 0  # the default data dir
    result = run("usage", "--json", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["grandTotal"]["totalTokens"] == 15


def test_config_option_on_sessions(other_config: tuple[Path, Path]) -> None:
    config, data = other_config

    async def seed() -> str:
        store = SessionStore(data)
        info = await store.create(model="anthropic/claude-opus-4-7")
        await store.aclose()
        return str(info["id"])

    session_id = asyncio.run(seed())
    assert json.loads(run("sessions", "list", "--json").output) == []
    listed = run("sessions", "list", "--json", "--config", str(config))
    assert [s["id"] for s in json.loads(listed.output)] == [session_id]
    assert run("sessions", "--config", str(config), "list", "--json").output == listed.output
    shown = run("sessions", "show", session_id, "--json", "--config", str(config))
    assert shown.exit_code == 0 and json.loads(shown.output)["id"] == session_id
    assert run("sessions", "delete", session_id, "--yes", "--config", str(config)).exit_code == 0
    assert json.loads(run("sessions", "list", "--json", "--config", str(config)).output) == []


def test_config_option_on_keys(other_config: tuple[Path, Path], isolated_env: Path) -> None:
    config, data = other_config
    assert run("keys", "add", "openai", "--config", str(config), input="sk-openai-test-key-000\n").exit_code == 0
    assert (data / "keys.json").exists() and not (isolated_env / "keys.json").exists()
    listed = run("keys", "list", "--config", str(config))
    assert "openai" in listed.stdout
    assert listed.stderr == f"agentspace: data directory {data} ([storage] data_dir in {config})\n"
    assert "openai" not in run("keys", "list").output
    assert run("keys", "path", "--config", str(config)).output.strip() == str(data / "keys.json")
    assert run("keys", "remove", "openai", "--config", str(config)).exit_code == 0
    assert "openai" not in run("keys", "list", "--config", str(config)).output


def test_config_option_on_token(other_config: tuple[Path, Path]) -> None:
    config, data = other_config
    result = run("token", "--config", str(config))
    assert result.exit_code == 0
    assert result.stdout.strip() == (data / "gateway-token").read_text(encoding="utf-8").strip()
    assert result.stderr == f"agentspace: data directory {data} ([storage] data_dir in {config})\n"


def test_config_option_on_plugins(other_config: tuple[Path, Path], tmp_path: Path) -> None:
    config, _ = other_config
    result = run("plugins", "--all", "--config", str(config))
    assert result.exit_code == 0 and json.loads(result.output)
    broken = tmp_path / "broken.toml"
    broken.write_text("[server]\nport = 'x'\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["plugins", "--config", str(broken)])
    assert result.exit_code == 1 and f"{broken}: server.port" in result.output


def test_config_option_on_inspect_and_chat(other_config: tuple[Path, Path]) -> None:
    """Both reach the gateway named by the config's [server] (port 1: nothing listens there)."""
    config, _ = other_config
    for args in (["inspect", "s1"], ["chat"]):
        result = CliRunner().invoke(main, [*args, "--config", str(config)], input="hi\n")
        assert result.exit_code == 1 and "127.0.0.1:1" in result.output, result.output


# --- issue 16 item 5: provider helpers live once -----------------------------------------------------


@pytest.mark.parametrize("provider_name", ["anthropic", "litellm"])
async def test_both_providers_read_an_http_date_retry_after(
    fake_anthropic: Any, fake_openai: Any, provider_name: str
) -> None:
    """One retry-after parser for both providers: seconds, or an HTTP date (the pipeline waits that long)."""
    from dataclasses import replace
    from datetime import datetime, timedelta
    from email.utils import format_datetime

    from agentspace.events import ProviderError
    from agentspace.providers.anthropic import AnthropicProvider
    from agentspace.providers.base import ProviderRequest
    from agentspace.providers.litellm import LiteLLMProvider
    from agentspace.types import ChatMessage, ModelInfo
    from tests.fakes import openai_upstream

    importlib.import_module("litellm")  # its first import takes seconds: not part of the wait measured
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=20), usegmt=True)
    if provider_name == "anthropic":
        fake, model, provider = fake_anthropic, "anthropic/claude-sonnet-4-6", AnthropicProvider(parse_config({}))
        fake.enqueue(replace(error_status(429), headers={"retry-after": when}))
    else:
        fake, model, provider = fake_openai, "openai/gpt-4o-mini", LiteLLMProvider(parse_config({}))
        fake.enqueue(replace(openai_upstream.error_status(429), headers={"retry-after": when}))
    request = ProviderRequest(
        model=model,
        system="",
        messages=[ChatMessage.user("Hi")],
        model_info=ModelInfo(model, model.split("/")[0], 1.0, 1.0, 1.0, 1.0),
        api_key="sk-test-0123456789abcdef",
        base_url=fake.url,
    )
    with pytest.raises(ProviderError) as caught:
        async for _ in provider.stream(request):
            pass
    close = getattr(provider, "aclose", None)
    if close is not None:
        await close()
    assert caught.value.code == "RATE_LIMITED"
    assert caught.value.retry_after is not None and 10 <= caught.value.retry_after <= 20


@pytest.mark.parametrize(
    ("section", "key"),
    [
        (
            '[models.groups."claude"]\ndeployments = [{ model = "anthropic/claude-sonet-4-6" }]',
            'models.groups."claude".deployments[0].model',
        ),
        (
            '[models.groups."claude"]\ndeployments = [{ model = "anthropic/claude-sonnet-4-6" }]\n'
            'fallbacks = ["anthropic/claude-hiaku-4-5"]',
            'models.groups."claude".fallbacks',
        ),
        # A plain model's fallbacks: the turn that needed one failed with no usage record
        (
            '[models]\nfallbacks = { "anthropic/claude-sonnet-4-6" = ["openai/gpt-5.5", "anthropic/claude-hiaku-4-5"] }',
            'models.fallbacks."anthropic/claude-sonnet-4-6"',
        ),
        (
            '[models]\nfallbacks = { "anthropic/claude-sonnet-4-6" = ["nosuchprovider/model"] }',
            'models.fallbacks."anthropic/claude-sonnet-4-6"',
        ),
    ],
)
def test_serve_refuses_a_group_or_fallback_calling_an_unknown_model(tmp_path: Path, section: str, key: str) -> None:
    """A model group's deployments and fallbacks, and ``[models] fallbacks``, are checked as the default is
    (docs/routing.md: every key is validated when the config is loaded), not found out call by call."""
    config = tmp_path / "agentspace.toml"
    config.write_text(f'[storage]\ndata_dir = "{tmp_path / "data"}"\n\n{section}\n', encoding="utf-8")
    result = _serve(config, tmp_path / "data")
    assert result.returncode == 1, result.stderr[-500:]
    assert f"{config}: {key}: expected a model a provider serves" in result.stderr, result.stderr[-500:]
    assert "listening" not in result.stdout and "Traceback" not in result.stderr
