"""Providers describe their models (docs/plugins.md, "Model info"): a provider's ``model_info(model)`` gives
prices, long-context tiers, limits and capabilities to pricing (usage records), ``GET /api/models``,
``/v1/models`` and ``agentspace models``; ``[pricing]`` takes glob patterns (exact id first, then the
longest matching pattern); a malformed or unserved pattern stops the start naming the file and key."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from agentspace import (
    ChatMessage,
    Config,
    ConfigError,
    ProviderEvent,
    ProviderFinish,
    ProviderRequest,
    TextDelta,
    TextPart,
    TokenUsage,
    hookimpl,
)
from agentspace.cli import main
from agentspace.testing import gateway_client, make_config
from agentspace.transports import state

REVERSE_MODELS = {
    "reverse/small": {
        "input_per_mtok": 1.0,
        "output_per_mtok": 2.0,
        "context_window": 32_000,
        "max_output_tokens": 4_000,
        "supports_tools": True,
        "supports_vision": True,
        "supports_reasoning": False,
        "deprecation_date": "2099-01-01",
        "long_context": [{"above_input_tokens": 1000, "input_per_mtok": 10.0, "output_per_mtok": 20.0}],
    },
    "reverse/large": {"input_per_mtok": 3.0, "output_per_mtok": 6.0, "context_window": 200_000},
}


class ReverseProvider:
    """A third-party provider: answers with the user's text reversed, and says what its models cost."""

    name = "reverse"

    def __init__(self, input_tokens: int = 10) -> None:
        self.input_tokens = input_tokens

    def claims(self, model: str) -> bool:
        return model.startswith("reverse/")

    def models(self) -> list[str]:
        return list(REVERSE_MODELS)

    def model_info(self, model: str) -> dict[str, Any] | None:
        return REVERSE_MODELS.get(model)

    async def stream(self, request: ProviderRequest) -> AsyncIterator[ProviderEvent]:
        text = request.messages[-1].text[::-1]
        yield TextDelta(text)
        usage = TokenUsage(input_tokens=self.input_tokens, output_tokens=100)
        yield ProviderFinish("stop", usage, ChatMessage("assistant", [TextPart(text)]))


class ReversePlugin:
    def __init__(self, provider: ReverseProvider | None = None) -> None:
        self.provider = provider or ReverseProvider()

    @hookimpl
    def register_providers(self, register: Callable[[Any], None], config: Config) -> None:
        register(self.provider)


def reverse_config(tmp_path: Path, pricing: str = "") -> Config:
    return make_config(tmp_path, '[models]\ndefault = "reverse/small"\n' + pricing)


async def listed(config: Config, *plugins: object) -> dict[str, dict[str, Any]]:
    async with gateway_client(config, *plugins) as client:
        models = (await (await client.get("/api/models")).json())["models"]
        v1 = await (await client.get("/v1/models")).json()
    assert {m["id"] for m in v1["data"]} >= {"reverse/small", "reverse/large"}
    return {m["id"]: m for m in models}


async def test_the_provider_describes_its_models_in_the_model_lists(tmp_path: Path) -> None:
    models = await listed(reverse_config(tmp_path), ReversePlugin())
    small = models["reverse/small"]
    assert (small["inputPerMTok"], small["outputPerMTok"], small["priceKnown"]) == (1.0, 2.0, True)
    assert (small["contextWindow"], small["maxOutputTokens"]) == (32_000, 4_000)
    assert (small["supportsTools"], small["supportsVision"], small["supportsReasoning"]) == (True, True, False)
    assert small["deprecationDate"] == "2099-01-01" and small["deprecated"] is False
    assert models["reverse/large"]["contextWindow"] == 200_000


