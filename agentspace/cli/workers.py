"""``agentspace serve --workers N``: N server processes on one port (SO_REUSEPORT), one machine's cores
serving one gateway. Each worker is a replica: allowed only when the storage backend is shared
by several processes and Redis shares streams, locks and aborts between them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from typing import Any

import click

from ..config import Config
from .common import CliState


def check_shared(config: Config) -> None:
    """ClickException unless the configuration lets several processes serve together."""
    from ..default_plugins.storage import open_storage

    storage = open_storage(config)
    if not storage.shared:
        # The usual slip: the config with the postgres backend was not passed (serve --workers N alone).
        which = "no config file was given (--config FILE)" if config.source == "<defaults>" else f"in {config.source}"
        raise click.ClickException(
            f"--workers needs a storage backend several processes can share; [storage] backend = "
            f'"{storage.backend}" ({which}) keeps its data in one process. Use backend = "postgres" (see README, '
            '"Running several replicas", and docs/deploy.md).'
        )
    if not config["storage"]["redis_url"]:
        raise click.ClickException(
            "--workers needs [storage] redis_url: the workers share running streams, stream locks and aborts "
            "through Redis."
        )


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def run_workers(state: CliState, config: Config, workers: int) -> int:
    """Start the workers, pass SIGINT/SIGTERM on to them, and return the worst exit code."""
    check_shared(config)
    host = str(config["server"]["host"])
    port = int(config["server"]["port"]) or _free_port(host)  # --port 0: one port, the same for every worker
    command = [sys.executable, "-m", "agentspace"]
    if state.config_path:
        command += ["--config", state.config_path]
    command += ["--data-dir", str(config.data_dir), "serve", "--host", host, "--port", str(port), "--reuse-port"]
    children = [subprocess.Popen(command, env=os.environ.copy()) for _ in range(workers)]

    def forward(signum: int, _frame: Any) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [child.wait() for child in children]
    return max(codes, key=abs)
