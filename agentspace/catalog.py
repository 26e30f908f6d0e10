"""The model catalog: which models are usable with this config, these keys and these provider plugins.

Shared by ``agentspace models`` and ``GET /api/models`` so both list the same models.
"""

from __future__ import annotations

import asyncio
import difflib
import functools
import logging
import re
from collections.abc import Callable, Iterable
from datetime import date
from typing import Any

from .config import Config, is_pattern
from .logs import warn_limited
from .pricing import CHAT_MODES, cost_entry, known_models, model_info, provided_info
from .providers.base import claims, lacks_key
from .vault import KeyVault, resolve_key

log = logging.getLogger(__name__)

# Providers whose cost-map models `--all` lists whether or not a key is set.
MAIN_PROVIDERS = ("anthropic", "openai", "gemini")


def plugin_models(providers: Iterable[Any]) -> dict[str, str]:
    """Models listed by providers that have a ``models()`` method (e.g. the keyless echo provider)."""
    out: dict[str, str] = {}
    for provider in providers:
        lister = getattr(provider, "models", None)
        if not callable(lister):
            continue
        try:
            answer = lister()
            if isinstance(answer, str):  # list("echo/echo") would list each of its letters as a model
                raise TypeError(f"models() returned a str, {answer!r}, not a list of ids")
            listed = list(answer)
        except Exception as e:  # a plugin's bug leaves its models unlisted; its calls (``claims``) still work
            name = getattr(provider, "name", type(provider).__name__)
            warn_limited(
                log, f"models:{name}", "provider %r could not list its models: %s: %s", name, type(e).__name__, e
            )
            continue
        for model in listed:
            model_id = getattr(model, "id", model)
            out[str(model_id)] = getattr(provider, "name", str(model_id).partition("/")[0])
    return out


def usable_models(config: Config, providers: Iterable[Any] = (), *, include_all: bool = False) -> list[dict[str, Any]]:
    """One dict per model (camelCase, as ``--json`` prints): the key-gated prefixes, plugin models, config."""
    providers = list(providers)
    default = config["models"]["default"]
    candidates = set(MAIN_PROVIDERS) | set(config.providers) | set(KeyVault(config.data_dir).names())
    candidates.add(default.partition("/")[0])
    usable = {p for p in candidates if p in config.providers or resolve_key(config, p)}
    prefixes = usable | (set(MAIN_PROVIDERS) if include_all else set())

    ids: dict[str, str] = {m: m.partition("/")[0] for m in known_models(prefixes)} if prefixes else {}
    for prefix in prefixes & set(config.providers):
        ids.update({m if "/" in m else f"{prefix}/{m}": prefix for m in config.provider_settings(prefix)["models"]})
    for model in [*(m for m in config.pricing if not is_pattern(m)), default, *config["models"]["fallbacks"]]:
        if model.partition("/")[0] in prefixes:
            ids.setdefault(model, model.partition("/")[0])
    ids.update(plugin_models(providers))

    today = date.today().isoformat()
    plugin_ids = set(plugin_models(providers))
    out = []
    for model_id, provider in sorted(ids.items()):
        try:
            provided = provided_info(providers, model_id)
        except Exception as e:  # listed with what the other sources know, and its author told why
            warn_limited(log, f"model_info:{model_id}", "the provider of %s could not describe it: %s", model_id, e)
            provided = {}
        info = model_info(config, model_id, provided)
        deprecation = info.deprecation_date
        retired = is_retired(deprecation, today)
        # Past its date the model no longer answers; the configured default stays listed (flagged) so the
        # user sees what to change. Entries that are not chat models (speech, music) are never listed.
        if retired and not include_all and model_id != default:
            continue
        if model_id not in plugin_ids and not is_chat_model(model_id):
            continue
        out.append(
            {
                "id": model_id,
                "provider": provider,
                "inputPerMTok": info.input_per_mtok,
                "outputPerMTok": info.output_per_mtok,
                "contextWindow": info.context_window,
                "supportsReasoning": info.supports_reasoning,
                "supportsTools": info.supports_tools,
                "supportsVision": info.supports_vision,
                "maxOutputTokens": info.max_output_tokens,
                "deprecationDate": deprecation,
                "deprecated": retired,
                "priceKnown": info.price_known,
                "default": model_id == default,
            }
        )
    return [*group_models(config), *out]


