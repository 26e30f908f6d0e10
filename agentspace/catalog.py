"""The model catalog: which models are usable with this config, these keys and these provider plugins.

Shared by ``agentspace models`` and ``GET /api/models`` so both list the same models.
"""

from __future__ import annotations

from datetime import date
from typing import Any, Iterable

from .config import Config
from .pricing import known_models, model_info
from .vault import KeyVault, resolve_key

# Providers whose cost-map models `--all` lists whether or not a key is set.
MAIN_PROVIDERS = ("anthropic", "openai", "gemini")


def plugin_models(providers: Iterable[Any]) -> dict[str, str]:
    """Models listed by providers that have a ``models()`` method (e.g. the keyless echo provider)."""
    out: dict[str, str] = {}
    for provider in providers:
        lister = getattr(provider, "models", None)
        if not callable(lister):
            continue
        for model in lister():
            model_id = getattr(model, "id", model)
            out[str(model_id)] = getattr(provider, "name", str(model_id).partition("/")[0])
    return out


def usable_models(config: Config, providers: Iterable[Any] = (), *, include_all: bool = False) -> list[dict[str, Any]]:
    """One dict per model (camelCase, as ``--json`` prints): the key-gated prefixes, plugin models, config."""
    default = config["models"]["default"]
    candidates = set(MAIN_PROVIDERS) | set(config.providers) | set(KeyVault(config.data_dir).names())
    candidates.add(default.partition("/")[0])
    usable = {p for p in candidates if p in config.providers or resolve_key(config, p)}
    prefixes = usable | (set(MAIN_PROVIDERS) if include_all else set())

    ids: dict[str, str] = {m: m.partition("/")[0] for m in known_models(prefixes)} if prefixes else {}
    for prefix in prefixes & set(config.providers):
        ids.update({m if "/" in m else f"{prefix}/{m}": prefix for m in config.provider_settings(prefix)["models"]})
    for model in [*config.pricing, default, *config["models"]["fallbacks"]]:
        if model.partition("/")[0] in prefixes:
            ids.setdefault(model, model.partition("/")[0])
    ids.update(plugin_models(providers))

    today = date.today().isoformat()
    out = []
    for model_id, provider in sorted(ids.items()):
        info = model_info(config, model_id)
        deprecation = info.deprecation_date
        out.append({
            "id": model_id,
            "provider": provider,
            "inputPerMTok": info.input_per_mtok,
            "outputPerMTok": info.output_per_mtok,
            "contextWindow": info.context_window,
            "supportsReasoning": info.supports_reasoning,
            "supportsTools": info.supports_tools,
            "deprecationDate": deprecation,
            "deprecated": bool(deprecation and deprecation <= today),
            "priceKnown": info.price_known,
            "default": model_id == default,
        })
    return out
