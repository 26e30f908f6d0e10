"""Issue 32 tried from outside, as a third-party plugin author (audit32s): a provider plugin for a prefix litellm's
cost map also knows, a provider that fails with an exception of its own, plugin commands named like built-ins, a
pricing pattern for a provider claiming only the ids it lists, and providers whose optional methods raise."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from agentspace import (
    ChatMessage,
    Config,
    ProviderEvent,
    ProviderFinish,
    ProviderRequest,
    TextDelta,
    TextPart,
    TokenUsage,
    UsageRecord,
    hookimpl,
)
from agentspace.plugins import PluginError
from agentspace.testing import gateway_client, make_config
from agentspace.transports import state

from .support.ws import chat
from .test_plugin_author import installed_package


class LocalProvider:
    """A plugin serving ``ollama/...`` ids itself (a local server): litellm's cost map lists some ollama models,
    none of this one's."""

    name = "local-ollama"

    def claims(self, model: str) -> bool:
        return model.startswith("ollama/")

    def models(self) -> list[str]:
        return ["ollama/my-finetune"]

    def model_info(self, model: str) -> dict[str, Any] | None:
        return {"input_per_mtok": 0.0, "output_per_mtok": 0.0, "context_window": 8_000}

    async def stream(self, request: ProviderRequest) -> AsyncIterator[ProviderEvent]:
        yield TextDelta("local answer")
        usage = TokenUsage(input_tokens=4, output_tokens=2)
        yield ProviderFinish("stop", usage, ChatMessage("assistant", [TextPart("local answer")]))


class Plugin:
    def __init__(self, *providers: object) -> None:
        self.providers = providers

    @hookimpl
    def register_providers(self, register: Callable[[Any], None], config: Config) -> None:
        for provider in self.providers:
            register(provider)


