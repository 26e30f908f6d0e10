"""Prices and capabilities from litellm's bundled model cost map, with config overrides.

The map is read as a JSON file from litellm's package folder, never fetched and without importing
litellm (which takes seconds). An unknown model gets the configured fallback price and ``price_known``
False, so it is flagged in reports instead of silently costing zero.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

from .config import Config
from .types import ModelInfo

log = logging.getLogger(__name__)

COST_MAP_FILE = "model_prices_and_context_window_backup.json"


@lru_cache(maxsize=1)
def cost_map() -> dict[str, dict[str, Any]]:
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        log.warning("litellm is not installed; every model uses the fallback price")
        return {}
    path = Path(next(iter(spec.submodule_search_locations))) / COST_MAP_FILE
    with path.open(encoding="utf-8") as f:
        data: dict[str, dict[str, Any]] = json.load(f)
    data.pop("sample_spec", None)
    return data


def cost_entry(model: str, modes: tuple[str, ...] | None = None) -> dict[str, Any] | None:
    """The cost-map entry of ``provider/model`` (litellm keys Anthropic and OpenAI models without prefix), or
    None; with ``modes``, only an entry of one of those modes (an entry without one is a chat model's)."""
    entries = cost_map()
    prefix, _, name = model.partition("/")
    for key in (model, name):
        entry = entries.get(key)
        if entry is not None and (modes is None or entry.get("mode", "chat") in modes):
            provider = entry.get("litellm_provider", "")
            if key == model or provider == prefix or provider.startswith(prefix):
                return entry
    return None


def _lookup(model: str) -> dict[str, Any] | None:
    """The cost-map entry of a model we can chat with."""
    return cost_entry(model, ("chat", "responses"))


def _per_mtok(entry: dict[str, Any], key: str, default: float = 0.0) -> float:
    value = entry.get(key)
    return round(float(value) * 1_000_000, 9) if isinstance(value, (int, float)) else default


def model_info(config: Config, model: str) -> ModelInfo:
    """Price and capabilities for a model id; config ``[pricing."MODEL"]`` wins over the cost map."""
    entry = _lookup(model) or {}
    override = config.pricing.get(model, {})
    known = bool(entry) and "input_cost_per_token" in entry or "input_per_mtok" in override
    fallback_in = float(config["models"]["fallback_input_per_mtok"])
    fallback_out = float(config["models"]["fallback_output_per_mtok"])
    input_price = _per_mtok(entry, "input_cost_per_token", fallback_in if not known else 0.0)
    info = ModelInfo(
        id=model,
        provider=model.partition("/")[0],
        input_per_mtok=input_price,
        output_per_mtok=_per_mtok(entry, "output_cost_per_token", fallback_out if not known else 0.0),
        cache_read_per_mtok=_per_mtok(entry, "cache_read_input_token_cost", input_price),
        cache_write_per_mtok=_per_mtok(entry, "cache_creation_input_token_cost", input_price),
        context_window=entry.get("max_input_tokens") or entry.get("max_tokens"),
        max_output_tokens=entry.get("max_output_tokens"),
        supports_reasoning=bool(entry.get("supports_reasoning")),
        # Models that reject {"type": "enabled", budget_tokens} and take only adaptive thinking.
        adaptive_thinking_only=bool(entry.get("supports_adaptive_thinking"))
        and not entry.get("supports_legacy_thinking", False)
        and bool(entry.get("thinking_always_on") or entry.get("supports_sampling_params") is False),
        supports_tools=bool(entry.get("supports_function_calling")),
        deprecation_date=entry.get("deprecation_date"),
        price_known=known,
        cache_write_1h_per_mtok=_per_mtok(entry, "cache_creation_input_token_cost_above_1hr", 0.0) or None,
        prompt_cache_min_tokens=entry.get("prompt_cache_min_tokens"),
    )
    for key in ("input_per_mtok", "output_per_mtok", "cache_read_per_mtok", "cache_write_per_mtok"):
        if key in override:
            setattr(info, key, float(override[key]))
    if "input_per_mtok" in override and "cache_read_per_mtok" not in override and not entry:
        info.cache_read_per_mtok = info.cache_write_per_mtok = info.input_per_mtok
    if "context_window" in override:
        info.context_window = override["context_window"]
    if "supports_reasoning" in override:
        info.supports_reasoning = override["supports_reasoning"]
    if "supports_tools" in override:
        info.supports_tools = override["supports_tools"]
    return info


def accepts_adaptive_thinking(model: str) -> bool:
    """Whether the cost map says ``model`` takes ``{"type": "adaptive"}`` thinking (the form to send it)."""
    entry = _lookup(model)
    return bool(entry and entry.get("supports_adaptive_thinking"))


def known_models(prefixes: set[str] | None = None) -> list[str]:
    """Every chat model id of the cost map as ``provider/model``, optionally only some providers."""
    out = []
    for key, entry in cost_map().items():
        if entry.get("mode") != "chat":
            continue
        provider = entry.get("litellm_provider", "")
        if prefixes is not None and provider not in prefixes:
            continue
        out.append(key if key.startswith(provider + "/") else f"{provider}/{key}")
    return sorted(set(out))