async def test_pricing_patterns_exact_first_then_the_longest_match(tmp_path: Path) -> None:
    pricing = """
[pricing."reverse/*"]
input_per_mtok = 5.0
[pricing."reverse/l*"]
output_per_mtok = 7.0
[pricing."reverse/large"]
context_window = 100000
"""
    models = await listed(reverse_config(tmp_path, pricing), ReversePlugin())
    small, large = models["reverse/small"], models["reverse/large"]
    assert (small["inputPerMTok"], small["outputPerMTok"]) == (5.0, 2.0)  # the pattern over the provider
    # The exact id wins, alone: its table sets only the context window; the provider's prices stay.
    assert (large["inputPerMTok"], large["outputPerMTok"], large["contextWindow"]) == (3.0, 6.0, 100_000)


async def test_the_longest_pattern_wins(tmp_path: Path) -> None:
    pricing = '[pricing."reverse/*"]\ninput_per_mtok = 5.0\n[pricing."reverse/l*"]\ninput_per_mtok = 9.0\n'
    models = await listed(reverse_config(tmp_path, pricing), ReversePlugin())
    assert models["reverse/large"]["inputPerMTok"] == 9.0 and models["reverse/small"]["inputPerMTok"] == 5.0


async def records(config: Config, plugin: ReversePlugin) -> list[dict[str, Any]]:
    async with gateway_client(config, plugin) as client:
        resp = await client.post(
            "/api/chat",
            json={
                "id": "c1",
                "trigger": "submit-message",
                "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "Hello"}]}],
            },
        )
        assert "olleH" in await resp.text()
        return list(await client.server.app[state.REGISTRY].usage.records())


async def test_usage_records_are_priced_by_the_provider_with_its_long_context_tier(tmp_path: Path) -> None:
    [short] = await records(reverse_config(tmp_path / "a"), ReversePlugin(ReverseProvider(input_tokens=10)))
    assert short["priceKnown"] is True
    assert short["inputCost"] == pytest.approx(10 * 1.0 / 1e6) and short["outputCost"] == pytest.approx(100 * 2.0 / 1e6)
    [long] = await records(reverse_config(tmp_path / "b"), ReversePlugin(ReverseProvider(input_tokens=2000)))
    assert long["inputCost"] == pytest.approx(2000 * 10.0 / 1e6) and long["outputCost"] == pytest.approx(
        100 * 20.0 / 1e6
    )


