"""Prices and capabilities of models: litellm's bundled cost map, then what the model's provider says
(its optional ``model_info(model)`` method), then the config's ``[pricing]``; each later source wins for the
keys it sets (docs/plugins.md, "Model info").

``[pricing]`` keys are exact ids or patterns (``"reverse/*"``): the exact id wins, else the longest matching
pattern. The map is read as a JSON file from litellm's package folder, never fetched and without importing
litellm (which takes seconds). An unknown model gets the configured fallback price and ``price_known``
False, so it is flagged in reports instead of silently costing zero.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import logging
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, is_pattern, validate_model_table
from .providers.base import claims
from .types import ModelInfo, PriceTier

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


# The cost map's modes of the models a chat can use: chat models, and OpenAI's Responses-only models (gpt-5.3-codex,
# gpt-5-pro, o3-pro: the models Codex users pick), which litellm calls through the provider's Responses API.
CHAT_MODES = ("chat", "responses")


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
    """The cost-map entry of a model we can chat with, or of an embedding model (/v1/embeddings prices it)."""
    return cost_entry(model, (*CHAT_MODES, "embedding"))


def _per_mtok(entry: dict[str, Any], key: str, default: float = 0.0) -> float:
    value = entry.get(key)
    return round(float(value) * 1_000_000, 9) if isinstance(value, (int, float)) else default


def config_entry(config: Config, model: str) -> dict[str, Any]:
    """The ``[pricing]`` table for ``model``: its exact id, else the longest pattern matching it, else {}."""
    exact = config.pricing.get(model)
    if exact is not None:
        return exact
    best: str | None = None
    for key in config.pricing:
        if is_pattern(key) and fnmatch.fnmatchcase(model, key) and (best is None or len(key) > len(best)):
            best = key
    return config.pricing[best] if best is not None else {}


def provided_info(providers: Iterable[Any], model: str) -> dict[str, Any]:
    """What the provider serving ``model`` says of it (its optional ``model_info(model)``), checked; {} when
    it says nothing. A malformed answer raises ``ConfigError`` naming the provider."""
    for provider in providers:
        if not claims(provider, model):
            continue
        describe = getattr(provider, "model_info", None)
        if not callable(describe):
            return {}
        answer = describe(model)
        if answer is None:
            return {}
        if not isinstance(answer, Mapping):
            name = getattr(provider, "name", type(provider).__name__)
            raise ConfigError(f"provider {name!r}", f"model_info({model!r})", f"expected a dict, got {answer!r}")
        return validate_model_table(f"provider {getattr(provider, 'name', '?')!r}", f"model_info({model!r})", answer)
    return {}


def _tiers_from_cost_map(entry: dict[str, Any]) -> tuple[PriceTier, ...]:
    """``input_cost_per_token_above_200k_tokens`` and the like, as tiers."""
    tiers = []
    for key in entry:
        if not (key.startswith("input_cost_per_token_above_") and key.endswith("k_tokens")):
            continue
        size = key.removeprefix("input_cost_per_token_above_").removesuffix("k_tokens")
        if not size.isdigit():
            continue
        suffix = f"_above_{size}k_tokens"
        tiers.append(
            PriceTier(
                above_input_tokens=int(size) * 1000,
                input_per_mtok=_per_mtok(entry, key),
                output_per_mtok=_per_mtok(
                    entry, "output_cost_per_token" + suffix, _per_mtok(entry, "output_cost_per_token")
                ),
                cache_read_per_mtok=_per_mtok(entry, "cache_read_input_token_cost" + suffix) or None,
                cache_write_per_mtok=_per_mtok(entry, "cache_creation_input_token_cost" + suffix) or None,
            )
        )
    return tuple(sorted(tiers, key=lambda t: t.above_input_tokens))


def _service_tiers(entry: dict[str, Any]) -> dict[str, tuple[float, float, float]]:
    """The cost map's prices of OpenAI's service tiers (``input_cost_per_token_priority`` and so on)."""
    tiers = {}
    for tier in ("priority", "flex"):
        if f"input_cost_per_token_{tier}" in entry:
            input_price = _per_mtok(entry, f"input_cost_per_token_{tier}", 0.0)
            tiers[tier] = (
                input_price,
                _per_mtok(entry, f"output_cost_per_token_{tier}", _per_mtok(entry, "output_cost_per_token", 0.0)),
                _per_mtok(entry, f"cache_read_input_token_cost_{tier}", input_price),
            )
    return tiers


def _geo_multipliers(entry: dict[str, Any]) -> dict[str, float]:
    """What running in a geography costs on top, from the cost map's ``provider_specific_entry`` (Anthropic's
    US-only inference: ``{"us": 1.1}``): its two-letter keys, the geographies (others are a speed's, ``fast``,
    or facts of other providers' entries)."""
    specific = entry.get("provider_specific_entry")
    if not isinstance(specific, dict):
        return {}
    return {
        geo.lower(): float(m)
        for geo, m in specific.items()
        if isinstance(geo, str)
        and len(geo) == 2
        and geo.isalpha()
        and isinstance(m, (int, float))
        and not isinstance(m, bool)
    }


def model_info(config: Config, model: str, provided: Mapping[str, Any] | None = None) -> ModelInfo:
    """Price and capabilities for a model id: the cost map, then ``provided`` (what the model's provider says
    of it, ``provided_info``), then the config's ``[pricing]`` entry (``config_entry``)."""
    entry = _lookup(model) or {}
    override = {**(provided or {}), **config_entry(config, model)}
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
        supports_vision=bool(entry.get("supports_vision")),
        supports_pdf_input=bool(entry.get("supports_pdf_input")),
        long_context=_tiers_from_cost_map(entry),
        cache_write_1h_per_mtok=_per_mtok(entry, "cache_creation_input_token_cost_above_1hr", 0.0) or None,
        prompt_cache_min_tokens=entry.get("prompt_cache_min_tokens"),
    )
    if not ("input_per_mtok" in override or "output_per_mtok" in override):  # set prices are the prices
        info.service_tiers = _service_tiers(entry)
        info.geo_multipliers = _geo_multipliers(entry)
    for key in ("input_per_mtok", "output_per_mtok", "cache_read_per_mtok", "cache_write_per_mtok"):
        if key in override:
            setattr(info, key, float(override[key]))
    if "input_per_mtok" in override and "cache_read_per_mtok" not in override and not entry:
        info.cache_read_per_mtok = info.cache_write_per_mtok = info.input_per_mtok
    for key in (
        "context_window",
        "max_output_tokens",
        "supports_reasoning",
        "supports_tools",
        "supports_vision",
        "supports_pdf_input",
        "deprecation_date",
    ):
        if key in override:
            setattr(info, key, override[key])
    if "long_context" in override:
        info.long_context = tuple(_tier(t) for t in override["long_context"])
    for tool in ("web_search", "web_fetch", "code_execution"):
        if f"{tool}_per_use" in override:
            info.server_tool_per_use[tool] = float(override[f"{tool}_per_use"])
    return info


