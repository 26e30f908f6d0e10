"""docs/deploy.md as written: a one-process (tinydb) data directory with client keys moved into PostgreSQL
with the guide's ``storage migrate`` commands, then its gateway configuration (two workers on PostgreSQL and
Redis) behind Debian's nginx with its site configuration and TLS, on free ports of 127.0.0.1.

The migrate commands, the systemd unit's command, the nginx site and the gateway's TOML are read from the
guide; only the ports, the certificate paths, the DSN, the data directories and the fake upstream differ
(each replacement must find its text, so the guide cannot drift from what is tested). Through the proxy: a
WebSocket chat and an ``/api/chat`` stream, each with its first delta well before its end (nothing
buffered), the public name checked by ``allowed_hosts``, the migrated client keys accepted by both workers,
and a chat that waits for the workers' restart.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from agentspace.cli import main
from scripts.harness import ROOT, TEST_KEY, toml_value
from tests.fakes.anthropic_upstream import text_response
from tests.scale_servers import free_port

GUIDE = ROOT / "docs" / "deploy.md"
NGINX = "/usr/sbin/nginx"
PUBLIC = "gateway.example.com"
TOKEN = "deploy-test-token-0123456789abcdef"
CHUNKS, DELAY = 8, 0.25  # the fake upstream's answer: 8 deltas 0.25 s apart

pytestmark = pytest.mark.skipif(
    not Path(NGINX).exists(), reason="nginx is not installed: apt-get install nginx (scripts/test does it as root)"
)


def block(name: str) -> str:
    """The code block after ``<!-- deploy: NAME -->`` in the guide."""
    match = re.search(rf"<!-- deploy: {re.escape(name)} -->\n```\w+\n(.*?)```", GUIDE.read_text(encoding="utf-8"), re.S)
    assert match, f"no '{name}' block in {GUIDE}"
    return match.group(1)


def replace(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} is not once in the guide's block"
    return text.replace(old, new)


def site(gateway_port: int, port: int, cert: Path, key: Path) -> str:
    text = block("nginx")
    text = replace(text, "server 127.0.0.1:3271;", f"server 127.0.0.1:{gateway_port};")
    text = replace(text, "listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;")
    text = replace(text, f"/etc/letsencrypt/live/{PUBLIC}/fullchain.pem", str(cert))
    return replace(text, f"/etc/letsencrypt/live/{PUBLIC}/privkey.pem", str(key))


def nginx_conf(prefix: Path, site_text: str) -> str:
    """What Debian's /etc/nginx/nginx.conf gives a site (an http block), with every path under ``prefix``."""
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = "user root;\n" if os.geteuid() == 0 else ""  # the workers read the test's private folder
    return (
        f"{user}daemon off;\nworker_processes 1;\npid {prefix / 'nginx.pid'};\nerror_log {prefix / 'error.log'} info;\n"
        f"events {{ worker_connections 256; }}\nhttp {{\n    access_log {prefix / 'access.log'};\n{temp}\n"
        f"{site_text}\n}}\n"
    )


def gateway_config(path: Path, port: int, data_dir: Path, dsn: str, redis_url: str, upstream: str) -> None:
    text = block("agentspace.toml")
    text = replace(text, "port = 3271", f"port = {port}")
    text = replace(text, 'data_dir = "/var/lib/agentspace"', f"data_dir = {toml_value(str(data_dir))}")
    text = replace(
        text, 'dsn = "postgresql://agentspace:PASSWORD@127.0.0.1:5432/agentspace"', f"dsn = {toml_value(dsn)}"
    )
    text = replace(text, 'redis_url = "redis://127.0.0.1:6379/0"', f"redis_url = {toml_value(redis_url)}")
    assert tomllib.loads(text)["server"]["allowed_hosts"] == [PUBLIC]
    text += f'\n[models]\ndefault = "anthropic/claude-sonnet-4-6"\n\n[providers.anthropic]\nbase_url = {toml_value(upstream)}\n'
    path.write_text(text, encoding="utf-8")


