"""The ``agentspace`` command line: thin click commands over the library.

Start-up stays light (``agentspace usage`` is run in scripts and prompts): nothing heavy (aiohttp,
provider SDKs, litellm) is imported at module level, a built-in command's module is imported only when that
command runs (or commands are listed), and plugins, which may import anything, are loaded only when a command
that is not built in is asked for, or when commands are listed.
"""

from __future__ import annotations

import importlib

import click

from .common import CliState

# The built-in commands: name -> (module of this package, the command in it), imported on first need.
BUILTIN_COMMANDS = {
    "serve": ("serve", "serve"),
    "chat": ("chat", "chat"),
    "ask": ("ask", "ask"),
    "inspect": ("inspect_cmd", "inspect"),
    "usage": ("usage", "usage"),
    "sessions": ("sessions", "sessions"),
    "keys": ("keys", "keys"),
    "models": ("models", "models"),
    "plugins": ("plugins", "plugins"),
    "token": ("token_cmd", "token"),
    "clients": ("clients_cmd", "clients"),
    "storage": ("storage_cmd", "storage"),
    "doctor": ("doctor", "doctor"),
}


class AgentspaceGroup(click.Group):
    """A group whose built-in commands import on first need, and whose plugin commands (the
    ``register_commands`` hook) load when a name is not built in."""

    _plugins_loaded = False

    def load_plugin_commands(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        from ..plugins import get_plugin_manager

        before = dict(self.commands)
        try:
            get_plugin_manager().hook.register_commands(cli=self)
        except Exception as e:  # a broken plugin must not take the built-in commands down with it
            click.secho(
                f"agentspace: plugin commands not loaded: {type(e).__name__}: {e}\n"
                "  (AGENTSPACE_LOAD_PLUGINS=name,... selects which installed plugins load)",
                err=True,
                fg="yellow",
            )
        # A plugin's command named like a built-in one would replace it in `--help` (and in a process that loaded
        # the plugins) while `agentspace NAME` still runs the built-in: it is left out, and the author told.
        for name in BUILTIN_COMMANDS:
            command = self.commands.get(name)
            if command is None or command is before.get(name):
                continue
            if name in before:
                self.commands[name] = before[name]
            else:
                del self.commands[name]
            module = getattr(command.callback, "__module__", None) or "a plugin"
            click.secho(
                f"agentspace: the command {name!r} of {module} is named like a built-in command and is left out; "
                "rename it",
                err=True,
                fg="yellow",
            )

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None and cmd_name in BUILTIN_COMMANDS:
            module, name = BUILTIN_COMMANDS[cmd_name]
            command = getattr(importlib.import_module(f".{module}", __name__), name)
            self.add_command(command, cmd_name)
        if command is None:
            self.load_plugin_commands()
            command = super().get_command(ctx, cmd_name)
        return command

    def list_commands(self, ctx: click.Context) -> list[str]:
        self.load_plugin_commands()
        return sorted({*super().list_commands(ctx), *BUILTIN_COMMANDS})


@click.group(cls=AgentspaceGroup)
# The installed package's version, read when asked for: the package's __init__ names this package's helpers for
# plugins, so this package does not import it back (tests/test_import_graph.py).
@click.version_option(package_name="agentspace", prog_name="agentspace")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    envvar="AGENTSPACE_CONFIG",
    help="Config file (TOML). Env: AGENTSPACE_CONFIG.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    help="Data directory (vault, token, stores); overrides [storage] data_dir and AGENTSPACE_HOME.",
)
@click.pass_context
def main(ctx: click.Context, config_path: str | None, data_dir: str | None) -> None:
    """agentspace: a self-hosted, plugin-based LLM gateway."""
    state = ctx.ensure_object(CliState)
    state.config_path = config_path
    state.data_dir_override = data_dir


__all__ = ["main", "CliState"]
