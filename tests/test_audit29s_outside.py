"""The path a new team walks, tried from outside once more (issue 29): what the README and docs/deploy.md set up
(``serve --workers N`` on PostgreSQL and Redis), looked at the way a team's tools look at it."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
from click.testing import CliRunner

from agentspace.cli import main
from scripts.harness import ROOT, GatewayProcess
from tests.fakes import anthropic_upstream as fa
from tests.scale_servers import TOKEN, Redis, flush_redis
from tests.test_secrets_files import NOBODY
from tests.test_worker_crash import HEADERS, start_workers, stop, unbuffered, workers_of

CALLS = 10


def requests_total(text: str) -> float:
    """The sum of ``agentspace_requests_total`` over its label sets in a scrape."""
    return sum(float(m) for m in re.findall(r"^agentspace_requests_total\{[^}]*\} (\S+)$", text, re.M))


def catches_sigterm(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.M).group(1), 16)  # type: ignore[union-attr]
    return bool(caught & (1 << (signal.SIGTERM - 1)))


async def scrape(url: str) -> str:
    async with aiohttp.ClientSession(headers=HEADERS) as http, http.get(url + "/metrics") as resp:  # a new connection
        assert resp.status == 200
        return await resp.text()


async def test_metrics_of_workers_count_every_workers_calls_whichever_answers_the_scrape(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic, pg_dsn: str, redis_srv: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """deploy.md's unit runs ``serve --workers 2`` and the README's scrape config reads ``/metrics`` from the port:
    each scrape reached one worker (SO_REUSEPORT), which answered its own counters, so the series jumped between
    the workers' figures (Prometheus saw counter resets; no label told the workers apart)."""
    monkeypatch.setenv("AGENTSPACE_GATEWAY_TOKEN", TOKEN)  # the workers' environment is the test's (child_env)
    await flush_redis(redis_srv)
    storage = {"backend": "postgres", "dsn": pg_dsn, "redis_url": redis_srv.url}
    layout = GatewayProcess(tmp_path / "data", fake_anthropic.url, storage=storage)
    layout.data_dir.mkdir(parents=True)
    process, url = await start_workers(layout, load_plugins="metrics")
    try:
        body = {"model": "claude-sonnet-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "Hi"}]}
        for _ in range(CALLS):  # a connection each: the kernel spreads them over both workers
            async with aiohttp.ClientSession(headers=HEADERS) as http, http.post(url + "/v1/messages", json=body) as r:
                assert r.status == 200, await r.text()
        # Every scrape, whichever worker answers it, counts every worker's calls.
        assert [requests_total(await scrape(url)) for _ in range(8)] == [CALLS] * 8
        text = await scrape(url)
        assert 'agentspace_streams_in_flight{endpoint="anthropic"} 0.0' in text
        # A worker that dies leaves its calls in the sum; its replacement starts counting from there.
        killed = workers_of(process)[0]
        environ = Path(f"/proc/{killed}/environ").read_bytes().split(b"\0")
        shared = Path(next(v for v in environ if v.startswith(b"PROMETHEUS_MULTIPROC_DIR=")).split(b"=", 1)[1].decode())
        assert shared.is_dir()
        os.kill(killed, signal.SIGKILL)
        await layout.wait_for_log(f"worker {killed} stopped (killed by SIGKILL); starting another")
        assert process.stdout is not None
        while not (await asyncio.wait_for(process.stdout.readline(), 60)).startswith(b"agentspace listening on "):
            pass  # the replacement's banner: it counts (and stops) like the others
        assert [requests_total(await scrape(url)) for _ in range(4)] == [CALLS] * 4
    finally:
        assert await stop(process) == 0
    assert not shared.exists()  # the supervisor's directory goes with it


async def test_workers_stopped_while_they_start_exit_cleanly(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic, pg_dsn: str, redis_srv: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``systemctl stop`` (or Ctrl-C) in the seconds a worker takes to start: the worker, not yet listening for
    the signal the supervisor passed on, died of it, and ``serve --workers`` exited 241 (-SIGTERM): systemd
    marked the unit failed after a stop that lost nothing."""
    monkeypatch.setenv("AGENTSPACE_GATEWAY_TOKEN", TOKEN)
    storage = {"backend": "postgres", "dsn": pg_dsn, "redis_url": redis_srv.url}
    layout = GatewayProcess(tmp_path / "data", fake_anthropic.url, storage=storage)
    layout.data_dir.mkdir(parents=True)
    with open(layout.log_path, "ab") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agentspace", "serve", "--config", str(layout.config_path),
            "--port", "0", "--workers", "2",
            stdout=asyncio.subprocess.DEVNULL, stderr=log, env=unbuffered(layout.data_dir), cwd=ROOT,
        )  # fmt: skip
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        # The workers started, still importing (no handler for SIGTERM yet); the supervisor's handler is set.
        while len(workers_of(process)) < 2 or not catches_sigterm(process.pid):
            assert process.returncode is None and loop.time() < deadline, layout.log()
            await asyncio.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 60) == 0, layout.log()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_the_cli_without_the_servers_token_variable_says_so_instead_of_the_files_token(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server started with AGENTSPACE_GATEWAY_TOKEN (deploy.md's unit) still made a gateway-token file, and an
    admin shell without the variable got that file's token from ``agentspace token`` (and chat and ask sent
    it): every server refused it, 401."""
    monkeypatch.setenv("AGENTSPACE_GATEWAY_TOKEN", TOKEN)
    server = GatewayProcess(tmp_path / "data", fake_anthropic.url)
    url = await server.start()
    try:
        unset = {"AGENTSPACE_GATEWAY_TOKEN": None, "AGENTSPACE_CONFIG": None, "AGENTSPACE_HOME": None}
        data_dir = ["--data-dir", str(server.data_dir)]
        for args in (["token"], ["token", "--rotate"], ["ask", "--url", url, "Hello"]):
            result = await asyncio.to_thread(CliRunner().invoke, main, [*data_dir, *args], env=unset)
            assert result.exit_code == 1, (args, result.output)
            assert "takes its token from AGENTSPACE_GATEWAY_TOKEN, which is not set here" in result.output, args
        result = await asyncio.to_thread(CliRunner().invoke, main, [*data_dir, "token"])  # with the variable
        assert result.stdout.strip() == TOKEN
        assert await server.terminate() == 0
        monkeypatch.delenv("AGENTSPACE_GATEWAY_TOKEN")
        url = await server.start()  # the file's token again
        result = await asyncio.to_thread(CliRunner().invoke, main, [*data_dir, "token"], env=unset)
        assert result.exit_code == 0, result.output
        headers = {"Authorization": f"Bearer {result.stdout.strip()}"}
        async with aiohttp.ClientSession(headers=headers) as http, http.get(url + "/api/sessions") as resp:
            assert resp.status == 200
    finally:
        await server.aclose()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="a service user's files need root")
def test_root_on_a_service_users_data_directory_is_told_to_run_as_that_user(tmp_path: Path) -> None:
    """docs/deploy.md's admin shell is root's, the data directory the service user's. ``keys list``, ``models``
    and ``token`` there said the user's own keys.json or gateway-token "cannot be trusted" and advised removing
    it and adding the keys again, or ``token --rotate``: root-owned files the workers refuse at their next start."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "keys.json").write_text('{"anthropic": "sk-ant-service-key"}')
    (data / "gateway-token").write_text("service-token-0123456789abcdef\n")
    for path in (data, data / "keys.json", data / "gateway-token"):
        os.chmod(path, 0o700 if path == data else 0o600)
        os.chown(path, NOBODY, NOBODY)
    unset = {"AGENTSPACE_GATEWAY_TOKEN": None, "AGENTSPACE_CONFIG": None, "AGENTSPACE_HOME": None}
    for args, name in ((["keys", "list"], "keys.json"), (["models"], "keys.json"), (["token"], "gateway-token")):
        result = CliRunner().invoke(main, ["--data-dir", str(data), *args], env=unset)
        assert result.exit_code == 1, (args, result.output)
        assert f"{data / name} belongs to nobody" in result.output, result.output
        assert "runuser -u nobody -- agentspace" in result.output, result.output
        assert "--rotate" not in result.output and "remove it" not in result.output
    assert sorted(p.name for p in data.iterdir()) == ["gateway-token", "keys.json"]  # nothing of root's
