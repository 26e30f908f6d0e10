"""Budget alerts through the real gateway: a client key chats over ``POST /api/chat`` until its spend crosses
``[alerts] thresholds``, and the built-in webhook plugin POSTs each threshold once to a receiver on
127.0.0.1, in one process (the sent alerts kept in the data directory) and across two replicas on PostgreSQL
and Redis (claimed with SET NX)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from scripts.harness import GatewayProcess
from tests.conftest import wait_until
from tests.fakes.anthropic_upstream import text_response
from tests.scale_servers import flush_redis

BUDGET = 0.01  # USD a day; anthropic/claude-sonnet-4-5 input costs $3 per MTok: 2000 tokens are $0.006
# A call is admitted only while its reservation (its input and max_tokens at the model's prices) still fits
# the budget: small answers keep it below what is left, so the spend can cross each threshold.
SMALL_ANSWERS = {"max_tokens": 16}


class Receiver:
    def __init__(self) -> None:
        self.alerts: list[dict[str, Any]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.alerts.append(await request.json())
        return web.Response(status=204)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    hook = Receiver()
    app = web.Application()
    app.router.add_post("/alerts", hook.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    hook.url = f"http://127.0.0.1:{port}/alerts"
    yield hook
    await runner.cleanup()


def chat_body(session: str, n: int) -> dict[str, Any]:
    return {"id": session, "messages": [{"id": f"m{n}", "role": "user", "parts": [{"type": "text", "text": "hi"}]}]}


def spend(input_tokens: int) -> Any:
    return text_response("Ok.", usage={"input_tokens": input_tokens}, delta_usages=[{"output_tokens": 1}])


async def test_each_threshold_alerts_once_per_period(
    make_client: Any, fake_anthropic: Any, receiver: Receiver, auth_headers: dict[str, str], isolated_env: Path
) -> None:
    client: TestClient = await make_client(
        alerts={"webhook_url": receiver.url, "thresholds": [0.5, 1.0]}, chat=SMALL_ANSWERS, thinking={"enabled": False}
    )
    r = await client.post(
        "/api/clients", json={"name": "team-a", "budgetUsd": BUDGET, "period": "day"}, headers=auth_headers
    )
    key = (await r.json())["key"]
    headers = {"Authorization": f"Bearer {key}"}
    fake_anthropic.enqueue(spend(2000), spend(1000), spend(500))

    async def chat(n: int) -> int:
        response = await client.post("/api/chat", json=chat_body(f"s{n}", n), headers=headers)
        await response.read()
        return response.status

    assert await chat(1) == 200  # $0.006: 60% of the budget
    await wait_until(lambda: _count(receiver, 1))
    (first,) = receiver.alerts
    assert first["client"] == "team-a" and first["threshold"] == 0.5 and first["budgetUsd"] == BUDGET
    assert first["period"] == "day" and first["periodStart"].endswith("T00:00:00Z")
    assert first["spendUsd"] == pytest.approx(0.006015) and "50%" in first["text"] and "team-a" in first["text"]

    assert await chat(2) == 200  # 90%: over 50% again, but that alert was sent
    await asyncio.sleep(0.5)
    assert len(receiver.alerts) == 1
    assert await chat(3) == 200  # 105%
    await wait_until(lambda: _count(receiver, 2))
    assert [a["threshold"] for a in receiver.alerts] == [0.5, 1.0]
    assert receiver.alerts[1]["spendUsd"] >= BUDGET
    assert await chat(4) == 429  # the budget is spent: refused before any call, no record, no alert
    await asyncio.sleep(0.5)
    assert len(receiver.alerts) == 2
    # What was sent survives a restart (the data directory keeps it; Redis does with replicas).
    sent = [json.loads(line)[0] for line in (isolated_env / "alerts-sent.jsonl").read_text().splitlines()]
    assert len(sent) == 2 and all(k.startswith("team-a|day|") for k in sent)


async def _count(receiver: Receiver, n: int) -> bool:
    return len(receiver.alerts) >= n


async def test_two_replicas_send_each_threshold_once(
    tmp_path: Path, fake_anthropic: Any, pg_dsn: str, redis_srv: Any, receiver: Receiver, monkeypatch: Any
) -> None:
    monkeypatch.setenv("AGENTSPACE_GATEWAY_TOKEN", "replica-token-0123456789abcdef")
    await flush_redis(redis_srv)
    storage = {"backend": "postgres", "dsn": pg_dsn, "redis_url": redis_srv.url}
    alerts = {"webhook_url": receiver.url, "thresholds": [0.5, 1.0]}
    servers = [
        GatewayProcess(tmp_path / name, fake_anthropic.url, storage=storage, alerts=alerts, chat=SMALL_ANSWERS)
        for name in "ab"
    ]
    try:
        await asyncio.gather(*(s.start() for s in servers))
        admin = {"Authorization": "Bearer replica-token-0123456789abcdef"}
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{servers[0].url}/api/clients",
                json={"name": "team-b", "budgetUsd": BUDGET, "period": "day"},
                headers=admin,
            ) as r:
                key = (await r.json())["key"]
            fake_anthropic.enqueue(spend(2000), spend(2000))
            for n, server in enumerate(servers, 1):  # A reaches 60%, then B 120% (and sees 50% passed too)
                async with http.post(
                    f"{server.url}/api/chat", json=chat_body(f"r{n}", n), headers={"Authorization": f"Bearer {key}"}
                ) as r:
                    assert r.status == 200, await r.text()
                    await r.read()
                await wait_until(lambda n=n: _count(receiver, n))
        await asyncio.sleep(0.5)
        assert sorted(a["threshold"] for a in receiver.alerts) == [0.5, 1.0]
    finally:
        for server in servers:
            if server.process is not None and server.process.returncode is None:
                await server.terminate()
            await server.aclose()
    for server in servers:
        assert server.log_problems() == []


async def add_client(client: TestClient, auth_headers: dict[str, str]) -> dict[str, str]:
    r = await client.post(
        "/api/clients", json={"name": "team-a", "budgetUsd": BUDGET, "period": "day"}, headers=auth_headers
    )
    return {"Authorization": f"Bearer {(await r.json())['key']}"}


async def test_a_webhook_that_hangs_delays_no_answer(
    make_client: Any, fake_anthropic: Any, auth_headers: dict[str, str]
) -> None:
    """The receiver holds the alert's request open: the chat that crossed the threshold and the next ones
    are answered meanwhile."""
    release = asyncio.Event()
    received: list[dict[str, Any]] = []

    async def hang(request: web.Request) -> web.Response:
        received.append(await request.json())
        await release.wait()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/alerts", hang)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        client: TestClient = await make_client(
            alerts={"webhook_url": f"http://127.0.0.1:{port}/alerts", "thresholds": [0.5, 1.0], "timeout_seconds": 60},
            chat=SMALL_ANSWERS,
            thinking={"enabled": False},
        )
        headers = await add_client(client, auth_headers)
        fake_anthropic.enqueue(spend(2000), spend(500), spend(500))
        for n in (1, 2, 3):
            response = await client.post("/api/chat", json=chat_body(f"h{n}", n), headers=headers)
            assert response.status == 200 and answered(await response.read())
            if n == 1:
                await wait_until(lambda: _count_list(received, 1))
        assert len(received) == 1 and not release.is_set()  # the alert's request is still held open
    finally:
        release.set()
        await runner.cleanup()


async def test_a_webhook_that_is_down_breaks_no_chat(
    make_client: Any, fake_anthropic: Any, auth_headers: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing listens at ``webhook_url``: every chat is answered, and the lost alert is logged as an error
    once its tries are spent."""
    from tests.scale_servers import free_port

    client: TestClient = await make_client(
        alerts={"webhook_url": f"http://127.0.0.1:{free_port()}/alerts", "thresholds": [0.5]},
        chat=SMALL_ANSWERS,
        thinking={"enabled": False},
    )
    headers = await add_client(client, auth_headers)
    fake_anthropic.enqueue(spend(2000), spend(500))
    for n in (1, 2):
        response = await client.post("/api/chat", json=chat_body(f"d{n}", n), headers=headers)
        assert response.status == 200 and answered(await response.read())

    async def logged() -> bool:
        return any("not delivered to [alerts] webhook_url" in r.getMessage() for r in caplog.records)

    await wait_until(logged, timeout=20)


