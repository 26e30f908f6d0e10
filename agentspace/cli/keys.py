"""``agentspace keys``: provider API keys in the vault. Values are never printed or echoed."""

from __future__ import annotations

import os
import re
import sys

import click

from .common import CliState, config_options, pass_state, table

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def stdin_is_terminal() -> bool:
    """Whether to prompt (hidden) or read a piped key; a function so tests can simulate a terminal."""
    return sys.stdin.isatty()


@click.group()
@config_options
def keys() -> None:
    """Manage provider API keys (stored 0600 in the data directory)."""


def as_the_owner(data_dir: str, command: str) -> None:
    """Root writing the vault of a data directory another user owns leaves a keys.json of root's, which that
    user's server refuses at its next start (docs/deploy.md runs ``keys`` as the service's user)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return
    from ..gateway_token import ADDRESS_FILE

    try:  # the user the server last ran as (its address file), else the directory's owner
        owner = os.stat(os.path.join(data_dir, ADDRESS_FILE)).st_uid
    except OSError:
        try:
            owner = os.stat(data_dir).st_uid
        except OSError:  # not made yet: the file will be root's in root's directory
            return
    if owner == 0:
        return
    import pwd

    try:
        user = pwd.getpwuid(owner).pw_name
    except KeyError:
        user = str(owner)
    raise click.ClickException(
        f"{data_dir} belongs to {user}, whose server would refuse a keys file written by root. Run it as "
        f"{user}: runuser -u {user} -- agentspace {command}"
    )


@keys.command("add")
@config_options
@click.argument("name")
@click.option(
    "--name",
    "entry",
    metavar="ENTRY",
    help="Store it as the vault entry ENTRY instead (another key of the provider, for a model group's deployment).",
)
@pass_state
def add(state: CliState, name: str, entry: str | None) -> None:
    """Store the key NAME (a provider prefix such as anthropic or openai).

    On a terminal the key is asked for without echo; otherwise one line is read from stdin:
    `printf %s "$KEY" | agentspace keys add openai`. With `--name team-2` it is stored as the entry team-2,
    which a deployment of a model group names (`key = "team-2"`, docs/routing.md).
    """
    from ..vault import KeyVault

    for value_, hint in ((name, "NAME"), (entry, "--name")):
        if value_ is not None and not NAME_RE.match(value_):
            raise click.BadParameter("use letters, digits, '-', '_' or '.' (e.g. anthropic)", param_hint=hint)
    provider, name = name, entry or name
    as_the_owner(str(state.data_dir), f"keys add {provider}" + (f" --name {entry}" if entry else ""))
    if stdin_is_terminal():
        label = name if name == provider else f"{provider} ({name})"
        value = click.prompt(f"API key for {label}", hide_input=True, default="", show_default=False)
    else:
        value = sys.stdin.readline()
    value = value.strip()
    if not value:
        raise click.ClickException("No key given; nothing was saved.")
    state.say_data_dir()
    vault = KeyVault(state.data_dir)
    vault.set(name, value)
    click.echo(f"Saved key '{name}' to {vault.path}")


@keys.command("list")
@config_options
@pass_state
def list_keys(state: CliState) -> None:
    """Stored keys (masked) and the environment variables used as fallback."""
    from ..vault import DEFAULT_ENV_VARS, KeyVault, env_var, key_name, mask

    config = state.config()
    state.say_data_dir()
    stored = KeyVault(config.data_dir).masked()
    rows = [(name, value, "vault") for name, value in stored.items()]
    prefixes = sorted(set(DEFAULT_ENV_VARS) | set(config.providers) | set(stored))
    for prefix in prefixes:
        var = env_var(config, prefix)
        value = os.environ.get(var)
        if value:
            note = f"env {var}" + (" (unused: the vault has a key)" if key_name(config, prefix) in stored else "")
            rows.append((prefix, mask(value), note))
    if not rows:
        click.echo("No keys stored and no provider key variables set. Add one: agentspace keys add anthropic")
        return
    click.echo(table(("name", "key", "source"), rows))


@keys.command("remove")
@config_options
@click.argument("name")
@pass_state
def remove(state: CliState, name: str) -> None:
    """Delete the stored key NAME."""
    from ..vault import KeyVault

    state.say_data_dir()
    as_the_owner(str(state.data_dir), f"keys remove {name}")
    if not KeyVault(state.data_dir).remove(name):
        raise click.ClickException(f"No key named '{name}' in the vault. See: agentspace keys list")
    click.echo(f"Removed key '{name}'")


@keys.command("path")
@config_options
@pass_state
def path(state: CliState) -> None:
    """Print the path of keys.json."""
    from ..vault import KeyVault

    click.echo(KeyVault(state.data_dir).path)
