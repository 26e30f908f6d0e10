"""``agentspace plugins``: installed plugins and the hooks each implements, as JSON; ``plugins new`` writes
a new plugin package."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .common import CliState, config_options, pass_state


@click.group(invoke_without_command=True)
@config_options
@click.option("--all", "include_builtins", is_flag=True, help="Include the built-in plugins.")
@pass_state
@click.pass_context
def plugins(ctx: click.Context, state: CliState, include_builtins: bool) -> None:
    """List installed plugins and their hooks (JSON); `plugins new` starts a plugin."""
    if ctx.invoked_subcommand is not None:
        return
    state.config()  # a broken config (e.g. a [plugins.NAME] table) is reported here, as by every command
    from ..plugins import describe_plugins, get_plugin_manager

    click.echo(json.dumps(describe_plugins(get_plugin_manager(), include_builtins=include_builtins), indent=2))


@plugins.command(name="new")
@click.argument("name")
@click.option(
    "--kind",
    type=click.Choice(("provider", "sink", "section", "command", "route")),
    required=True,
    help="What the plugin adds.",
)
@click.option(
    "--dir",
    "parent",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Folder to write the package agentspace-NAME into.",
)
def new(name: str, kind: str, parent: Path) -> None:
    """Write a plugin package agentspace-NAME (pyproject, module, tests, README) that installs and passes
    its tests; its README says what to change."""
    from importlib.metadata import entry_points

    from ..plugins import ENTRY_POINT_GROUP, OPTIONAL_PLUGINS
    from ..scaffold import ScaffoldError, module_name, write_package
    from . import BUILTIN_COMMANDS

    if name in OPTIONAL_PLUGINS:  # AGENTSPACE_LOAD_PLUGINS=NAME would select the built-in and this one together
        raise click.ClickException(f"{name!r} is the name of a built-in plugin; choose another name")
    if kind == "command" and name in BUILTIN_COMMANDS:  # `agentspace NAME` runs the built-in
        raise click.ClickException(f"'agentspace {name}' is a built-in command; choose another name")
    taken = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if taken:  # two plugins of one name stop the start: say so now, not after the install
        dist = taken[0].dist.name if taken[0].dist is not None else taken[0].value
        raise click.ClickException(f"the installed package {dist!r} has a plugin named {name!r}; choose another name")
    try:
        root = write_package(name, kind, parent)
    except ScaffoldError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"Wrote {root}/ ({kind} plugin {name!r}, module {module_name(name)}.py). Next:")
    click.echo(f"  cd {root} && pip install -e '.[test]' && pytest && agentspace plugins")