@pytest.mark.parametrize(
    ("key", "problem"),
    [("*", "literal provider prefix"), ("rev*/x", "literal provider prefix"), ("reverse/[ab", "unclosed '['")],
)
def test_a_malformed_pattern_is_a_config_error_naming_the_key(tmp_path: Path, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as e:
        make_config(tmp_path, f'[pricing."{key}"]\ninput_per_mtok = 1.0\n')
    assert f'pricing."{key}"' in str(e.value.message) and problem in e.value.message
    assert str(tmp_path / "agentspace.toml") in e.value.message


async def test_a_pattern_no_provider_serves_stops_the_start(tmp_path: Path) -> None:
    config = reverse_config(tmp_path, '[pricing."nowhere/*"]\ninput_per_mtok = 1.0\n')
    with pytest.raises(ConfigError, match=r'pricing\."nowhere/\*": no registered provider serves \'nowhere\''):
        async with gateway_client(config, ReversePlugin()):
            pass
    async with gateway_client(
        reverse_config(tmp_path, '[pricing."reverse/*"]\ninput_per_mtok = 1.0\n'), ReversePlugin()
    ):
        pass


def test_a_malformed_model_info_names_the_provider(tmp_path: Path) -> None:
    from agentspace.pricing import provided_info

    class Wrong(ReverseProvider):
        def model_info(self, model: str) -> dict[str, Any] | None:
            return {"input_per_mtok": "cheap"}

    with pytest.raises(ConfigError, match=r"provider 'reverse': model_info\('reverse/small'\)\.input_per_mtok"):
        provided_info([Wrong()], "reverse/small")


def test_agentspace_models_lists_what_the_installed_echo_provider_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``agentspace models`` through click's runner with an installed provider plugin (echo) and a pattern."""
    monkeypatch.setenv("AGENTSPACE_LOAD_PLUGINS", "echo")
    (tmp_path / "agentspace.toml").write_text(
        '[models]\ndefault = "echo/echo"\n[pricing."echo/*"]\ninput_per_mtok = 0.5\noutput_per_mtok = 0.25\n'
        "supports_vision = true\n"
    )
    import agentspace.plugins

    monkeypatch.setattr(agentspace.plugins, "_pm", None)  # the process's manager: made again with echo
    result = CliRunner().invoke(main, ["--config", str(tmp_path / "agentspace.toml"), "models", "--json"])
    assert result.exit_code == 0, result.output
    models = {m["id"]: m for m in json.loads(result.stdout)}
    assert models["echo/reasoning"]["inputPerMTok"] == 0.5 and models["echo/reasoning"]["supportsVision"] is True
    assert "echo/*" not in models
    result = CliRunner().invoke(main, ["--config", str(tmp_path / "agentspace.toml"), "models"])
    header, _, *rows = result.stdout.splitlines()
    row = next(r for r in rows if r.startswith("echo/reasoning "))
    assert header.split()[-3:] == ["tools", "vision", "deprecation"]
    assert row.split()[1:4] == ["echo", "0.5", "0.25"]
    vision = header.index("vision")
    assert row[vision : vision + 3] == "yes"  # from the pattern


async def test_metrics_label_the_models_a_pricing_pattern_names(tmp_path: Path) -> None:
    from agentspace.default_plugins import metrics

    config = reverse_config(tmp_path, '[pricing."reverse/*"]\ninput_per_mtok = 1.0\n')
    async with gateway_client(config, ReversePlugin(), metrics) as client:
        resp = await client.post(
            "/api/chat",
            json={
                "id": "c1",
                "trigger": "submit-message",
                "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "Hello"}]}],
            },
        )
        body = await resp.text()
        text = await (await client.get("/metrics")).text()
    assert "olleH" in body, body
    assert 'endpoint="http",model="reverse/small"} 1.0' in text  # labelled, not "other"


async def test_budget_reservations_and_usage_records_use_the_provider_prices_and_patterns(tmp_path: Path) -> None:
    """A client's budget reserves each call at what the provider (or a ``[pricing]`` pattern) says the model
    costs, for the ``max_tokens`` sent; its usage records are priced the same way."""
    config = reverse_config(tmp_path, '[pricing."reverse/l*"]\ninput_per_mtok = 30.0\noutput_per_mtok = 60.0\n')
    async with gateway_client(config, ReversePlugin()) as client:
        created = await client.post("/api/clients", json={"name": "team", "budgetUsd": 0.1, "period": "total"})
        assert created.status in (200, 201), await created.text()
        headers = {"Authorization": f"Bearer {(await created.json())['key']}"}

        async def complete(model: str, max_tokens: int) -> Any:
            body = {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "Hi"}]}
            return await client.post("/v1/chat/completions", json=body, headers=headers)

        # 2,000 output tokens: $0.004 at the provider's $2/MTok for reverse/small, admitted; $0.12 at the
        # pattern's $60/MTok for reverse/large (the provider says $6), past the $0.10 budget.
        assert (await complete("reverse/small", 2000)).status == 200
        refused = await complete("reverse/large", 2000)
        assert refused.status != 200
        assert "may cost up to $0.12" in (await refused.json())["error"]["message"]
        assert (await complete("reverse/large", 100)).status == 200
        stored = {r["model"]: r for r in await client.server.app[state.REGISTRY].usage.records()}
    assert len(stored) == 2  # the refused call reached no provider: no record
    small, large = stored["reverse/small"], stored["reverse/large"]
    assert (small["inputCost"], small["outputCost"]) == (pytest.approx(10 * 1.0 / 1e6), pytest.approx(100 * 2.0 / 1e6))
    assert (large["inputCost"], large["outputCost"]) == (pytest.approx(10 * 30.0 / 1e6), pytest.approx(100 * 60 / 1e6))


