"""docs/protocol.md#authentication and what local agent gateways got wrong before: origin and host checks (DNS rebinding),
authentication limits, rate limits, token rotation, dead connections, and secrets kept out of logs,
errors, frames and stored files."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient
from click.testing import CliRunner

from agentspace import ContextSection, gateway_token, hookimpl, security
from agentspace.cli import main as cli
from agentspace.gateway_token import load_or_create_token
from agentspace.plugins import create_plugin_manager
from agentspace.transports import state as STATE
from agentspace.transports.ws import PRE_AUTH_MAX_BYTES
from agentspace.vault import KeyVault
from tests.conftest import wait_until
from tests.fakes import anthropic_upstream as fa
from tests.fakes import openai_upstream as fo
from tests.support.ui_stream import post_chat, read_all, user
from tests.support.ws import chat, connect, receive

ALLOWED = "http://app.example"


async def refused_upgrade(client: TestClient, headers: dict[str, str]) -> int:
    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        await client.ws_connect("/gateway", headers=headers)
    return e.value.status


async def closed(ws: Any) -> int | None:
    """Read until the socket closes (bounded); the close code."""
    for _ in range(100):
        msg = await ws.receive(timeout=10)
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING, WSMsgType.ERROR):
            return ws.close_code
    raise AssertionError("the socket stayed open")


# --- origin and host ----------------------------------------------------------------------------


async def test_origin_checked_on_websocket_upgrades_and_http(make_client: Any, auth_headers: dict[str, str]) -> None:
    client = await make_client(server={"allowed_origins": [ALLOWED]})
    evil = {**auth_headers, "Origin": "http://evil.example"}
    assert await refused_upgrade(client, evil) == 403
    resp = await client.get("/api/sessions", headers=evil)
    assert resp.status == 403 and (await resp.json())["error"]["code"] == "FORBIDDEN"
    resp = await client.post("/api/chat", json={"id": "c", "messages": [user("hi")]}, headers=evil)
    assert resp.status == 403

    ws = await client.ws_connect("/gateway", headers={**auth_headers, "Origin": ALLOWED})
    await ws.send_json({"type": "session.list", "id": "l"})
    assert (await receive(ws))["type"] == "session.list.result"
    await ws.close()
    resp = await client.get("/api/sessions", headers={**auth_headers, "Origin": ALLOWED})
    assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert (await client.get("/api/sessions", headers=auth_headers)).status == 200  # no Origin: not a browser page


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:3271", "127.0.0.1.evil.example", "localhost.evil.example:80"]
)
async def test_foreign_host_is_refused(client: TestClient, auth_headers: dict[str, str], host: str) -> None:
    # DNS rebinding: the attacker's name resolves to 127.0.0.1, but the browser still sends that name.
    resp = await client.get("/api/sessions", headers={**auth_headers, "Host": host})
    assert resp.status == 403
    assert (await client.get("/healthz", headers={"Host": host})).status == 403
    assert await refused_upgrade(client, {**auth_headers, "Host": host}) == 403


@pytest.mark.parametrize(
    "host", ["localhost", "localhost:{port}", "127.0.0.1:{port}", "[::1]:{port}", "LOCALHOST:{port}"]
)
async def test_loopback_hosts_are_accepted(client: TestClient, auth_headers: dict[str, str], host: str) -> None:
    resp = await client.get("/api/sessions", headers={**auth_headers, "Host": host.format(port=client.port)})
    assert resp.status == 200


async def test_allowed_hosts_extend_the_list(make_client: Any, auth_headers: dict[str, str]) -> None:
    client = await make_client(server={"allowed_hosts": ["gateway.lan"]})
    assert (await client.get("/api/sessions", headers={**auth_headers, "Host": "gateway.lan:3271"})).status == 200
    assert (await client.get("/api/sessions", headers={**auth_headers, "Host": "other.lan"})).status == 403


# --- authentication -----------------------------------------------------------------------------


async def test_oversized_first_frame_is_refused_even_with_the_right_token(client: TestClient, token: str) -> None:
    ws = await client.ws_connect("/gateway")
    await ws.send_json({"type": "auth", "id": "a", "token": token, "padding": "x" * PRE_AUTH_MAX_BYTES})
    frame = await receive(ws)
    assert (frame["type"], frame["code"]) == ("error", "UNAUTHORIZED")
    assert await closed(ws) == 4401


async def test_failed_auth_is_rate_limited_per_address_including_loopback(
    client: TestClient, token: str, auth_headers: dict[str, str]
) -> None:
    assert (await client.get("/api/sessions", headers=auth_headers)).status == 200
    # Half the failures over HTTP, half over the WebSocket: one budget per address.
    for i in range(security.MAX_FAILURES // 2):
        assert (await client.get("/api/sessions", headers={"Authorization": f"Bearer wrong-{i}"})).status == 401
    for i in range(security.MAX_FAILURES - security.MAX_FAILURES // 2):
        ws = await client.ws_connect("/gateway")
        await ws.send_json({"type": "auth", "id": "a", "token": f"wrong-{i}"})
        assert (await receive(ws))["code"] == "UNAUTHORIZED"
        await ws.close()

    # Further guesses are limited, whichever way they come (the test client is on 127.0.0.1)...
    resp = await client.get("/api/sessions", headers={"Authorization": "Bearer wrong-again"})
    assert resp.status == 429 and (await resp.json())["error"]["code"] == "RATE_LIMITED"
    assert (await client.get("/api/sessions")).status == 429
    ws = await client.ws_connect("/gateway")
    await ws.send_json({"type": "auth", "id": "a", "token": "wrong-again"})
    assert (await receive(ws))["code"] == "RATE_LIMITED"
    assert await closed(ws) == 4401
    # ...but the right token is accepted at once (a local process failing on purpose cannot lock the owner out).
    assert (await client.get("/api/sessions", headers=auth_headers)).status == 200
    ws = await client.ws_connect("/gateway")
    await ws.send_json({"type": "auth", "id": "a", "token": token})
    assert (await receive(ws))["type"] == "auth.ok"
    await ws.close()
    ws = await client.ws_connect("/gateway", headers=auth_headers)
    await ws.send_json({"type": "session.list", "id": "l"})
    assert (await receive(ws))["type"] == "session.list.result"
    await ws.close()
    assert (await client.get("/healthz")).status == 200


def test_auth_failures_window_and_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(security.time, "monotonic", lambda: now[0])
    failures = security.AuthFailures(limit=3, window=60, max_sources=100)
    for _ in range(3):
        failures.add("10.0.0.1")
    assert failures.blocked("10.0.0.1") and not failures.blocked("10.0.0.2")
    for _ in range(100):  # an attacker who goes on failing stays blocked
        now[0] += 1
        failures.add("10.0.0.1")
    assert failures.blocked("10.0.0.1")
    now[0] += 20
    assert failures.blocked("10.0.0.1")
    now[0] += 100  # two windows after the last failure at most
    assert not failures.blocked("10.0.0.1")
    # Loopback is one source, whatever 127/8 address or ::1 a guess comes from; IPv6 counts per /64.
    for address in ("127.0.0.2", "127.3.4.5", "::1"):
        failures.add(address)
    assert failures.blocked("127.0.0.1") and failures.blocked("::ffff:127.0.0.9")
    for address in ("2001:db8::1", "2001:db8::2", "2001:db8::ffff:1"):
        failures.add(address)
    assert failures.blocked("2001:db8::77") and not failures.blocked("2001:db8:0:1::1")
    # Memory stays bounded: past max_sources the least recently failing source is forgotten.
    for i in range(1000):
        failures.add(f"10.1.{i // 256}.{i % 256}")
    assert len(failures) == 100


def test_token_comparison_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = gateway_token.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(gateway_token.hmac, "compare_digest", spy)
    assert gateway_token.token_matches("secret-token-1", "secret-token-1")
    assert not gateway_token.token_matches("secret-token-1", "secret-token-2")
    assert len(calls) == 2
    assert not gateway_token.token_matches("secret-token-1", "") and not gateway_token.token_matches(None, "x")


async def test_rotation_takes_effect_without_a_restart(client: TestClient, token: str, isolated_env: Path) -> None:
    assert (await client.get("/api/sessions", headers={"Authorization": f"Bearer {token}"})).status == 200
    result = CliRunner().invoke(cli, ["token", "--rotate"], env={"AGENTSPACE_HOME": str(isolated_env)})
    assert result.exit_code == 0, result.output
    new = result.stdout.strip()
    assert new and new != token
    assert (await client.get("/api/sessions", headers={"Authorization": f"Bearer {token}"})).status == 401
    assert (await client.get("/api/sessions", headers={"Authorization": f"Bearer {new}"})).status == 200
    ws = await client.ws_connect("/gateway")
    await ws.send_json({"type": "auth", "id": "a", "token": new})
    assert (await receive(ws))["type"] == "auth.ok"
    await ws.close()


# --- limits -------------------------------------------------------------------------------------


async def test_frame_and_body_limits(make_client: Any, token: str, auth_headers: dict[str, str]) -> None:
    # No room for attachments: past 4x max_frame_bytes a frame closes the socket.
    client = await make_client(
        server={"max_frame_bytes": 1000, "max_body_bytes": 2000}, attachments={"max_session_bytes": 0}
    )
    ws = await connect(client, token)
    await ws.send_json({"type": "chat.send", "id": "big", "content": "x" * 1500})
    assert (await receive(ws))["code"] == "PAYLOAD_TOO_LARGE"
    await ws.send_json({"type": "session.list", "id": "l"})
    assert (await receive(ws))["type"] == "session.list.result"  # still usable
    await ws.send_str("x" * 5000)  # past 4x the limit aiohttp closes the socket: 1009 message too big
    assert await closed(ws) == 1009

    resp = await post_chat(client, auth_headers, "big", user("x" * 3000))
    assert resp.status == 413 and (await resp.json())["error"]["code"] == "PAYLOAD_TOO_LARGE"


async def test_message_rate_limit_per_connection(make_client: Any, token: str) -> None:
    # 30 messages a minute: a client may send its minute's worth at once; the 31st and 32nd are refused,
    # and the connection stays.
    client = await make_client(server={"messages_per_minute": 30})
    ws = await connect(client, token)
    replies = []
    for i in range(32):
        await ws.send_json({"type": "session.list", "id": f"l{i}"})
        replies.append(await receive(ws))
    assert [r["type"] for r in replies[:30]] == ["session.list.result"] * 30
    assert [r.get("code") for r in replies[30:]] == ["RATE_LIMITED", "RATE_LIMITED"]
    other = await connect(client, token)  # the budget is per connection
    await other.send_json({"type": "session.list", "id": "o"})
    assert (await receive(other))["type"] == "session.list.result"
    await ws.close()
    await other.close()


async def test_heartbeat_closes_dead_connections(make_client: Any, token: str) -> None:
    client = await make_client(server={"heartbeat_seconds": 0.2})
    ws = await client.ws_connect("/gateway", headers={"Authorization": f"Bearer {token}"}, autoping=False)
    assert await closed(ws) is not None  # pings went unanswered
    app = client.server.app

    async def forgotten() -> bool:
        return not list(app[STATE.WEBSOCKETS])

    await wait_until(forgotten)

    alive = await connect(client, token)  # a client that answers pings stays connected
    for i in range(3):
        await alive.send_json({"type": "session.list", "id": f"l{i}"})
        assert (await receive(alive))["type"] == "session.list.result"
    await alive.close()


# --- secrets never leak -------------------------------------------------------------------------

VAULT_KEY = "sk-ant-vault-SECRETSECRET-0123456789"
OPENAI_KEY = "sk-openai-env-SECRETSECRET-987654"


class FailingSection:
    """A context section that fails with an internal detail (and a key) the client must not see."""

    @hookimpl
    def register_context_sections(self, register: Any, config: Any) -> None:
        def build(request: Any) -> str:
            if "explode" in request.user_message:
                raise RuntimeError(f"internal detail /srv/secret/path {VAULT_KEY}")
            return ""

        register(ContextSection("failing", build))


async def test_keys_and_token_never_leak(
    make_client: Any,
    fake_anthropic: fa.FakeAnthropic,
    fake_openai: fo.FakeOpenAI,
    isolated_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    KeyVault(isolated_env).set("anthropic", VAULT_KEY)
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    token = load_or_create_token(isolated_env)
    pm = create_plugin_manager()
    pm.register(FailingSection())
    client = await make_client(pm=pm, chat={"max_retries": 0}, providers={"openai": {"base_url": fake_openai.url}})
    monkeypatch.delenv("ANTHROPIC_API_KEY")  # make_client set the test key: the vault's must be used
    headers = {"Authorization": f"Bearer {token}"}
    seen: list[Any] = []

    fake_anthropic.enqueue(
        fa.text_response("fine"),
        fa.error_status(400, f"invalid x-api-key {VAULT_KEY}"),
        fa.error_event("invalid_request_error", f"key {VAULT_KEY} is not allowed", text="partial"),
        fa.error_status(429, retry_after=0),
        fa.malformed_response(),
        fa.text_response("over http"),
    )
    fake_openai.enqueue(
        fo.error_status(400, f"Incorrect API key provided: {OPENAI_KEY}"),
        fo.error_status(500, f"upstream exploded near {OPENAI_KEY}"),
        fo.text_response(f"the model says {OPENAI_KEY[:6]}"),
    )
    ws = await connect(client, token)
    for i, (content, model) in enumerate(
        [
            ("hi", None),
            ("a", None),
            ("b", None),
            ("c", None),
            ("d", None),
            ("e", "openai/gpt-4o-mini"),
            ("f", "openai/gpt-4o-mini"),
            ("g", "openai/gpt-4o-mini"),
            ("explode", None),
        ]
    ):
        seen += await chat(ws, content, f"r{i}", **({"model": model} if model else {}))
    await ws.close()
    # A failing section is left out (logged); every other fault reaches the client as an error frame.
    assert [f["code"] for f in seen if f["type"] == "error"] == [
        "LLM_ERROR",
        "LLM_ERROR",
        "RATE_LIMITED",
        "LLM_ERROR",
        "LLM_ERROR",
        "LLM_ERROR",
    ]
    assert fake_anthropic.requests[0].api_key == VAULT_KEY  # the vault's key was really used

    resp = await post_chat(client, headers, "http-chat", user("hello"))
    seen += await read_all(resp)
    for wrong in ("wrong-token", VAULT_KEY):  # a client sending a key as the token gets it not echoed
        resp = await client.get("/api/sessions", headers={"Authorization": f"Bearer {wrong}"})
        seen.append(await resp.text())
        bad = await client.ws_connect("/gateway")
        await bad.send_json({"type": "auth", "id": "a", "token": wrong})
        seen.append(await receive(bad))
        await bad.close()
    for path in ("/api/sessions", "/api/usage", "/api/models", "/api/sessions/http-chat"):
        seen.append(await (await client.get(path, headers=headers)).text())
    await client.server.app[STATE.REGISTRY].usage.flush()

    assert "internal detail" not in json.dumps(seen)  # the failing section's error stayed in the log
    assert "internal detail" in caplog.text
    files = {
        p: p.read_text(errors="replace")
        for p in isolated_env.rglob("*")
        if p.is_file() and p.name not in ("keys.json", "gateway-token")
    }
    assert any("usage" in p.parts for p in files) and any("sessions" in p.parts for p in files)
    for secret in (VAULT_KEY, OPENAI_KEY, token):
        assert secret not in caplog.text
        assert secret not in json.dumps(seen)
        for path, text in files.items():
            assert secret not in text, path
