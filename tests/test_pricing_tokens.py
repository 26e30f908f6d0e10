"""Prices and capabilities from litellm's bundled cost map, config overrides, the unknown-model fallback,
and offline token estimates."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from agentspace.config import parse_config
from agentspace.pricing import known_models, model_info
from agentspace.tokens import count_tokens
from agentspace.types import TokenUsage


def test_known_model_prices_and_capabilities() -> None:
    info = model_info(parse_config({}), "anthropic/claude-sonnet-4-5")
    assert (info.input_per_mtok, info.output_per_mtok) == (3.0, 15.0)
    assert (info.cache_read_per_mtok, info.cache_write_per_mtok) == (0.3, 3.75)
    assert info.supports_reasoning and info.supports_tools and info.price_known
    assert info.context_window == 200_000
    cost = info.cost(TokenUsage(input_tokens=1_000_000, output_tokens=100_000, cache_read_tokens=10_000))
    assert cost.input_cost == pytest.approx(3.0 + 0.003) and cost.output_cost == pytest.approx(1.5)

    openai = model_info(parse_config({}), "openai/gpt-4o-mini")
    assert openai.price_known and openai.input_per_mtok == pytest.approx(0.15)
    assert "openai/gpt-4o-mini" in known_models({"openai"})


def test_unknown_model_gets_the_fallback_price_and_is_flagged() -> None:
    config = parse_config({"models": {"fallback_input_per_mtok": 9, "fallback_output_per_mtok": 27}})
    info = model_info(config, "openai/model-from-the-future")
    assert info.price_known is False
    assert (info.input_per_mtok, info.output_per_mtok) == (9.0, 27.0)
    assert info.cost(TokenUsage(input_tokens=1000, output_tokens=1000)).total_cost > 0  # never silently free


def test_config_overrides_the_cost_map() -> None:
    config = parse_config(
        {
            "pricing": {
                "anthropic/claude-sonnet-4-5": {"input_per_mtok": 1.0, "output_per_mtok": 2.0},
                "local/my-model": {
                    "input_per_mtok": 0,
                    "output_per_mtok": 0,
                    "context_window": 8192,
                    "supports_reasoning": True,
                },
            }
        }
    )
    sonnet = model_info(config, "anthropic/claude-sonnet-4-5")
    assert (sonnet.input_per_mtok, sonnet.output_per_mtok) == (1.0, 2.0)
    assert sonnet.cache_read_per_mtok == 0.3  # not overridden: still the cost map's
    local = model_info(config, "local/my-model")
    assert local.price_known and local.cost(TokenUsage(5000, 5000)).total_cost == 0
    assert local.context_window == 8192 and local.supports_reasoning


def test_cost_map_and_tokens_work_offline_without_importing_litellm(tmp_path: os.PathLike[str]) -> None:
    """A fresh process with no tiktoken cache and no network: estimates and prices still work, litellm stays unloaded."""
    code = (
        "import sys\n"
        "from agentspace.config import parse_config\n"
        "from agentspace.pricing import model_info\n"
        "from agentspace.tokens import count_tokens\n"
        "assert model_info(parse_config({}), 'anthropic/claude-sonnet-4-5').price_known\n"
        "print(count_tokens('Hello, world! This is a test.'))\n"
        "assert 'litellm' not in sys.modules, 'litellm was imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TIKTOKEN_CACHE_DIR"}
    # Any download attempt would go to a dead proxy and fail.
    env.update({"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "TMPDIR": str(tmp_path)})
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 3


def test_count_tokens() -> None:
    assert count_tokens("") == 0
    assert 0 < count_tokens("The quick brown fox jumps over the lazy dog.") < 15
    assert count_tokens("<|endoftext|>") > 0  # special tokens in user text are plain text, not an error


def test_long_texts_are_counted_once_and_told_apart() -> None:
    """A long text's count is remembered (a session's history is counted again every turn); a different text
    of the same length gets its own count."""
    from agentspace import tokens

    text = "alpha beta gamma delta " * 400
    other = "alpha-beta-gamma-delta " * 400
    assert len(text) == len(other) >= tokens.CACHED_CHARS
    exact = len(tokens._encoding().encode(text, disallowed_special=()))
    assert count_tokens(text) == exact
    assert (len(text), hash(text)) in tokens._cache
    assert count_tokens(text) == exact  # from the cache
    assert count_tokens(other) == len(tokens._encoding().encode(other, disallowed_special=())) != exact
