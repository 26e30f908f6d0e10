"""``agentspace serve``: validate the config, then hand over to the server."""

from __future__ import annotations

import click

from .common import CliState, config_options, pass_state


@click.command()
@config_options
@click.option("--host", help="Interface to bind (default: [server] host, 127.0.0.1).")
@click.option("--port", type=click.IntRange(0, 65535), help="Port (default: [server] port, 3271).")
@click.option(
    "--workers",
    type=click.IntRange(1, 256),
    default=1,
    show_default=True,
    help="Server processes sharing the port (SO_REUSEPORT); more than 1 needs a shared storage backend "
    '([storage] backend = "postgres") and [storage] redis_url.',
)
@click.option("--reuse-port", is_flag=True, hidden=True, help="Bind with SO_REUSEPORT (a worker of --workers).")
@pass_state
def serve(state: CliState, host: str | None, port: int | None, workers: int, reuse_port: bool) -> None:
    """Run the gateway (WebSocket /gateway and HTTP on one port)."""
    config = state.config()  # a config error stops here, before anything binds
    if not reuse_port:  # which data directory (token, vault, stores): `agentspace token` must find the same
        state.say_data_dir()
    if host is not None:
        config.values["server"]["host"] = host
    if port is not None:
        config.values["server"]["port"] = port
    if workers > 1:
        from .workers import run_workers

        raise SystemExit(run_workers(state, config, workers))
    from ..errors import StorageError
    from ..gateway_token import check_secrets
    from ..server import run_server  # aiohttp and the providers load only when serving
    from ..storage.datadir_lock import DataDirLocked

    check_secrets(config.data_dir)  # a damaged or foreign secrets file stops here, in one line
    try:
        if reuse_port:  # a worker of --workers
            run_server(config, host=config["server"]["host"], port=config["server"]["port"], reuse_port=True)
        else:
            run_server(config, host=config["server"]["host"], port=config["server"]["port"])
    except DataDirLocked as e:
        raise click.ClickException(str(e)) from None
    except StorageError as e:  # the storage backend cannot start: the database is unreachable, no dsn
        raise click.ClickException(e.message) from None
    except OSError as e:  # binding failed: the port is taken or the address is not ours
        where = f"{config['server']['host']}:{config['server']['port']}"
        raise click.ClickException(
            f"cannot listen on {where}: {e.strerror or e}. Pick another --port or --host."
        ) from None