async def wait_for(url: str, ssl_context: Any = None, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(url, ssl=ssl_context, headers={"Host": PUBLIC}) as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(url)
            await asyncio.sleep(0.2)


MIGRATE_DSN = "postgresql://agentspace:PASSWORD@127.0.0.1:5432/agentspace"
CONFIG_PATH = "/etc/agentspace/agentspace.toml"


def cli(*args: str) -> Any:
    result = CliRunner().invoke(main, list(args), env={"AGENTSPACE_CONFIG": None, "AGENTSPACE_HOME": None})
    assert result.exit_code == 0, result.output
    return result


def migrate_as_the_guide_says(old_data_dir: Path, dsn: str, config: Path) -> dict[str, str]:
    """Client keys made in a tinydb data directory, then the guide's migrate block run line by line (its
    ``agentspace`` commands through click's runner); the keys by client name."""
    keys = {
        "team-a": cli("--data-dir", str(old_data_dir), "clients", "add", "team-a", "--budget", "50").stdout,
        "team-b": cli("--data-dir", str(old_data_dir), "clients", "add", "team-b", "--models", "anthropic/*").stdout,
        "team-c": cli("--data-dir", str(old_data_dir), "clients", "add", "team-c").stdout,
    }
    text = block("migrate")
    text = replace(text, "/path/to/old/data-dir", str(old_data_dir))
    text = replace(text, f"'{MIGRATE_DSN}'", dsn)
    text = replace(text, CONFIG_PATH, str(config))
    lines = [line.split() for line in text.splitlines() if line.startswith("agentspace ")]
    assert [line[1:3] for line in lines] == [["storage", "migrate"], ["clients", "list"]]
    migrated = cli(*lines[0][1:])
    assert "clients: 3 copied, 0 already there" in migrated.output
    listed = cli(*lines[1][1:])
    assert all(name in listed.output for name in keys) and "$50.0000" in listed.output
    return {name: key.strip() for name, key in keys.items()}


def service_command(config: Path) -> list[str]:
    """The systemd unit's ExecStart, run by this Python on the test's config."""
    [line] = [line for line in block("systemd").splitlines() if line.startswith("ExecStart=")]
    line = replace(line, "ExecStart=/opt/agentspace/bin/agentspace ", f"{sys.executable} -m agentspace ")
    return replace(line, CONFIG_PATH, str(config)).split()


class Stack:
    """nginx in front of ``serve --workers 2`` (the systemd unit's command), which ``restart`` stops with
    SIGTERM and starts again, as ``systemctl restart`` does."""

    def __init__(self, url: str, ssl_context: ssl.SSLContext, gateway_port: int, config: Path, env: dict[str, str]):
        self.url, self.ssl, self.gateway_port, self.config, self.env = url, ssl_context, gateway_port, config, env
        self.keys: dict[str, str] = {}
        self.cert = Path()
        self.serve: subprocess.Popen[bytes] | None = None
        self.log = open(config.parent / "serve.log", "wb")

    def start(self) -> None:
        self.serve = subprocess.Popen(
            service_command(self.config), stdout=self.log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT
        )

    def stop(self) -> None:
        assert self.serve is not None
        self.serve.terminate()
        try:
            assert self.serve.wait(60) == 0
        except subprocess.TimeoutExpired:
            self.serve.kill()
            self.serve.wait()
            raise


@pytest.fixture
async def stack(tmp_path: Path, fake_anthropic: Any, pg_dsn: str, redis_srv: Any) -> AsyncIterator[Stack]:
    from tests.scale_servers import flush_redis

    await flush_redis(redis_srv)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", str(key), "-out", str(cert),
         "-subj", f"/CN={PUBLIC}", "-addext", f"subjectAltName=DNS:{PUBLIC},IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    gateway_port, proxy_port = free_port(), free_port()
    config = tmp_path / "agentspace.toml"
    gateway_config(config, gateway_port, tmp_path / "data", pg_dsn, redis_srv.url, fake_anthropic.url)
    # The CLI runs event loops of its own: in a thread, apart from the test's.
    keys = await asyncio.to_thread(migrate_as_the_guide_says, tmp_path / "old-data", pg_dsn, config)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env.update(
        AGENTSPACE_GATEWAY_TOKEN=TOKEN,
        ANTHROPIC_API_KEY=TEST_KEY,
        AGENTSPACE_LOAD_PLUGINS="",
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        PYTHONPATH=str(ROOT),
    )
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False  # the test dials 127.0.0.1; the certificate names the public host
    stack = Stack(f"https://127.0.0.1:{proxy_port}", context, gateway_port, config, env)
    stack.keys, stack.cert = keys, cert
    stack.start()
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    (prefix / "nginx.conf").write_text(nginx_conf(prefix, site(gateway_port, proxy_port, cert, key)))
    test = subprocess.run([NGINX, "-t", "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")],
                          capture_output=True, text=True)  # fmt: skip
    assert test.returncode == 0, test.stderr
    nginx = subprocess.Popen(
        [NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")]
    )
    try:
        await wait_for(f"http://127.0.0.1:{gateway_port}/healthz")
        await wait_for(f"https://127.0.0.1:{proxy_port}/healthz", context)
        yield stack
    finally:
        nginx.terminate()
        assert stack.serve is not None
        stack.serve.terminate()
        for proc in (nginx, stack.serve):
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        stack.log.close()
    served = (tmp_path / "serve.log").read_text(errors="replace")
    assert served.count("agentspace listening on") >= 2, served  # both workers served
    assert "Traceback" not in served, served


HEADERS = {"Host": PUBLIC, "Origin": f"https://{PUBLIC}", "Authorization": f"Bearer {TOKEN}"}


async def test_websocket_and_ui_stream_through_nginx_arrive_as_they_are_made(stack: Stack, fake_anthropic: Any) -> None:
    words = [f"w{n} " for n in range(CHUNKS)]
    fake_anthropic.enqueue(*(text_response("".join(words), chunks=words).with_delay(DELAY) for _ in range(2)))
    async with aiohttp.ClientSession() as http:
        # The public name is allowed (allowed_hosts); another name is refused.
        async with http.get(
            f"{stack.url}/api/models", ssl=stack.ssl, headers={**HEADERS, "Host": "other.example"}
        ) as r:
            assert r.status == 403 and "allowed_hosts" in await r.text()

        # A WebSocket chat, upgraded through the proxy; the browser's way to authenticate (a first frame).
        ws_headers = {"Host": PUBLIC, "Origin": f"https://{PUBLIC}"}
        async with http.ws_connect(
            f"{stack.url.replace('https', 'wss')}/gateway", ssl=stack.ssl, headers=ws_headers
        ) as ws:
            await ws.send_json({"type": "auth", "id": "a", "token": TOKEN})
            assert (await ws.receive_json(timeout=10))["type"] == "auth.ok"
            await ws.send_json({"type": "chat.send", "id": "1", "content": "Hello"})
            first = end = None
            text = ""
            while end is None:
                frame = await ws.receive_json(timeout=30)
                if frame["type"] == "chat.stream.delta":
                    first = first or time.monotonic()
                    text += frame["delta"]
                elif frame["type"] == "chat.stream.end":
                    end = time.monotonic()
                assert frame["type"] != "error", frame
        assert text == "".join(words)
        assert first is not None and end - first > (CHUNKS - 3) * DELAY, (first, end)

        # The UI message stream (Server-Sent Events) of POST /api/chat, unbuffered.
        body = {
            "id": "via-nginx",
            "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": "Hello"}]}],
        }
        first = end = None
        deltas = []
        async with http.post(f"{stack.url}/api/chat", ssl=stack.ssl, headers=HEADERS, json=body) as r:
            assert r.status == 200, await r.text()
            async for raw in r.content:
                line = raw.decode().strip()
                if line == "data: [DONE]":
                    end = time.monotonic()
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    if event["type"] == "text-delta":
                        first = first or time.monotonic()
                        deltas.append(event["delta"])
        assert "".join(deltas) == "".join(words)
        assert first is not None and end is not None and end - first > (CHUNKS - 3) * DELAY, (first, end)

        # The answer is stored once, in PostgreSQL, whichever worker served it.
        async with http.get(f"{stack.url}/api/sessions/via-nginx", ssl=stack.ssl, headers=HEADERS) as r:
            assert r.status == 200
            assert [m["role"] for m in (await r.json())["session"]["messages"]] == ["user", "assistant"]

        # A body the gateway takes reaches it: /v1 takes 32 MiB (a long Claude Code session with its images),
        # /api/chat a session's files on top of max_body_bytes. The proxy must not answer 413 first.
        fake_anthropic.enqueue(text_response("Read it."))
        big = {
            "model": "anthropic/claude-sonnet-4-6",
            "max_tokens": 10,
            "messages": [{"role": "user", "content": "word " * (4 * 1024 * 1024)}],  # 20 MiB
        }
        async with http.post(f"{stack.url}/v1/chat/completions", ssl=stack.ssl, headers=HEADERS, json=big) as r:
            assert r.status == 200, (r.status, (await r.text())[:300])
            assert (await r.json())["choices"][0]["message"]["content"] == "Read it."


