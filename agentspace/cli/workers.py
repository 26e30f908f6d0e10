"""``agentspace serve --workers N``: N server processes on one port (SO_REUSEPORT), one machine's cores
serving one gateway. Each worker is a replica: allowed only when the storage backend is shared
by several processes and Redis shares streams, locks and aborts between them. A worker that dies (killed,
crashed) is replaced, and the supervisor says so on stderr."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import click

from ..config import Config
from .common import CliState

POLL_SECONDS = 0.2  # how often the supervisor looks at its workers
RESTART_WINDOW_SECONDS = 60.0
RESTARTS_PER_WORKER = 3  # replacements per worker within the window before it gives up on them


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


def _ending(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def run_workers(state: CliState, config: Config, workers: int) -> int:
    """Start the workers, start another in place of one that dies (killed, crashed: not one that stopped
    cleanly), pass SIGINT/SIGTERM on to them, and return the worst exit code."""
    check_shared(config)
    host = str(config["server"]["host"])
    port = int(config["server"]["port"]) or _free_port(host)  # --port 0: one port, the same for every worker
    command = [sys.executable, "-m", "agentspace"]
    if state.config_path:
        command += ["--config", state.config_path]
    command += ["--data-dir", str(config.data_dir), "serve", "--host", host, "--port", str(port), "--reuse-port"]
    # GET /metrics reaches any one worker: each writes its numbers here and answers the sum of all of them
    # (prometheus_client's multiprocess mode). A new directory per start: the counters start from zero, as a
    # single process's do.
    metrics_dir = tempfile.mkdtemp(prefix="agentspace-metrics-")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    try:
        return _supervise(command, env, metrics_dir, workers)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _supervise(command: list[str], env: dict[str, str], metrics_dir: str, workers: int) -> int:
    children = [subprocess.Popen(command, env=env) for _ in range(workers)]
    stopping = False

    def forward(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    started: list[float] = []  # when replacements started: a worker that keeps dying is not started again and again
    given_up: set[int] = set()
    while not stopping and any(child.poll() is None for child in children):
        for i, child in enumerate(children):
            code = child.poll()
            if code is None or code == 0 or stopping or i in given_up:
                continue
            now = time.monotonic()
            started = [t for t in started if now - t < RESTART_WINDOW_SECONDS]
            if len(started) >= workers * RESTARTS_PER_WORKER:
                click.echo(f"agentspace: worker {child.pid} stopped ({_ending(code)}); it keeps stopping, so no "
                           "other is started in its place", err=True)  # fmt: skip
                given_up.add(i)
                _forget_streams(child.pid, metrics_dir)
                continue
            # Its calls in flight are posted by the other workers once their leases lapse (docs/accounting.md);
            # the new worker posts what the dead one's journal still holds as it starts.
            click.echo(f"agentspace: worker {child.pid} stopped ({_ending(code)}); starting another", err=True)
            _forget_streams(child.pid, metrics_dir)
            children[i] = subprocess.Popen(command, env=env)
            started.append(now)
        time.sleep(POLL_SECONDS)
    codes = [child.wait() for child in children]
    if stopping:  # a worker still starting when the stop came dies of the signal passed on: a clean stop too
        codes = [0 if code in (-signal.SIGTERM, -signal.SIGINT) else code for code in codes]
    return max(codes, key=abs)


def _forget_streams(pid: int, metrics_dir: str) -> None:
    """A dead worker's gauges (its streams in flight) leave the sum; its counters stay in it."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, metrics_dir)
