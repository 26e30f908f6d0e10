"""Real PostgreSQL and Redis servers for the scale-out tests, started from the distribution's packages.

PostgreSQL runs as the ``postgres`` user (initdb refuses root) in a temporary directory, Redis with no
persistence; each on a free port of 127.0.0.1, stopped by its PID. Tests skip when a server is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scripts.harness import GatewayProcess


def _ephemeral_ports() -> range:
    """The kernel's range for port-0 binds and outgoing connections."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


_given: set[int] = set()


def free_port() -> int:
    """A port nothing is bound to, for a server started on it later (or stopped and started again on it), or for
    a URL nothing answers: outside the kernel's ephemeral range, which every port-0 bind and outgoing connection
    on the machine draws from, so none of them can take it meanwhile."""
    ephemeral = _ephemeral_ports()
    spare = range(20000, ephemeral.start) if ephemeral.start > 21000 else range(ephemeral.stop, 65536)
    pick = random.SystemRandom()  # not the test's seeded `random`: concurrent runs must not pick alike
    for _ in range(100):
        port = pick.choice(spare)
        if port in _given:  # picked already (two ports for servers not started yet)
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            _given.add(port)
            return port
    with socket.socket() as s:  # the spare range is crowded: an ephemeral one
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pg_bindir() -> Path | None:
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(out)
    return path if (path / "initdb").exists() else None


def _as_postgres() -> dict[str, object]:
    """Keyword arguments for subprocess to run a command as the postgres user when we are root."""
    if os.geteuid() != 0:
        return {}
    user = pwd.getpwnam("postgres")
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port}")


class Postgres:
    """A PostgreSQL server: ``dsn`` for the database ``agentspace``; ``stop``/``start`` to take it down and
    back (the data stays)."""

    def __init__(self) -> None:
        bindir = pg_bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL (initdb) is not installed")
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="agentspace-pg-"))
        os.chmod(self.root, 0o777)
        self.data = self.root / "data"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        kw = _as_postgres()
        subprocess.run(
            [str(bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"],
            check=True,
            capture_output=True,
            **kw,  # type: ignore[arg-type]
        )
        self.start()
        subprocess.run(
            [str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "agentspace"],
            check=True,
            capture_output=True,
        )

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/agentspace"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                str(self.bindir / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-h",
                "127.0.0.1",
                "-k",
                str(self.root),
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "log", "ab"),  # noqa: SIM115 - the child keeps it
            **_as_postgres(),  # type: ignore[arg-type]
        )
        _wait_port(self.port)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # accepting connections, not just listening
            ok = subprocess.run(
                [str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)], capture_output=True
            )
            if ok.returncode == 0:
                return
            time.sleep(0.1)
        raise TimeoutError("PostgreSQL did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown: clients are disconnected
            self.proc.wait(timeout=30)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class Redis:
    def __init__(self, snapshot_dir: Path | None = None) -> None:
        """``snapshot_dir``: where ``SAVE`` writes its snapshot, which a restart loads (else nothing persists)."""
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed")
        self.exe = exe
        self.port = free_port()
        self.snapshot_dir = snapshot_dir
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                *(["--dir", str(self.snapshot_dir)] if self.snapshot_dir is not None else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_port(self.port)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def kill(self) -> None:
        """SIGKILL: everything it held is lost (no persistence); ``start`` brings an empty one back."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@contextlib.contextmanager
def postgres_server() -> Iterator[Postgres]:
    server = Postgres()
    try:
        yield server
    finally:
        server.close()


@contextlib.contextmanager
def redis_server() -> Iterator[Redis]:
    server = Redis()
    try:
        yield server
    finally:
        server.close()


# --- pytest fixtures (tests/conftest.py loads this module as a plugin) ---------------------------

# The gateway token two replicas share (AGENTSPACE_GATEWAY_TOKEN).
TOKEN = "replica-test-token-0123456789abcdef"


async def flush_redis(redis_srv: Redis) -> None:
    """Empty the session's Redis: each test of replicas starts from nothing."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_srv.url)
    await client.flushall()
    await client.aclose()


try:
    import pytest
except ImportError:  # imported by a benchmark, not by pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture(scope="session")
    def pg_server() -> Iterator[Postgres]:
        if pg_bindir() is None:
            pytest.skip("PostgreSQL is not installed (pg_config --bindir)")
        with postgres_server() as server:
            yield server

    @pytest.fixture(scope="session")
    def redis_srv() -> Iterator[Redis]:
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed")
        with redis_server() as server:
            yield server

    _databases = iter(range(1, 1_000_000))

    @pytest.fixture
    def pg_dsn(pg_server: Postgres) -> str:
        """A fresh, empty database on the session's server."""
        name = f"t{next(_databases)}"
        subprocess.run(
            [str(pg_server.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(pg_server.port), "-U", "postgres", name],
            check=True,
            capture_output=True,
        )
        return f"postgresql://postgres@127.0.0.1:{pg_server.port}/{name}"

    @pytest.fixture
    def lease_seconds() -> float | None:
        """The replicas' ``[storage] lease_seconds``: the default, unless a test that waits for a dead replica's
        lease to lapse parametrizes a shorter one."""
        return None

    @pytest.fixture
    async def replicas(
        tmp_path: Path,
        fake_anthropic: Any,
        pg_dsn: str,
        redis_srv: Redis,
        monkeypatch: pytest.MonkeyPatch,
        lease_seconds: float | None,
    ) -> AsyncIterator[list[GatewayProcess]]:
        monkeypatch.setenv("AGENTSPACE_GATEWAY_TOKEN", TOKEN)  # the replicas agree on the token
        await flush_redis(redis_srv)
        from scripts.harness import GatewayProcess

        storage: dict[str, Any] = {"backend": "postgres", "dsn": pg_dsn, "redis_url": redis_srv.url}
        if lease_seconds is not None:
            storage["lease_seconds"] = lease_seconds
        servers = [GatewayProcess(tmp_path / name, fake_anthropic.url, storage=storage) for name in ("a", "b")]
        try:
            await asyncio.gather(*(s.start() for s in servers))
            yield servers
        finally:
            for server in servers:
                if server.process is not None and server.process.returncode is None:
                    await server.terminate()
