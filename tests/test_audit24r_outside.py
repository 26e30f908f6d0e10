"""Issue 24 (one metered call) tried again from outside: refusals, spend and records as a third-party client
sees them."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from agentspace.storage.embedded.usage import UsageStore
from scripts.harness import GatewayProcess
from tests.fakes import anthropic_upstream as fa
from tests.scale_servers import Redis, free_port
from tests.test_clients import add_client, bearer, cli

MESSAGES = [{"role": "user", "content": "hi"}]


async def test_redis_unreachable_is_a_503_that_says_when_to_retry_on_every_way_in(
    tmp_path: Path, fake_anthropic: Any, pg_dsn: str
) -> None:
    """docs/accounting.md: while Redis cannot be reached, admission fails closed as during a rebuild
    (SERVICE_UNAVAILABLE with Retry-After); the SDKs retry a 503 when it says when (x-should-retry is not false)."""
    redis_srv = Redis()  # its own: this test stops it
    storage = {"backend": "postgres", "dsn": pg_dsn, "redis_url": redis_srv.url}
    gateway = GatewayProcess(tmp_path / "data", fake_anthropic.url, storage=storage)
    try:
        await gateway.start()
        admin = bearer(gateway.token)
        async with aiohttp.ClientSession() as http:
            async with http.post(gateway.url + "/api/clients", json={"name": "bob"}, headers=admin) as resp:
                bob = bearer((await resp.json())["key"])
            redis_srv.close()
            calls: list[tuple[str, dict[str, str], dict[str, Any]]] = [
                ("/v1/messages", bob, {"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": MESSAGES}),
                ("/v1/messages/count_tokens", bob, {"model": "claude-sonnet-4-5", "messages": MESSAGES}),
                ("/v1/chat/completions", bob, {"model": "anthropic/claude-sonnet-4-5", "messages": MESSAGES}),
                ("/v1/responses", bob, {"model": "anthropic/claude-sonnet-4-5", "input": "hi"}),
                ("/v1/embeddings", bob, {"model": "openai/text-embedding-3-small", "input": "hi"}),
            ]
            for i, who in enumerate((bob, admin)):  # a chat's stream lock is in Redis: the gateway token's too
                chat = {
                    "id": f"s{i}",
                    "messages": [{"id": "m", "role": "user", "parts": [{"type": "text", "text": "hi"}]}],
                }
                calls.append(("/api/chat", who, chat))
            for path, who, body in calls:
                async with http.post(gateway.url + path, json=body, headers=who) as resp:
                    text = await resp.text()
                    assert resp.status == 503 and "Redis" in text, (path, text)
                    assert resp.headers.get("Retry-After") == "1", (path, dict(resp.headers))
                    assert resp.headers.get("x-should-retry") != "false", (path, dict(resp.headers))
    finally:
        await gateway.aclose()
        redis_srv.close()


class GatedUpstream:
    """An upstream whose first request waits until the test lets it go, then fails as an overloaded provider
    does (a deployment failure a model group moves on from); any later request answers 500 too."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()
        self.paths: list[str] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.paths.append(request.path)
        self.arrived.set()
        await self.release.wait()
        body = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        return web.json_response(body, status=529 if "messages" in request.path else 500)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("POST", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        self.release.set()
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"model": "claude", "max_tokens": 100, "messages": MESSAGES}),
        ("/v1/chat/completions", {"model": "claude", "max_tokens": 100, "messages": MESSAGES, "stream": True}),
        ("/v1/responses", {"model": "claude", "max_output_tokens": 100, "input": "hi"}),
        ("/v1/embeddings", {"model": "vectors", "input": "hi"}),
    ],
)
async def test_a_model_groups_next_attempt_refused_for_the_budget_is_a_budget_refusal(
    make_client: Any, monkeypatch: pytest.MonkeyPatch, path: str, body: dict[str, Any]
) -> None:
    """Each attempt of a model group is admitted at the moment it is made (docs/routing.md). One refused
    because the budget went meanwhile was answered 403 `invalid_request_error` (no `insufficient_quota`, no
    Retry-After, no x-should-retry): the refusal a first attempt gets, in each API's shape."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-0123456789")
    upstream = GatedUpstream()
    await upstream.start()
    try:
        twice = [{"base_url": upstream.url, "name": name} for name in ("a", "b")]
        groups = {
            "claude": {"deployments": [{"model": "anthropic/claude-sonnet-4-5", **d} for d in twice]},
            "vectors": {"deployments": [{"model": "openai/text-embedding-3-small", **d} for d in twice]},
        }
        client = await make_client(models={"groups": groups})
        key = add_client("ci-bot", "--budget", "1")
        call = asyncio.create_task(client.post(path, json=body, headers=bearer(key)))
        await upstream.arrived.wait()  # the first deployment has the call ...
        cli("clients", "set", "ci-bot", "--budget", "0")  # ... when the budget goes
        upstream.release.set()  # the first deployment fails: the next attempt is admitted now, and refused
        async with await call as resp:
            answer = await resp.json()
            assert resp.status == 429, answer
            assert answer["error"]["code"] == "insufficient_quota", answer
            assert answer["error"]["message"].startswith("BUDGET_EXCEEDED: "), answer
            assert resp.headers.get("x-should-retry") == "false" and resp.headers.get("Retry-After"), resp.headers
        assert len(upstream.paths) == 1, upstream.paths  # nothing went to the second deployment
    finally:
        await upstream.close()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 1024, "messages": MESSAGES, "stream": True}),
        ("/v1/chat/completions", {"model": "anthropic/claude-sonnet-4-5", "messages": MESSAGES, "stream": True}),
    ],
)
async def test_a_v1_stream_still_running_when_the_grace_ends_is_stopped_and_recorded_before_the_sinks_close(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic, path: str, body: dict[str, Any]
) -> None:
    """docs/deploy.md: on SIGTERM, running answers (/v1 streams too) get [server] shutdown_grace_seconds, then
    are stored as aborted. A /v1 stream was not stopped at the grace's end: aiohttp's own shutdown waited for
    it twice more (grace + 5 s each), then closed the sinks and stores under it ("usage sink 'budget-alerts':
    queue full ...; dropped record") and the call's record was written, if at all, after they had closed."""
    fake_anthropic.default = fa.text_response("word " * 60, chunks=60, usage={"input_tokens": 4000}).stall(600, after=8)
    server = GatewayProcess(tmp_path / "data", fake_anthropic.url, server={"shutdown_grace_seconds": 1.0})
    try:
        await server.start()
        headers = {"Authorization": f"Bearer {server.token}", "anthropic-version": "2023-06-01"}
        async with aiohttp.ClientSession() as http:
            resp = await http.post(server.url + path, json=body, headers=headers)
            assert resp.status == 200, await resp.text()
            await resp.content.readany()  # the stream has begun
            assert server.process is not None
            server.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(aiohttp.ClientError):  # cut: the answer did not end
                await resp.read()
        assert await server.process.wait() == 0
    finally:
        await server.aclose()
    assert "dropped record" not in server.log(), server.log()
    assert server.log_problems() == [], server.log_problems()
    (record,) = UsageStore(server.data_dir).records_sync()
    assert (record["finishReason"], record["error"], record["inputTokens"]) == ("aborted", "ABORTED", 4000), record


async def test_a_call_too_dear_for_the_budget_is_told_what_to_lower_in_its_own_apis_fields(
    make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/accounting.md: a call whose reservation alone passes what is left is refused with a message that
    says how to fit. /v1/responses and /v1/embeddings were told to "lower max_tokens" (a field neither has:
    OpenAI's Responses API refuses it) and of a thinking budget."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-0123456789")
    client = await make_client()
    key = add_client("ci-bot", "--budget", "0.00001")
    calls = {
        "/v1/responses": (
            {"model": "anthropic/claude-sonnet-4-5", "input": "hi", "max_output_tokens": 5000},
            "max_output_tokens",
        ),
        "/v1/embeddings": ({"model": "openai/text-embedding-3-small", "input": "hello world " * 1000}, "send less"),
        "/v1/chat/completions": (
            {"model": "anthropic/claude-sonnet-4-5", "messages": MESSAGES, "max_tokens": 5000},
            "max_tokens",
        ),
    }
    for path, (body, named) in calls.items():
        async with client.post(path, json=body, headers=bearer(key)) as resp:
            message = (await resp.json())["error"]["message"]
            assert resp.status == 429 and "may cost up to" in message and named in message, (path, message)
            if path != "/v1/chat/completions":
                assert "max_tokens" not in message and "thinking" not in message, (path, message)