class TinyWindow(ReverseProvider):
    def model_info(self, model: str) -> dict[str, Any] | None:
        return {"input_per_mtok": 1.0, "output_per_mtok": 2.0, "context_window": 300}


async def test_the_context_window_policy_uses_the_window_the_provider_gives(tmp_path: Path) -> None:
    """``[chat] context_policy = "refuse"``: a 400-word message does not fit the provider's 300-token window
    (less the 100 output tokens asked), and fits once a ``[pricing]`` pattern gives the model a larger one."""
    chat = '[chat]\ncontext_policy = "refuse"\nmax_tokens = 100\n'
    message = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "word " * 400}]}
    for name, pricing, fits in (
        ("own", "", False),
        ("pattern", '[pricing."reverse/*"]\ncontext_window = 100000\n', True),
    ):
        config = reverse_config(tmp_path / name, chat + pricing)
        async with gateway_client(config, ReversePlugin(TinyWindow())) as client:
            resp = await client.post("/api/chat", json={"id": "c1", "trigger": "submit-message", "messages": [message]})
            body = await resp.text()
        if fits:
            assert '"type":"error"' not in body and "drow" in body, body
        else:
            assert "reverse/small takes 200 (300 in its window, minus 100 for the answer)" in body, body


class KeyedReverse(ReverseProvider):
    """Needs a key: ``missing_key`` as docs/plugins.md shows it; answers with the key's last characters."""

    async def missing_key(self, model: str, api_key: str | None, base_url: str | None) -> bool:
        return base_url is None and not api_key

    async def stream(self, request: ProviderRequest) -> AsyncIterator[ProviderEvent]:
        text = f"key ...{(request.api_key or '')[-4:]}"
        yield TextDelta(text)
        yield ProviderFinish("stop", TokenUsage(10, 5), ChatMessage("assistant", [TextPart(text)]))


async def test_a_plugin_provider_gets_its_key_from_the_environment_or_says_how_to_add_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REVERSE_API_KEY", raising=False)
    body = {"model": "reverse/small", "messages": [{"role": "user", "content": "Hi"}]}
    async with gateway_client(reverse_config(tmp_path), ReversePlugin(KeyedReverse())) as client:
        missing = "Reverse API key not configured. Run: agentspace keys add reverse"
        refused = await client.post("/v1/chat/completions", json=body)
        assert refused.status == 424, await refused.text()  # as for a built-in provider without its key
        assert (await refused.json())["error"] == {
            "message": missing,
            "type": "server_error",
            "param": None,
            "code": "no_api_key",
        }
        ws = await client.ws_connect("/gateway")
        await ws.send_json({"type": "chat.send", "id": "r1", "content": "Hi"})
        frame = await ws.receive_json()
        assert (frame["type"], frame["code"], frame["message"]) == ("error", "NO_API_KEY", missing)
        await ws.close()
        monkeypatch.setenv("REVERSE_API_KEY", "rk-test-1234")
        answered = await client.post("/v1/chat/completions", json=body)
        assert (await answered.json())["choices"][0]["message"]["content"] == "key ...1234"


async def test_a_plugin_provider_without_its_key_has_its_models_unlisted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a built-in provider's models are listed only with its key: not in /v1/models nor the web app's list
    (GET /api/models) while ``missing_key`` says a call would fail for want of one."""
    monkeypatch.delenv("REVERSE_API_KEY", raising=False)

    async def ids(client: Any) -> tuple[set[str], set[str]]:
        v1 = await (await client.get("/v1/models")).json()
        app = await (await client.get("/api/models")).json()
        return {m["id"] for m in v1["data"]}, {m["id"] for m in app["models"]}

    async with gateway_client(reverse_config(tmp_path), ReversePlugin(KeyedReverse())) as client:
        v1, app = await ids(client)
        assert not {i for i in v1 | app if i.startswith("reverse/")}, (v1, app)
        monkeypatch.setenv("REVERSE_API_KEY", "rk-test-1234")
        v1, app = await ids(client)
        assert {"reverse/small", "reverse/large"} <= v1 & app