async def read_until(stream: asyncio.StreamReader, text: bytes, timeout: float) -> bytes:
    seen = b""
    async with asyncio.timeout(timeout):
        while text not in seen:
            line = await stream.readline()
            assert line, seen  # the program ended
            seen += line
    return seen


async def test_chat_through_nginx_waits_for_a_restart_and_sends_what_was_typed(
    stack: Stack, fake_anthropic: Any
) -> None:
    """The guide's upgrade (``systemctl restart``) while ``agentspace chat`` is connected through nginx: a
    message typed while the workers are down (nginx answers 502 for them) is sent once they are back. The
    chat sends the token of ``AGENTSPACE_GATEWAY_TOKEN`` (no ``--token``), the one both workers take."""
    fake_anthropic.enqueue(text_response("First answer."), text_response("Second answer."))
    env = {**stack.env, "SSL_CERT_FILE": str(stack.cert), "AGENTSPACE_CONFIG": str(stack.config)}
    token = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentspace", "token", stdout=asyncio.subprocess.PIPE, env=env, cwd=ROOT
    )
    assert (await token.communicate())[0].decode().strip() == TOKEN
    banner = "Clients need the gateway token: the value of AGENTSPACE_GATEWAY_TOKEN."
    deadline = time.monotonic() + 60  # the fixture waited for one worker; the other may still be starting
    while (stack.config.parent / "serve.log").read_text().count(banner) < 2:  # one per worker
        assert time.monotonic() < deadline, (stack.config.parent / "serve.log").read_text()
        await asyncio.sleep(0.2)
    chat = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentspace", "chat", "--url", f"{stack.url.replace('https', 'wss')}/gateway",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=env, cwd=ROOT,
    )  # fmt: skip
    assert chat.stdin is not None and chat.stdout is not None and chat.stderr is not None
    try:
        chat.stdin.write(b"one\n")
        await chat.stdin.drain()
        await read_until(chat.stdout, b"First answer.", 30)
        await asyncio.to_thread(stack.stop)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{stack.url}/healthz", ssl=stack.ssl) as r:
                assert r.status == 502  # nginx is up, the workers are not
        chat.stdin.write(b"two\n")
        await chat.stdin.drain()
        await asyncio.sleep(1.0)
        stack.start()
        await read_until(chat.stdout, b"Second answer.", 60)
        chat.stdin.close()
        assert await asyncio.wait_for(chat.wait(), 30) == 0
        errors = (await chat.stderr.read()).decode()
        assert "reconnecting" in errors and "Error" not in errors, errors
    finally:
        if chat.returncode is None:
            chat.kill()
            await chat.wait()


