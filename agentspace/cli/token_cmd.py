"""``agentspace token``: print or rotate the gateway token."""

from __future__ import annotations

import click

from .common import CliState, config_options, pass_state


@click.command()
@config_options
@click.option("--rotate", is_flag=True, help="Replace the token; the old one stops working.")
@pass_state
def token(state: CliState, rotate: bool) -> None:
    """Print the gateway token (created on first use)."""
    from ..gateway_token import TOKEN_ENV, check_file_token, client_token, env_token, rotate_token, token_path

    data_dir = state.data_dir
    if env_token() is not None:  # replicas started with the variable accept it, not the file
        if rotate:
            raise click.ClickException(
                f"The token comes from {TOKEN_ENV}: set a new value there and restart the servers."
            )
        click.echo(env_token())
        return
    state.say_data_dir()
    if rotate:
        check_file_token(data_dir)  # a new file would change nothing for a server that takes the variable
        click.echo(rotate_token(data_dir))
        click.echo(
            f"New token written to {token_path(data_dir)}. Running servers accept only the new token "
            "from now on; reconnect clients with it.",
            err=True,
        )
    else:
        click.echo(client_token(data_dir))
