"""Issue 32 tried from outside once more, as a third-party plugin author (audit32t): providers that yield what is
no provider event or finish with fields of the wrong type, and formatting prompts that fail."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from agentspace import (
    ChatMessage,
    Config,
    ProviderFinish,
    ProviderRequest,
    TextDelta,
    TextPart,
    TokenUsage,
    Tool,
    hookimpl,
)
from agentspace.plugins import PluginError
from agentspace.testing import gateway_client, make_config
from agentspace.transports import state

from .support.ws import chat, receive

ANSWER = ChatMessage("assistant", [TextPart("x")])
# What a plugin's provider may get wrong, by model id, and the words that name it to the client.
WRONG: dict[str, tuple[list[Any], str]] = {
    "wrong/str": (["hello"], "The wrong provider yielded a str, which is no provider event."),
    "wrong/dict-usage": (
        [TextDelta("x"), ProviderFinish("stop", {"input_tokens": 10}, ANSWER)],  # type: ignore[arg-type]
        "The wrong provider yielded a ProviderFinish whose usage is a dict, not a TokenUsage.",
    ),
    "wrong/str-tokens": (
        [TextDelta("x"), ProviderFinish("stop", TokenUsage("10", 2), ANSWER)],  # type: ignore[arg-type]
        "The wrong provider reported input_tokens = '10', not a whole number of tokens from 0.",
    ),
    "wrong/float-tokens": (
        [TextDelta("x"), ProviderFinish("stop", TokenUsage(10.5, 2), ANSWER)],  # type: ignore[arg-type]
        "The wrong provider reported input_tokens = 10.5, not a whole number of tokens from 0.",
    ),
    "wrong/no-message": (
        [TextDelta("x"), ProviderFinish("stop", TokenUsage(1, 1), None)],  # type: ignore[arg-type]
        "The wrong provider finished with a message that is a NoneType, not a ChatMessage.",
    ),
    "wrong/no-finish": ([TextDelta("x")], "The wrong provider ended its stream without finishing the answer."),
}


class Providers:
    """A plugin registering the providers given (asked in this order, before the built-ins)."""

    def __init__(self, *providers: Any) -> None:
        self.providers = providers

    @hookimpl
    def register_providers(self, register: Callable[[Any], None], config: Config) -> None:
        for provider in self.providers:
            register(provider)


class WrongProvider:
    name = "wrong"

    def claims(self, model: str) -> bool:
        return model.startswith(("wrong/", "odd/"))

    async def stream(self, request: ProviderRequest) -> AsyncIterator[Any]:
        if request.model.startswith("odd/"):
            yield TextDelta("x")
            yield ProviderFinish("end_turn", TokenUsage(3, 1), ChatMessage("assistant", [TextPart("x")]))
            return
        for event in WRONG[request.model][0]:
            yield event


async def test_a_provider_yielding_the_wrong_types_is_named_and_its_call_recorded(tmp_path: Path) -> None:
    # A str event was dropped without a word (the turn ended "stop" with nothing); a dict usage, str tokens or no
    # message was "The gateway failed while answering" with no usage record; float tokens reached the records.
    config = make_config(
        tmp_path, '[models]\ndefault = "wrong/str"\n[pricing."wrong/*"]\ninput_per_mtok = 1\noutput_per_mtok = 1\n'
    )
    async with gateway_client(config, Providers(WrongProvider())) as client:
        for model, (_, message) in WRONG.items():
            ws = await client.ws_connect("/gateway")
            frames = await chat(ws, "hi", model=model)
            await ws.close()
            assert (frames[-1]["type"], frames[-1]["code"]) == ("error", "LLM_ERROR"), (model, frames[-1])
            assert frames[-1]["message"] == message
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            resp = await client.post("/v1/chat/completions", json=body)
            assert resp.status == 502, await resp.text()
            assert (await resp.json())["error"]["message"] == message
        records = list(await client.server.app[state.REGISTRY].usage.records())
    assert sorted(r["model"] for r in records) == sorted(list(WRONG) * 2)
    assert all(r["error"] == "LLM_ERROR" and type(r["inputTokens"]) is int for r in records), records


async def test_a_provider_finish_reason_outside_the_protocol_reaches_clients_as_other(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(tmp_path, '[models]\ndefault = "odd/finish"\n')
    async with gateway_client(config, Providers(WrongProvider())) as client:
        ws = await client.ws_connect("/gateway")
        ends = [(await chat(ws, "hi", request_id=f"r{n}", model="odd/finish"))[-1] for n in range(2)]
        await ws.close()
        records = list(await client.server.app[state.REGISTRY].usage.records())
    assert [(e["type"], e["finishReason"]) for e in ends] == [("chat.stream.end", "other")] * 2, ends
    assert [r["finishReason"] for r in records] == ["other", "other"]
    logged = [r.getMessage() for r in caplog.records if "end_turn" in r.getMessage()]
    # Said once, not at every call.
    assert len(logged) == 1 and "provider 'wrong' on odd/finish finished 'end_turn'" in logged[0], logged


class FailingFormat:
    @hookimpl
    def formatting_prompt(self, config: Config, model: str) -> Any:
        return 5 if model == "odd/int-format" else None


class RaisingFormat:
    @hookimpl
    def formatting_prompt(self, model: str) -> str | None:
        if model == "odd/finish":
            raise RuntimeError("format boom")
        return None


class PlainFormat:
    @hookimpl  # registered before the failing ones: pluggy asks it after them, and before the built-in
    def formatting_prompt(self, model: str) -> str | None:
        return "Answer in plain text."


async def test_a_failing_formatting_prompt_is_named_and_the_next_plugin_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # It was logged as "a plugin's formatting_prompt failed": which one, among the installed plugins, was for the
    # operator to find; and the configured prompt went out in place of every other plugin's answer.
    config = make_config(tmp_path, '[models]\ndefault = "odd/finish"\n')
    async with gateway_client(
        config, Providers(WrongProvider()), PlainFormat(), FailingFormat(), RaisingFormat()
    ) as client:
        ws = await client.ws_connect("/gateway")
        for model in ("odd/finish", "odd/int-format"):
            frames = await chat(ws, "hi", model=model)
            assert frames[-1]["type"] == "chat.stream.end", frames[-1]
            await ws.send_json({"type": "context.inspect", "id": "i1", "sessionId": frames[0]["sessionId"]})
            context = await receive(ws)
            [row] = [s for s in context["sections"] if s["name"] == "response_format"]
            assert row["byteCount"] == len("Answer in plain text."), context
        await ws.close()
    assert "plugin 'RaisingFormat': formatting_prompt failed" in caplog.text, caplog.text
    assert "plugin 'FailingFormat': formatting_prompt gave a int, not a str or None" in caplog.text


class Describing:
    """Lists two models, and describes them wrongly: a price as a string, a list in place of a dict."""

    name = "describing"

    def claims(self, model: str) -> bool:
        return model.startswith("describing/")

    def models(self) -> list[str]:
        return ["describing/a", "describing/b"]

    def model_info(self, model: str) -> Any:
        return {"input_per_mtok": "0.5"} if model == "describing/a" else ["nope"]

    async def stream(self, request: ProviderRequest) -> AsyncIterator[Any]:
        yield ProviderFinish("stop", TokenUsage(1, 1), ChatMessage("assistant", [TextPart("x")]))


async def test_a_malformed_model_info_is_logged_when_the_model_lists_leave_it_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The lists showed the fallback price and no context window without a word: the author, running `agentspace
    # models` or the web app, could not learn why the prices the provider gave were ignored.
    config = make_config(tmp_path, '[models]\ndefault = "describing/a"\n')
    async with gateway_client(config, Providers(Describing())) as client:
        resp = await client.get("/api/models")
        models = {m["id"]: m for m in (await resp.json())["models"]}
    assert not models["describing/a"]["priceKnown"] and not models["describing/b"]["priceKnown"]
    assert "model_info('describing/a').input_per_mtok: expected an integer or a number, got '0.5'" in caplog.text
    assert "provider 'describing': model_info('describing/b'): expected a dict, got ['nope']" in caplog.text


class Strict:
    """Claims by looking its table up: a KeyError for every id it does not know."""

    name = "strict"

    def claims(self, model: str) -> bool:
        return {"strict/one": True}[model]

    async def stream(self, request: ProviderRequest) -> AsyncIterator[Any]:
        yield TextDelta("strict")
        yield ProviderFinish("stop", TokenUsage(1, 1), ChatMessage("assistant", [TextPart("strict")]))


async def test_a_provider_whose_claims_raises_takes_no_other_model_down(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Every call to any other model was a 500 "The gateway failed to handle this request" (INTERNAL_ERROR on the
    # WebSocket), naming no plugin.
    config = make_config(tmp_path, '[models]\ndefault = "strict/one"\n')
    async with gateway_client(config, Providers(Strict(), WrongProvider())) as client:
        ws = await client.ws_connect("/gateway")
        for model in ("strict/one", "odd/finish"):
            frames = await chat(ws, "hi", model=model)
            assert frames[-1]["type"] == "chat.stream.end", frames[-1]
        await ws.close()
        body = {"model": "odd/finish", "messages": [{"role": "user", "content": "hi"}]}
        resp = await client.post("/v1/chat/completions", json=body)
        assert resp.status == 200, await resp.text()
    assert "provider 'strict': claims('odd/finish') failed: KeyError" in caplog.text


class Waiting:
    """Asks a key service that never answers whether the key is missing."""

    name = "waiting"

    def claims(self, model: str) -> bool:
        return model.startswith("waiting/")

    def models(self) -> list[str]:
        return ["waiting/m"]

    async def missing_key(self, model: str, api_key: str | None, base_url: str | None) -> bool:
        await asyncio.Event().wait()
        return True

    async def stream(self, request: ProviderRequest) -> AsyncIterator[Any]:
        yield TextDelta("waited")
        yield ProviderFinish("stop", TokenUsage(1, 1), ChatMessage("assistant", [TextPart("waited")]))


async def test_a_provider_whose_missing_key_hangs_holds_no_call_nor_list(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The chat and GET /api/models waited for ever.
    config = make_config(tmp_path, '[models]\ndefault = "waiting/m"\n')
    async with gateway_client(config, Providers(Waiting())) as client:
        ws = await client.ws_connect("/gateway")
        frames = await asyncio.wait_for(chat(ws, "hi"), 60)
        await ws.close()
        assert frames[-1]["type"] == "chat.stream.end", frames[-1]
        resp = await asyncio.wait_for(client.get("/api/models"), 60)
        assert [m["id"] for m in (await resp.json())["models"]] == ["waiting/m"]
    assert "provider 'waiting': missing_key('waiting/m') took over 5s; the call goes ahead" in caplog.text


class ManyWaiting(Waiting):
    """Three models, each check hanging; notes how many checks had timed out when each one began."""

    name = "many-waiting"

    def __init__(self) -> None:
        self.timed_out = 0
        self.seen_at_start: list[int] = []

    def models(self) -> list[str]:
        return ["waiting/a", "waiting/b", "waiting/c"]

    async def missing_key(self, model: str, api_key: str | None, base_url: str | None) -> bool:
        self.seen_at_start.append(self.timed_out)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.timed_out += 1
            raise
        return True


async def test_a_provider_whose_missing_key_hangs_holds_the_model_list_once_not_once_per_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The checks were asked one after the other: GET /api/models took 5 s per model of the provider.
    provider = ManyWaiting()
    config = make_config(tmp_path, '[models]\ndefault = "waiting/a"\n')
    async with gateway_client(config, Providers(provider)) as client:
        resp = await asyncio.wait_for(client.get("/api/models"), 60)
        listed = [m["id"] for m in (await resp.json())["models"]]
    assert listed == ["waiting/a", "waiting/b", "waiting/c"]
    assert provider.seen_at_start == [0, 0, 0]  # each began before any had timed out: asked at once
    assert caplog.text.count("took over 5s; the call goes ahead") == 3


class OneModel(Waiting):
    name = "one-model"

    def claims(self, model: str) -> bool:
        return model == "one/m"

    def models(self) -> Any:
        return "one/m"  # a list was meant

    async def missing_key(self, model: str, api_key: str | None, base_url: str | None) -> bool:
        return False


async def test_a_provider_whose_models_returns_a_str_lists_no_letters(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # GET /api/models listed "o", "n", "e", "/" and "m", each a model of the provider.
    config = make_config(tmp_path, '[models]\ndefault = "one/m"\n')
    async with gateway_client(config, Providers(OneModel())) as client:
        resp = await client.get("/api/models")
        listed = [m["id"] for m in (await resp.json())["models"]]
        ws = await client.ws_connect("/gateway")
        frames = await chat(ws, "hi")
        await ws.close()
    assert listed == []  # unlisted, as when models() raises; its calls still work
    assert frames[-1]["type"] == "chat.stream.end", frames[-1]
    assert "provider 'one-model' could not list its models: TypeError: models() returned a str" in caplog.text


def count_words(input: dict[str, Any]) -> dict[str, int]:  # `async def` was meant
    return {"words": len(str(input.get("text", "")).split())}


class PlainToolPlugin:
    @hookimpl
    def register_tools(self, register: Callable[[Tool], None], config: Config) -> None:
        register(Tool("count_words", "Count words.", {"type": "object", "properties": {}}, count_words))


async def test_a_tool_whose_handler_is_a_plain_function_stops_the_start_naming_it(tmp_path: Path) -> None:
    # It was taken: the tool ran when the model called it, and the model got "Tool count_words failed: object
    # dict can't be used in 'await' expression" for its result, so it called it again.
    with pytest.raises(PluginError, match="register_tools") as raised:
        async with gateway_client(make_config(tmp_path), PlainToolPlugin()):
            pass
    assert "tool 'count_words': its handler count_words is a plain function" in str(raised.value)
    assert "make it `async def`" in str(raised.value)


class LocalModel:
    """A small local model, described as its provider knows it: a 4,096-token window, 1,024 tokens of output."""

    name = "local"
    seen: list[int] = []

    def claims(self, model: str) -> bool:
        return model.startswith("local/")

    def models(self) -> list[str]:
        return ["local/small"]

    def model_info(self, model: str) -> dict[str, Any]:
        return {"input_per_mtok": 0.0, "output_per_mtok": 0.0, "context_window": 4096, "max_output_tokens": 1024}

    async def stream(self, request: ProviderRequest) -> AsyncIterator[Any]:
        self.seen.append(request.max_tokens)
        yield TextDelta("ok")
        yield ProviderFinish("stop", TokenUsage(10, 1), ChatMessage("assistant", [TextPart("ok")]))


async def test_a_model_with_a_small_output_limit_is_asked_within_it_and_its_window_counted_so(tmp_path: Path) -> None:
    # Every WebSocket and /api/chat turn was CONTEXT_TOO_LONG: "local/small takes 0 (4096 in its window, minus
    # 4096 for the answer)": [chat] max_tokens (4096) was taken for the answer, past the model's own 1,024.
    config = make_config(tmp_path, '[models]\ndefault = "local/small"\n[chat]\ncontext_policy = "refuse"\n')
    async with gateway_client(config, Providers(LocalModel())) as client:
        ws = await client.ws_connect("/gateway")
        frames = await chat(ws, "hi")
        assert frames[-1]["type"] == "chat.stream.end", frames[-1]
        frames = await chat(ws, "word " * 3500)  # past the 3,072 the answer leaves
        await ws.close()
    assert frames[-1]["code"] == "CONTEXT_TOO_LONG", frames[-1]
    assert "local/small takes 3072 (4096 in its window, minus 1024 for the answer)" in frames[-1]["message"]
    assert LocalModel.seen == [1024]