async def worker_answering(port: int, key: str) -> tuple[int, int]:
    """GET /api/models with a client key on a new connection to the workers' port: the status and the PID of
    the worker that accepted the connection (``ss`` names the process holding the gateway's end)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        local_port = writer.get_extra_info("sockname")[1]
        writer.write(f"GET /api/models HTTP/1.1\r\nHost: {PUBLIC}\r\nAuthorization: Bearer {key}\r\n\r\n".encode())
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        await reader.readuntil(b"\r\n\r\n")  # the headers: the connection is accepted and still open
        ss = subprocess.run(
            ["ss", "-Htnp", "state", "established", f"( sport = :{port} and dport = :{local_port} )"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        pid = re.search(r"pid=(\d+)", ss.stdout)
        assert pid, ss.stdout
        return status, int(pid.group(1))
    finally:
        writer.close()


async def test_migrated_client_keys_work_through_nginx_on_both_workers(stack: Stack, fake_anthropic: Any) -> None:
    """The keys the tinydb data directory gave out work after ``storage migrate``: through nginx (a streamed
    answer on /v1/chat/completions), and on each of the two workers; a wrong key does not."""
    fake_anthropic.default = text_response(
        "Hello from the gateway.", usage={"input_tokens": 12}, delta_usages=[{"output_tokens": 7}]
    )
    async with aiohttp.ClientSession() as http:
        for name, key in stack.keys.items():
            headers = {"Host": PUBLIC, "Authorization": f"Bearer {key}"}
            body = {
                "model": "anthropic/claude-sonnet-4-6",
                "stream": True,
                "messages": [{"role": "user", "content": "Hi"}],
            }
            async with http.post(f"{stack.url}/v1/chat/completions", ssl=stack.ssl, headers=headers, json=body) as r:
                assert r.status == 200, (name, await r.text())
                streamed = (await r.read()).decode()
            text = "".join(
                chunk["choices"][0]["delta"].get("content") or ""
                for line in streamed.splitlines()
                if line.startswith("data: {") and (chunk := json.loads(line[6:]))["choices"]
            )
            assert text == "Hello from the gateway.", streamed
        async with http.get(
            f"{stack.url}/api/models", ssl=stack.ssl, headers={"Host": PUBLIC, "Authorization": "Bearer as-wrong-key"}
        ) as r:
            assert r.status == 401
        # nginx keeps its connections to the gateway open between requests (the site's keepalive).
        kept = subprocess.run(
            ["ss", "-Htn", "state", "established", f"( dport = :{stack.gateway_port} )"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert kept.stdout.strip(), "nginx closed every connection to the gateway"
    # ... and closes the idle ones before the gateway would ([server] header_timeout_seconds): a request nginx
    # sends on a connection the gateway is closing gets a 502, and nginx does not retry a POST. Whoever closes
    # first keeps the connection in TIME-WAIT: it must be nginx's end, never the gateway's port.
    deadline = time.monotonic() + 60
    while subprocess.run(
        ["ss", "-Htn", "state", "established", f"( dport = :{stack.gateway_port} )"],
        capture_output=True, text=True, check=True,
    ).stdout.strip():  # fmt: skip
        assert time.monotonic() < deadline, "nginx kept its idle connections to the gateway"
        await asyncio.sleep(0.5)
    closed_by_gateway = subprocess.run(
        ["ss", "-Htn", "state", "time-wait", f"( sport = :{stack.gateway_port} )"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert not closed_by_gateway.strip(), closed_by_gateway

    # SO_REUSEPORT spreads new connections over the two workers: each key is tried until both accepted it.
    for name, key in stack.keys.items():
        workers: set[int] = set()
        for _ in range(60):
            status, pid = await worker_answering(stack.gateway_port, key)
            assert status == 200, (name, pid)
            workers.add(pid)
            if len(workers) == 2:
                break
        assert len(workers) == 2, f"{name}: only worker {workers} answered 60 connections"
    status, _ = await worker_answering(stack.gateway_port, "as-wrong-key")
    assert status == 401

    # One usage record per key's call, with the upstream's figures, on the database both workers write.
    report = json.loads(
        (await asyncio.to_thread(cli, "usage", "--by-client", "--json", "--config", str(stack.config))).stdout
    )["perClient"]
    assert {name: (report[name]["requestCount"], report[name]["inputTokens"], report[name]["outputTokens"])
            for name in stack.keys} == dict.fromkeys(stack.keys, (1, 12, 7))  # fmt: skip


def test_the_guide_uses_no_sudo_and_a_password_in_the_dsn() -> None:
    text = GUIDE.read_text(encoding="utf-8")
    assert "sudo " not in text and "su postgres -c" in text
    assert "postgresql://agentspace:" in text and "--workers" in text and "pg_dump" in text


def systemd_environment(text: str) -> dict[str, str]:
    """What systemd's EnvironmentFile= makes of plain ``KEY=value`` lines (systemd.exec(5)): a line starting with
    ``#`` or ``;`` is a comment, anywhere else the rest of the line is the value, trailing blanks dropped."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and line[0] not in "#;" and "=" in line:
            key, value = line.split("=", 1)
            found[key.strip()] = value.strip()
    return found


