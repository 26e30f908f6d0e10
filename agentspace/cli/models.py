"""``agentspace models``: the models usable with this config and these keys, with prices and capabilities."""

from __future__ import annotations

import json
from datetime import date
from typing import TYPE_CHECKING, Any

import click

from .common import CliState, pass_state, table

if TYPE_CHECKING:
    from ..config import Config

# Providers whose cost-map models `--all` lists whether or not a key is set.
MAIN_PROVIDERS = ("anthropic", "openai", "gemini")


def _plugin_models(config: "Config") -> dict[str, str]:
    """Models listed by provider plugins that have a ``models()`` method (e.g. the keyless echo provider)."""
    from ..plugins import get_plugin_manager

    providers: list[Any] = []
    try:
        get_plugin_manager().hook.register_providers(register=providers.append, config=config)
    except Exception as e:  # list what the cost map knows even when a plugin is broken
        click.secho(f"agentspace: provider plugins not loaded: {type(e).__name__}: {e}", err=True, fg="yellow")
    out: dict[str, str] = {}
    for provider in providers:
        lister = getattr(provider, "models", None)
        if not callable(lister):
            continue
        for model in lister():
            model_id = getattr(model, "id", model)
            out[str(model_id)] = getattr(provider, "name", str(model_id).partition("/")[0])
    return out


def usable_models(config: "Config", *, include_all: bool = False) -> list[dict[str, Any]]:
    """One dict per model (camelCase, as ``--json`` prints): the key-gated prefixes, plugin models, config."""
    from ..pricing import known_models, model_info
    from ..vault import KeyVault, resolve_key

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
    ids.update(_plugin_models(config))

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


def _price(value: float, known: bool) -> str:
    return f"{value:g}" + ("" if known else "*")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.option("--all", "include_all", is_flag=True, help="Every known Anthropic, OpenAI and Gemini chat model, keys or not.")
@pass_state
def models(state: CliState, as_json: bool, include_all: bool) -> None:
    """Models you can use now: provider, price per million tokens, context window, capabilities."""
    config = state.config()
    items = usable_models(config, include_all=include_all)
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return
    if not items:
        click.echo("No usable models: no provider key is set. Add one: agentspace keys add anthropic "
                   "(or see every known model: agentspace models --all)")
        return
    rows = [
        (
            m["id"] + (" (default)" if m["default"] else ""), m["provider"],
            _price(m["inputPerMTok"], m["priceKnown"]), _price(m["outputPerMTok"], m["priceKnown"]),
            f"{m['contextWindow']:,}" if m["contextWindow"] else "?",
            "yes" if m["supportsReasoning"] else "", "yes" if m["supportsTools"] else "",
            (m["deprecationDate"] or "") + (" DEPRECATED" if m["deprecated"] else ""),
        )
        for m in items
    ]
    click.echo(table(("model", "provider", "in $/MTok", "out $/MTok", "context", "reasoning", "tools", "deprecation"),
                     rows, right=(2, 3, 4)))
    notes = []
    if any(not m["priceKnown"] for m in items):
        notes.append('* price unknown: the fallback price is used; set [pricing."MODEL"] for exact costs.')
    if any(m["deprecated"] for m in items):
        notes.append("DEPRECATED models still answer for now; using one logs a warning.")
    if notes:
        click.echo("\n" + "\n".join(notes))