def _tier(table: Mapping[str, Any]) -> PriceTier:
    def price(key: str) -> float | None:
        return None if table.get(key) is None else float(table[key])

    return PriceTier(
        above_input_tokens=int(table["above_input_tokens"]),
        input_per_mtok=float(table["input_per_mtok"]),
        output_per_mtok=float(table["output_per_mtok"]),
        cache_read_per_mtok=price("cache_read_per_mtok"),
        cache_write_per_mtok=price("cache_write_per_mtok"),
    )


def unserved_patterns(config: Config, providers: Iterable[Any]) -> list[str]:
    """The ``[pricing]`` patterns whose provider prefix no registered provider serves (a config error)."""
    providers = list(providers)
    listed: list[str] = []  # a provider may claim only the ids it lists (``claims(m): return m in MODELS``)
    for provider in providers:
        try:
            listed += [str(m) for m in provider.models()] if callable(getattr(provider, "models", None)) else []
        except Exception:  # a broken ``models`` is reported where the lists are built
            pass
    out = []
    for key in config.pricing:
        if not is_pattern(key):
            continue
        prefix = key.partition("/")[0]
        sample = f"{prefix}/any-model"
        if not any(claims(p, sample) for p in providers) and not any(m.startswith(f"{prefix}/") for m in listed):
            out.append(key)
    return out


def accepts_adaptive_thinking(model: str) -> bool:
    """Whether the cost map says ``model`` takes ``{"type": "adaptive"}`` thinking (the form to send it)."""
    entry = _lookup(model)
    return bool(entry and entry.get("supports_adaptive_thinking"))


def known_models(prefixes: set[str] | None = None) -> list[str]:
    """Every chat model id of the cost map (``CHAT_MODES``) as ``provider/model``, optionally only some providers."""
    out = []
    for key, entry in cost_map().items():
        if entry.get("mode") not in CHAT_MODES:
            continue
        provider = entry.get("litellm_provider", "")
        if prefixes is not None and provider not in prefixes:
            continue
        out.append(key if key.startswith(provider + "/") else f"{provider}/{key}")
    return sorted(set(out))