def test_the_guides_environment_file_means_the_same_to_systemd_and_the_shell(tmp_path: Path) -> None:
    """The workers read ``/etc/agentspace/env`` through systemd, the admin's shell with ``. /etc/agentspace/env``.
    The guide had ``AGENTSPACE_GATEWAY_TOKEN=...     # python3 -c ...``: the shell drops the comment, systemd
    keeps it in the value, and every token the admin handed out got 401."""
    env_file = tmp_path / "env"
    env_file.write_text(replace(block("env"), "AGENTSPACE_GATEWAY_TOKEN=...", f"AGENTSPACE_GATEWAY_TOKEN={TOKEN}"))
    by_systemd = systemd_environment(env_file.read_text(encoding="utf-8"))
    shell = subprocess.run(
        [
            "sh",
            "-c",
            f'set -a; . "{env_file}"; set +a; printf "%s\\n%s" "$AGENTSPACE_GATEWAY_TOKEN" "$ANTHROPIC_API_KEY"',
        ],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": os.environ["PATH"]},
    )
    token, key = shell.stdout.split("\n")
    assert by_systemd == {"AGENTSPACE_GATEWAY_TOKEN": token, "ANTHROPIC_API_KEY": key}
    assert token == TOKEN


def test_every_block_of_su_postgres_commands_starts_outside_root_s_home() -> None:
    """Run from /root (the admin's shell), ``su postgres -c`` prints 'could not change directory to "/root":
    Permission denied' for every command; section 2 said ``cd /tmp`` first, the backups and upgrades did not."""
    blocks = re.findall(r"```sh\n(.*?)```", GUIDE.read_text(encoding="utf-8"), re.S)
    with_su = [b for b in blocks if "su postgres -c" in b]
    assert len(with_su) >= 3
    for code in with_su:
        assert code.index("cd /tmp") < code.index("su postgres -c"), code
