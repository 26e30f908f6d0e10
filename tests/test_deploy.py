"""docs/deploy.md as written: its gateway configuration (two workers on PostgreSQL and Redis) behind Debian's
nginx with its site configuration and TLS, on free ports of 127.0.0.1.

The nginx site and the gateway's TOML are read from the guide; only the ports, the certificate paths, the
DSN, the data directory and the fake upstream differ (each replacement must find its text, so the guide
cannot drift from what is tested). Through the proxy: a WebSocket chat and an ``/api/chat`` stream, each
with its first delta well before its end (nothing buffered), and the public name checked by
``allowed_hosts``.
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


class Stack:
    def __init__(self, url: str, ssl_context: ssl.SSLContext) -> None:
        self.url, self.ssl = url, ssl_context


@pytest.fixture
async def stack(tmp_path: Path, fake_anthropic: Any, pg_dsn: str, redis_srv: Any) -> AsyncIterator[Stack]:
    from tests.scale_servers import flush_redis

    await flush_redis(redis_srv)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", str(key), "-out", str(cert),
         "-subj", f"/CN={PUBLIC}", "-addext", f"subjectAltName=DNS:{PUBLIC}"],
        check=True, capture_output=True,
    )  # fmt: skip
    gateway_port, proxy_port = free_port(), free_port()
    config = tmp_path / "agentspace.toml"
    gateway_config(config, gateway_port, tmp_path / "data", pg_dsn, redis_srv.url, fake_anthropic.url)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env.update(
        AGENTSPACE_GATEWAY_TOKEN=TOKEN,
        ANTHROPIC_API_KEY=TEST_KEY,
        AGENTSPACE_LOAD_PLUGINS="",
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        PYTHONPATH=str(ROOT),
    )
    log = open(tmp_path / "serve.log", "wb")
    serve = subprocess.Popen(
        [sys.executable, "-m", "agentspace", "serve", "--config", str(config), "--workers", "2"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
    )  # fmt: skip
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    (prefix / "nginx.conf").write_text(nginx_conf(prefix, site(gateway_port, proxy_port, cert, key)))
    test = subprocess.run([NGINX, "-t", "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")],
                          capture_output=True, text=True)  # fmt: skip
    assert test.returncode == 0, test.stderr
    nginx = subprocess.Popen(
        [NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")]
    )
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False  # the test dials 127.0.0.1; the certificate names the public host
    try:
        await wait_for(f"http://127.0.0.1:{gateway_port}/healthz")
        await wait_for(f"https://127.0.0.1:{proxy_port}/healthz", context)
        yield Stack(f"https://127.0.0.1:{proxy_port}", context)
    finally:
        nginx.terminate()
        serve.terminate()
        for proc in (nginx, serve):
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
    served = (tmp_path / "serve.log").read_text(errors="replace")
    assert served.count("agentspace listening on") == 2, served  # both workers served
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


def test_the_guide_uses_no_sudo_and_a_password_in_the_dsn() -> None:
    text = GUIDE.read_text(encoding="utf-8")
    assert "sudo " not in text and "su postgres -c" in text
    assert "postgresql://agentspace:" in text and "--workers" in text and "pg_dump" in text
