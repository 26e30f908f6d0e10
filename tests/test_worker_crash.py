"""``agentspace serve --workers 2`` (PostgreSQL and Redis), one worker SIGKILLed with answers in flight, tried
from outside: the killed worker's calls are posted once (recovered, with the input the upstream reported) -- by
the worker started in its place, which reads its local journal, or by the survivor once their leases lapse --
and the next start counts nothing twice."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
from click.testing import CliRunner

from agentspace.cli import main as cli
from scripts.harness import ROOT, GatewayProcess, child_env
from tests.fakes import anthropic_upstream as fa
from tests.scale_servers import TOKEN, Redis, flush_redis
from tests.test_replicas import recorded

HEADERS = {"Authorization": f"Bearer {TOKEN}", "anthropic-version": "2023-06-01"}
MODEL = "anthropic/claude-sonnet-4-5"


async def start_workers(layout: GatewayProcess, load_plugins: str = "") -> tuple[asyncio.subprocess.Process, str]:
    """``serve --workers 2`` (with ``AGENTSPACE_LOAD_PLUGINS=load_plugins``); its URL once both workers listen."""
    with open(layout.log_path, "ab") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agentspace", "serve", "--config", str(layout.config_path),
            "--port", "0", "--workers", "2",
            stdout=asyncio.subprocess.PIPE, stderr=log, env=unbuffered(layout.data_dir, load_plugins), cwd=ROOT,
        )  # fmt: skip
    assert process.stdout is not None
    urls: list[str] = []
    lines: list[bytes] = []
    try:
        while len(urls) < 2:
            try:
                line = await asyncio.wait_for(process.stdout.readline(), 60)
            except TimeoutError:
                raise AssertionError(f"the workers did not start: {lines}\n{layout.log()[-5000:]}") from None
            assert line, layout.log()[-3000:]
            lines.append(line)
            # The two workers share this pipe: each banner line arrives whole, never mixed with another's.
            assert line.startswith((b"agentspace listening on ", b"Clients need the gateway token")), lines
            if b"listening on" in line:
                urls.append(line.split()[3].decode())
        assert len(set(urls)) == 1
    except BaseException:
        await stop(process)  # SIGTERM: the supervisor passes it on, no worker is left behind
        raise
    return process, urls[0]


def unbuffered(data_dir: Path, load_plugins: str = "") -> dict[str, str]:
    """The workers' environment with stdout unbuffered, where ``print`` writes a line and its newline apart."""
    return {**child_env(data_dir, load_plugins), "PYTHONUNBUFFERED": "1"}


def workers_of(process: asyncio.subprocess.Process) -> list[int]:
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    if not children.exists():
        pytest.skip("no /proc here to find the workers")
    return [int(pid) for pid in children.read_text().split()]


async def stop(process: asyncio.subprocess.Process) -> int:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(process.wait(), 60)


async def test_a_worker_killed_mid_stream_its_calls_are_posted_once(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic, pg_dsn: str, redis_srv: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTSPACE_GATEWAY_TOKEN", TOKEN)
    await flush_redis(redis_srv)
    # message_start reports 5000 input tokens; the stream pauses after 20 events, then ends.
    fake_anthropic.default = fa.text_response("tok " * 60, chunks=60, usage={"input_tokens": 5000}).stall(6, after=20)
    storage = {"backend": "postgres", "dsn": pg_dsn, "redis_url": redis_srv.url}
    layout = GatewayProcess(tmp_path / "data", fake_anthropic.url, storage=storage)  # writes the config
    layout.data_dir.mkdir(parents=True)
    process, url = await start_workers(layout)
    try:
        calls = [
            ("/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 1024, "stream": True,
                              "messages": [{"role": "user", "content": "Hi"}]}, b"content_block_delta"),
            ("/v1/chat/completions", {"model": MODEL, "max_tokens": 1024, "stream": True,
                                      "messages": [{"role": "user", "content": "Hi"}]}, b'"content"'),
            ("/v1/responses", {"model": MODEL, "max_output_tokens": 1024, "stream": True, "input": "Hi"},
             b"response.output_text.delta"),
        ]  # fmt: skip
        async with aiohttp.ClientSession(headers=HEADERS) as http:
            streams = []
            for n in range(4):  # every way in, a few times each: both workers get some (SO_REUSEPORT)
                for path, body, mark in calls:
                    streams.append((await http.post(url + path, json=body), mark))
                chat = {
                    "id": f"w{n}",
                    "messages": [{"id": "u", "role": "user", "parts": [{"type": "text", "text": "q"}]}],
                }
                streams.append((await http.post(url + "/api/chat", json=chat), b"text-delta"))
            for resp, mark in streams:
                assert resp.status == 200
                await resp.content.readuntil(mark)
            await asyncio.sleep(1.5)  # the notes reach the shared ledger within a second
            killed = workers_of(process)[0]
            os.kill(killed, signal.SIGKILL)
            bodies = []
            for resp, _ in streams:
                try:
                    bodies.append(await resp.read())
                except aiohttp.ClientError:
                    bodies.append(None)  # served by the killed worker
            assert None in bodies and any(b is not None for b in bodies)

            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60  # a lease lapses 20 s after its last renewal; replicas scan every 5 s
            while len(records := await recorded(pg_dsn)) < len(fake_anthropic.requests):
                assert loop.time() < deadline, (len(records), len(fake_anthropic.requests))
                await asyncio.sleep(1)
        assert len(records) == len({r["id"] for r in records}) == len(fake_anthropic.requests)
        assert all(r["inputTokens"] == 5000 for r in records)
        recovered = [r for r in records if r["recovered"]]
        assert 0 < len(recovered) == bodies.count(None)
        journals = list((layout.data_dir / "ledger").glob("journal-*.jsonl"))
        # The worker started in the killed one's place read its journal as it started: nothing posted twice.
        assert not any(f"journal-{killed}-" in j.name for j in journals), journals
        assert f"worker {killed} stopped (killed by SIGKILL); starting another" in layout.log()
    finally:
        await stop(process)

    process, url = await start_workers(layout)  # the next start reads the killed worker's journal
    try:
        await asyncio.sleep(1)
        assert not any(f"journal-{killed}-" in j.name for j in (layout.data_dir / "ledger").glob("journal-*"))
        again = await recorded(pg_dsn)
        assert sorted(r["id"] for r in again) == sorted(r["id"] for r in records)  # nothing posted twice
    finally:
        assert await stop(process) == 0
    # The CLI runs its own event loop: on a thread of its own.
    result = await asyncio.to_thread(CliRunner().invoke, cli, ["--config", str(layout.config_path), "usage", "--json"])
    assert result.exit_code == 0, result.output
    total = json.loads(result.stdout)["grandTotal"]
    assert total["inputTokens"] == sum(r["inputTokens"] for r in again)
    assert total["requestCount"] == sum(r["answered"] is not False for r in again)
