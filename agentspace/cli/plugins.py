"""``agentspace plugins``: installed plugins and the hooks each implements, as JSON."""

from __future__ import annotations

import json

import click


@click.command()
@click.option("--all", "include_builtins", is_flag=True, help="Include the built-in plugins.")
def plugins(include_builtins: bool) -> None:
    """List installed plugins and their hooks (JSON)."""
    from ..plugins import describe_plugins, get_plugin_manager

    click.echo(json.dumps(describe_plugins(get_plugin_manager(), include_builtins=include_builtins), indent=2))