async def without_keyless_plugin_models(
    config: Config, providers: Iterable[Any], models: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """``models`` less the plugin models whose provider's ``missing_key`` says a call would fail for want of a
    key, as a built-in provider's models are listed only with its key (``usable_models``)."""
    providers = list(providers)
    listed = plugin_models(providers)
    served = {
        str(model["id"]): serving
        for model in models
        if str(model["id"]) in listed
        and (serving := next((p for p in providers if claims(p, str(model["id"]))), None)) is not None
    }
    keys: dict[str, str | None] = {}
    for prefix in {model_id.partition("/")[0] for model_id in served}:  # the vault is a file: off the event loop
        keys[prefix] = await asyncio.to_thread(resolve_key, config, prefix)

    async def keyless(model_id: str, serving: Any) -> bool:
        prefix = model_id.partition("/")[0]
        base_url = config.provider_settings(prefix)["base_url"]
        return await lacks_key(serving, model_id, keys[prefix], base_url)  # one that raises: listed

    # Asked all at once: a plugin whose check hangs holds the list for its timeout once, not once per model.
    lacking = await asyncio.gather(*(keyless(model_id, serving) for model_id, serving in served.items()))
    unlisted = {model_id for model_id, lacks in zip(served, lacking, strict=True) if lacks}
    return [model for model in models if str(model["id"]) not in unlisted]


def group_models(config: Config) -> list[dict[str, Any]]:
    """The model groups (``[models.groups]``): priced and described by their dearest deployment, which is
    what a call to the group reserves, with the context window and output limit of their smallest (what
    every deployment takes); ``deployments`` names what serves it."""
    out = []
    for name, group in sorted(config.groups.items()):
        infos = [model_info(config, d.model) for d in group.deployments]
        info = max(infos, key=lambda i: (i.output_per_mtok, i.input_per_mtok))
        out.append(
            {
                "id": name,
                "provider": "group",
                "inputPerMTok": info.input_per_mtok,
                "outputPerMTok": info.output_per_mtok,
                "contextWindow": min((i.context_window for i in infos if i.context_window), default=None),
                "maxOutputTokens": min((i.max_output_tokens for i in infos if i.max_output_tokens), default=None),
                "supportsReasoning": all(i.supports_reasoning for i in infos),
                "supportsTools": all(i.supports_tools for i in infos),
                "supportsVision": all(i.supports_vision for i in infos),
                "deprecationDate": None,
                "deprecated": False,
                "priceKnown": all(i.price_known for i in infos),
                "default": name == config["models"]["default"],
                "deployments": [d.id for d in group.deployments],
                "strategy": group.strategy,
            }
        )
    return out


def is_chat_model(model: str) -> bool:
    """False for cost-map entries that are not chat models: another ``mode``, or no text out (speech, music)."""
    entry = cost_entry(model)
    if entry is None:
        return True  # not in the cost map (local servers, config models): the user named it
    outputs = entry.get("supported_output_modalities")
    return entry.get("mode", "chat") in CHAT_MODES and (not outputs or "text" in outputs)


def is_retired(deprecation_date: str | None, today: str | None = None) -> bool:
    """Whether ``deprecation_date`` (ISO, the day the provider retires the model) has come."""
    return bool(deprecation_date) and str(deprecation_date) <= (today or date.today().isoformat())


def deprecation_message(model: str, deprecation_date: str | None, today: str | None = None) -> str | None:
    """What to tell a user of ``model`` about its deprecation date, or None when it has none."""
    if not deprecation_date:
        return None
    if is_retired(deprecation_date, today):
        alternative = current_alternative(model, today)
        use = f"; use a current model such as {alternative}" if alternative else "; see: agentspace models"
        return f"{model} is past its deprecation date ({deprecation_date}) and may no longer answer{use}"
    return f"{model} will be retired on {deprecation_date}"


# Version-like tokens of a model name ("4", "2.5") and date stamps ("20250929", "2024-08-06").
_VERSION = re.compile(r"^\d+(?:\.\d+)*$")
_DATED = re.compile(r"-(?:\d{8}|\d{4}-\d{2}-\d{2})$")
# Release stages: not part of the family, and never suggested as a replacement.
_STAGES = frozenset({"preview", "latest", "exp", "experimental"})


def _family(name: str) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """``claude-sonnet-4-5`` -> (("claude", "sonnet"), (4, 5)): the family, and the version within it."""
    tokens = _DATED.sub("", name).split("-")
    family = tuple(t for t in tokens if not _VERSION.match(t) and t not in _STAGES)
    version = tuple(float(part) for t in tokens if _VERSION.match(t) for part in t.split("."))
    return family, version


def current_alternative(model: str, today: str | None = None) -> str | None:
    """A model of the same provider and family that is not past its deprecation date: the next version
    after ``model`` (the closest replacement), else the newest; undated stable releases only, None if none."""
    prefix, _, name = model.partition("/")
    family, version = _family(name)
    candidates = []
    for other in known_models({prefix}):
        other_name = other.partition("/")[2]
        entry = cost_entry(other)
        if other == model or _DATED.search(other_name) or entry is None or not is_chat_model(other):
            continue
        if _STAGES & set(other_name.split("-")):
            continue
        other_family, other_version = _family(other_name)
        if other_family == family and not is_retired(entry.get("deprecation_date"), today):
            candidates.append((other_version, other))
    if not candidates:
        return None
    newer = sorted(c for c in candidates if c[0] > version)
    return newer[0][1] if newer else max(candidates)[1]


@functools.lru_cache(maxsize=64)
def _listed(prefix: str | None) -> tuple[str, ...]:
    """The cost map's chat models (of one provider prefix, or all): fixed for the life of the process."""
    return tuple(known_models(None if prefix is None else {prefix}))


def closest(model: str, extra: Iterable[str] = (), allowed: Callable[[str], bool] | None = None) -> str | None:
    """The known model id closest to ``model`` (the cost map's and ``extra``; those ``allowed`` only), or None."""
    prefix = model.partition("/")[0]
    candidates = [*extra, *(_listed(prefix) or _listed(None))]
    if allowed is not None:
        candidates = [c for c in candidates if allowed(c)]
    close = difflib.get_close_matches(model, candidates, n=1, cutoff=0.75)
    return close[0] if close else None


def group_like(model: str, groups: Iterable[str], other: str | None = None) -> str | None:
    """The model group whose name ``model`` is closest to (as sent, or without a provider prefix), or None; None
    too when ``other`` (the closest model id) is at least as close to ``model``."""
    names = list(groups)
    for name in dict.fromkeys((model, model.split("/", 1)[-1])):
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.75)
        if close:
            if other is not None and _likeness(other, model) >= _likeness(close[0], name):
                return None
            return close[0]
    return None