async def test_a_plugin_serving_a_prefix_the_cost_map_knows_serves_its_own_models(tmp_path: Path) -> None:
    # `agentspace plugins new ollama --kind provider` wrote such a package, and its own test failed: the start
    # refused ollama/small as a model "litellm's cost map knows", and a call got "Unknown model
    # 'ollama/my-finetune'. Did you mean 'ollama/my-finetune'?".
    config = make_config(tmp_path, '[models]\ndefault = "ollama/my-finetune"\n')
    async with gateway_client(config, Plugin(LocalProvider())) as client:
        resp = await client.post(
            "/v1/chat/completions",
            json={"model": "ollama/my-finetune", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["choices"][0]["message"]["content"] == "local answer"
        ws = await client.ws_connect("/gateway")
        frames = await chat(ws, "hi", model="ollama/my-finetune")
        assert frames[-1]["type"] == "chat.stream.end", frames[-1]
        await ws.close()


class FailingProvider:
    """A plugin provider that lets its HTTP client's own error out (a refused connection), before its first event
    or after some text, instead of raising ProviderError."""

    name = "flaky"

    def __init__(self, after_text: bool) -> None:
        self.after_text = after_text

    def claims(self, model: str) -> bool:
        return model.startswith("flaky/")

    async def stream(self, request: ProviderRequest) -> AsyncIterator[ProviderEvent]:
        if self.after_text:
            yield TextDelta("half an ans")
        raise ConnectionRefusedError(111, "Connect call failed ('10.0.0.7', 443) with key sk-secret")


async def test_a_provider_failing_with_an_exception_of_its_own_fails_the_call_as_llm_error(tmp_path: Path) -> None:
    # It was a 500 "The gateway failed to handle this request" on /v1, a streamed /v1 body cut without its error
    # chunk, and no usage record on any way in.
    for after_text in (False, True):
        config = make_config(tmp_path / str(after_text), '[models]\ndefault = "flaky/m"\n')
        async with gateway_client(config, Plugin(FailingProvider(after_text))) as client:
            body = {"model": "flaky/m", "messages": [{"role": "user", "content": "hi"}]}
            resp = await client.post("/v1/chat/completions", json=body)
            assert resp.status == 502, await resp.text()
            error = (await resp.json())["error"]
            assert error["message"] == "The flaky provider failed (ConnectionRefusedError); see the server log."
            resp = await client.post("/v1/chat/completions", json={**body, "stream": True})
            text = await resp.text()  # a cut body raises here
            if after_text:
                assert resp.status == 200 and '"error"' in text.strip().splitlines()[-1], text
            else:
                assert resp.status == 502, text
            ws = await client.ws_connect("/gateway")
            frames = await chat(ws, "hi")
            await ws.close()
            assert (frames[-1]["type"], frames[-1]["code"]) == ("error", "LLM_ERROR"), frames[-1]
            assert "sk-secret" not in json.dumps(frames)
            records = list(await client.server.app[state.REGISTRY].usage.records())
        assert [r["error"] for r in records] == ["LLM_ERROR"] * 3, records
        assert all((r["outputTokens"] > 0) == after_text for r in records), records


SHADOWING = """
import click
from agentspace import hookimpl

@hookimpl
def register_commands(cli):
    @cli.command(name="usage")
    def usage():
        \"\"\"Say hello (the plugin's).\"\"\"
        click.echo("the plugin's usage")

    @cli.command(name="greet")
    def greet():
        \"\"\"Greet.\"\"\"
        click.echo("hello")
"""


def test_a_plugin_command_named_like_a_built_in_is_left_out_and_its_author_told(tmp_path: Path) -> None:
    # `agentspace --help` described the plugin's `usage` while `agentspace usage` ran the built-in; the package
    # `agentspace plugins new usage --kind command` wrote failed its own test.
    env = installed_package(tmp_path, "agentspace-shadow", SHADOWING)
    env["AGENTSPACE_HOME"] = str(tmp_path / "home")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "agentspace", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)

    listing = run("--help")
    assert listing.returncode == 0, listing.stderr
    [line] = [line for line in listing.stdout.splitlines() if line.strip().startswith("usage ")]
    assert "Token usage and cost" in line
    assert "the command 'usage' of agentspace_shadow is named like a built-in command" in listing.stderr
    assert run("greet").stdout == "hello\n"
    refused = run("plugins", "new", "usage", "--kind", "command", "--dir", str(tmp_path))
    assert refused.returncode == 1 and "'agentspace usage' is a built-in command" in refused.stderr
    assert not (tmp_path / "agentspace-usage").exists()
    assert run("plugins", "new", "usage", "--kind", "sink", "--dir", str(tmp_path)).returncode == 0


class ListedOnlyProvider:
    """A plugin claiming exactly the ids it lists."""

    name = "exact"
    MODELS = ("exact/small-1", "exact/small-2")

    def claims(self, model: str) -> bool:
        return model in self.MODELS

    def models(self) -> list[str]:
        return list(self.MODELS)

    async def stream(self, request: ProviderRequest) -> AsyncIterator[ProviderEvent]:
        yield TextDelta("ok")
        usage = TokenUsage(input_tokens=1_000_000, output_tokens=0)
        yield ProviderFinish("stop", usage, ChatMessage("assistant", [TextPart("ok")]))


async def test_a_pricing_pattern_for_a_provider_claiming_only_the_ids_it_lists(tmp_path: Path) -> None:
    # The start stopped: 'no registered provider serves 'exact' models, so the pattern matches nothing'.
    pricing = '[pricing."exact/small-*"]\ninput_per_mtok = 2.0\noutput_per_mtok = 3.0\n'
    config = make_config(tmp_path, '[models]\ndefault = "exact/small-1"\n' + pricing)
    async with gateway_client(config, Plugin(ListedOnlyProvider())) as client:
        body = {"model": "exact/small-2", "messages": [{"role": "user", "content": "hi"}]}
        assert (await client.post("/v1/chat/completions", json=body)).status == 200
        [record] = list(await client.server.app[state.REGISTRY].usage.records())
    assert record["totalCost"] == 2.0 and record["priceKnown"] is True


class BrokenListingProvider(LocalProvider):
    """A plugin whose optional ``models()`` has a bug."""

    name = "broken-list"

    def claims(self, model: str) -> bool:
        return model.startswith("broken/")

    def models(self) -> list[str]:
        raise RuntimeError("the catalog file is missing")


async def test_a_provider_whose_models_raises_takes_nothing_else_down(tmp_path: Path) -> None:
    # GET /api/models and /v1/models answered 500, and every built-in model's typo check (which asks every
    # provider's models() for a suggestion) failed: a call or a [models] default of any litellm model.
    config = make_config(tmp_path, '[models]\ndefault = "ollama/my-finetune"\n')
    async with gateway_client(config, Plugin(LocalProvider(), BrokenListingProvider())) as client:
        for model in ("ollama/my-finetune", "broken/m"):
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            resp = await client.post("/v1/chat/completions", json=body)
            assert resp.status == 200, await resp.text()
        resp = await client.get("/api/models")
        assert resp.status == 200
        assert [m["id"] for m in (await resp.json())["models"]] == ["ollama/my-finetune"]


class BrokenKeyCheckProvider(LocalProvider):
    """A plugin whose optional ``missing_key`` has a bug."""

    name = "broken-key"

    def claims(self, model: str) -> bool:
        return model.startswith("broken/")

    def models(self) -> list[str]:
        return ["broken/m"]

    async def missing_key(self, model: str, api_key: str | None, base_url: str | None) -> bool:
        raise KeyError("api_key_env")


async def test_a_provider_whose_missing_key_raises_is_called_as_one_with_its_key(tmp_path: Path) -> None:
    # /v1 answered 500 "The gateway failed to handle this request", a chat turn failed, while the model lists
    # showed the model (they already took a failing check as "has its key").
    config = make_config(tmp_path, '[models]\ndefault = "broken/m"\n')
    async with gateway_client(config, Plugin(BrokenKeyCheckProvider())) as client:
        body = {"model": "broken/m", "messages": [{"role": "user", "content": "hi"}]}
        resp = await client.post("/v1/chat/completions", json=body)
        assert resp.status == 200, await resp.text()
        ws = await client.ws_connect("/gateway")
        frames = await chat(ws, "hi")
        await ws.close()
        assert frames[-1]["type"] == "chat.stream.end", frames[-1]
        assert "broken/m" in [m["id"] for m in (await (await client.get("/api/models")).json())["models"]]


async def test_the_test_helpers_take_two_instances_of_one_plugin_class(tmp_path: Path) -> None:
    # gateway_client (and plugin_manager, registered) raised "ValueError: Plugin name already registered: Plugin=..."
    # followed by the whole plugin table.
    config = make_config(tmp_path, '[models]\ndefault = "ollama/my-finetune"\n')
    async with gateway_client(config, Plugin(LocalProvider()), Plugin(ListedOnlyProvider())) as client:
        for model in ("ollama/my-finetune", "exact/small-1"):
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            resp = await client.post("/v1/chat/completions", json=body)
            assert resp.status == 200, await resp.text()


class HangsInAclose(LocalProvider):
    """A plugin whose ``aclose`` waits on an HTTP client that never closes."""

    async def aclose(self) -> None:
        await asyncio.sleep(3600)


async def test_a_provider_hanging_in_aclose_does_not_keep_the_server_up(tmp_path: Path) -> None:
    # The server never stopped (a sink's aclose is bounded to 5 s, a provider's was not): `agentspace serve`
    # waited for ever after SIGTERM.
    config = make_config(tmp_path, '[models]\ndefault = "ollama/my-finetune"\n')
    async with asyncio.timeout(60):  # generous: a bounded close takes 5 s
        async with gateway_client(config, Plugin(HangsInAclose())) as client:
            body = {"model": "ollama/my-finetune", "messages": [{"role": "user", "content": "hi"}]}
            assert (await client.post("/v1/chat/completions", json=body)).status == 200


class Sink:
    name = "tuned"

    async def record(self, record: UsageRecord) -> None:
        pass


class Sinks:
    def __init__(self, sink: object) -> None:
        self.sink = sink

    @hookimpl
    def register_usage_sinks(self, register: Callable[[Any], None], config: Config) -> None:
        register(self.sink)


@pytest.mark.parametrize(
    ("attribute", "value", "what"),
    [
        ("record_timeout_seconds", None, "a positive number of seconds"),
        ("queue_size", 0, "a positive integer"),
        ("queue_size", "100", "a positive integer"),
        ("retry_max_seconds", 0, "a positive number of seconds"),
        ("drain_seconds", -1, "a number of seconds, 0 or more"),
    ],
)
async def test_a_sink_attribute_that_cannot_work_stops_the_start_naming_the_sink(
    tmp_path: Path, attribute: str, value: object, what: str
) -> None:
    # None stopped the start with "TypeError: float() argument must be ... not 'NoneType'" and a traceback naming
    # no plugin; a queue_size of 0 dropped every record, a timeout of 0 failed every one, in silence.
    sink = Sink()
    setattr(sink, attribute, value)
    with pytest.raises(PluginError) as raised:
        async with gateway_client(make_config(tmp_path), Sinks(sink)):
            pass
    assert f"usage sink 'tuned': {attribute} must be {what}, got {value!r}" in str(raised.value)


@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["plugins"]])
def test_a_plugin_that_fails_to_import_stops_the_start_naming_it(tmp_path: Path, command: list[str]) -> None:
    # A bare traceback from deep in importlib, naming neither the plugin nor the way out.
    env = installed_package(tmp_path, "agentspace-needs-dep", "import agentspace_not_installed_dependency\n")
    env["AGENTSPACE_HOME"] = str(tmp_path / "home")
    done = subprocess.run(
        [sys.executable, "-m", "agentspace", *command], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1, done
    assert (
        "Error: plugin 'agentspace_needs_dep' (agentspace-needs-dep) failed to load: ModuleNotFoundError: "
        "No module named 'agentspace_not_installed_dependency'" in done.stderr
    ), done.stderr
    assert "AGENTSPACE_LOAD_PLUGINS=name,..." in done.stderr


class HangsInShutdown:
    @hookimpl
    async def server_shutdown(self, app: Any, config: Config) -> None:
        await asyncio.Event().wait()


async def test_a_server_shutdown_hook_that_hangs_does_not_keep_the_server_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # As a provider's or a sink's aclose: the hook gets 5 s, then is logged and left behind (the server waited
    # for ever after SIGTERM).
    config = make_config(tmp_path)
    async with asyncio.timeout(60):  # generous: a bounded hook takes 5 s
        async with gateway_client(config, HangsInShutdown()) as client:
            assert (await client.get("/healthz")).status == 200
    assert "took more than 5s in server_shutdown; left behind" in caplog.text
