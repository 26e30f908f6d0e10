"""``agentspace plugins``: installed plugins and the hooks each implements, as JSON."""

from __future__ import annotations

import json

import click

from .common import CliState, config_options, pass_state


@click.command()
@config_options
@click.option("--all", "include_builtins", is_flag=True, help="Include the built-in plugins.")
@pass_state
def plugins(state: CliState, include_builtins: bool) -> None:
    """List installed plugins and their hooks (JSON)."""
    state.config()  # a broken config (e.g. a [plugins.NAME] table) is reported here, as by every command
    from ..plugins import describe_plugins, get_plugin_manager

    click.echo(json.dumps(describe_plugins(get_plugin_manager(), include_builtins=include_builtins), indent=2))
