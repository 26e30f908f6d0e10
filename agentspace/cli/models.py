"""``agentspace models``: the models usable with this config and these keys, with prices and capabilities."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import TYPE_CHECKING, Any

import click

from .common import CliState, config_options, pass_state, table

if TYPE_CHECKING:
    from ..config import Config


def _plugin_providers(config: Config) -> list[Any]:
    from ..plugins import PluginHookError, get_plugin_manager

    providers: list[Any] = []
    try:
        get_plugin_manager().hook.register_providers(register=providers.append, config=config)
    except PluginHookError:
        raise  # a misspelt hook: the plugin would silently do nothing, so nothing starts
    except Exception as e:  # list what the cost map knows even when a plugin is broken
        click.secho(f"agentspace: provider plugins not loaded: {type(e).__name__}: {e}", err=True, fg="yellow")
    return providers


def _price(value: float, known: bool) -> str:
    return f"{value:g}" + ("" if known else "*")


@click.command()
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.option(
    "--all",
    "include_all",
    is_flag=True,
    help="Every known Anthropic, OpenAI and Gemini chat model, keys or not, and models past their deprecation date.",
)
@pass_state
def models(state: CliState, as_json: bool, include_all: bool) -> None:
    """Models you can use now: provider, price per million tokens, context window, capabilities."""
    config = state.config()
    if sys.stderr.isatty():  # which models are usable depends on the keys of this data directory's vault
        state.say_data_dir()
    from ..catalog import usable_models, without_keyless_plugin_models

    providers = _plugin_providers(config)
    items = usable_models(config, providers, include_all=include_all)
    if not include_all:  # a plugin's models without the key its provider needs, as a built-in provider's
        items = asyncio.run(without_keyless_plugin_models(config, providers, items))
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return
    if not items:
        click.echo(
            "No usable models: no provider key is set. Add one: agentspace keys add anthropic "
            "(or see every known model: agentspace models --all)"
        )
        return
    rows = [
        (
            m["id"] + (" (default)" if m["default"] else ""),
            m["provider"],
            _price(m["inputPerMTok"], m["priceKnown"]),
            _price(m["outputPerMTok"], m["priceKnown"]),
            f"{m['contextWindow']:,}" if m["contextWindow"] else "?",
            "yes" if m["supportsReasoning"] else "",
            "yes" if m["supportsTools"] else "",
            "yes" if m["supportsVision"] else "",
            (m["deprecationDate"] or "") + (" DEPRECATED" if m["deprecated"] else ""),
        )
        for m in items
    ]
    click.echo(
        table(
            ("model", "provider", "in $/MTok", "out $/MTok", "context", "reasoning", "tools", "vision", "deprecation"),
            rows,
            right=(2, 3, 4),
        )
    )
    notes = []
    if any(not m["priceKnown"] for m in items):
        notes.append('* price unknown: the fallback price is used; set [pricing."MODEL"] for exact costs.')
    if any(m["deprecated"] for m in items):
        notes.append(
            "DEPRECATED: past its deprecation date; the provider may no longer serve it (listed only with "
            "--all, or as the configured default)."
        )
    if notes:
        click.echo("\n" + "\n".join(notes))