def _likeness(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b).ratio()


def suggestion(model: str | None) -> str:
    """`` Did you mean 'x'?`` for a suggested model id, or ''."""
    return f" Did you mean {model!r}?" if model else ""


def unknown_model(config: Config, model: str, extra: Iterable[str] = ()) -> str | None:
    """Why ``model`` is a typo, or None: the cost map lists every model of the big providers, so a name of
    such a provider that it lacks is unknown, unless the model goes to a custom endpoint (``base_url``) or
    the config declares it (``[pricing]``, the provider's ``models``, the default or a fallback)."""
    prefix, _, name = model.partition("/")
    if not _listed(prefix) or model in config.pricing or cost_entry(model) is not None:
        return None
    settings = config.provider_settings(prefix)
    if {model, name} & set(settings["models"]):
        return None
    # A base_url may be a self-hosted server with models of its own names; Anthropic's is a proxy of the
    # same API (the same model names), so a name the cost map lacks is still a typo there.
    if settings["base_url"] and prefix != "anthropic":
        return None
    if prefix != "anthropic" and any(
        d.base_url and d.model == model for g in config.groups.values() for d in g.deployments
    ):  # a model group's deployment on its own endpoint, as a base_url above
        return None
    if model == config["models"]["default"] or model in config["models"]["fallbacks"]:
        return None
    return f"Unknown model {model!r}.{suggestion(closest(model, extra))} Run: agentspace models"