async def _count_list(items: list[Any], n: int) -> bool:
    return len(items) >= n


def answered(body: bytes) -> bool:
    return b'"type":"text-delta"' in body and b'"type":"error"' not in body and body.endswith(b"data: [DONE]\n\n")


async def test_a_budget_lowered_below_the_spend_alerts_at_the_change(
    make_client: Any, fake_anthropic: Any, receiver: Receiver, auth_headers: dict[str, str]
) -> None:
    """The alert was sent at the client's next record only: an admin who lowered a budget below what the client
    had spent heard nothing until the client called again (refused then: its budget was spent)."""
    client: TestClient = await make_client(
        alerts={"webhook_url": receiver.url, "thresholds": [0.5, 1.0]}, chat=SMALL_ANSWERS, thinking={"enabled": False}
    )
    r = await client.post(
        "/api/clients", json={"name": "team-b", "budgetUsd": 1, "period": "day"}, headers=auth_headers
    )
    headers = {"Authorization": f"Bearer {(await r.json())['key']}"}
    fake_anthropic.enqueue(spend(2000))
    response = await client.post("/api/chat", json=chat_body("s1", 1), headers=headers)
    await response.read()
    assert response.status == 200  # $0.006 of $1: no threshold

    patched = await client.patch("/api/clients/team-b", json={"budgetUsd": BUDGET / 2}, headers=auth_headers)
    assert patched.status == 200  # $0.006 of $0.005: both thresholds, at once
    await wait_until(lambda: _count(receiver, 2))
    assert [(a["threshold"], a["budgetUsd"]) for a in receiver.alerts] == [(0.5, BUDGET / 2), (1.0, BUDGET / 2)]
