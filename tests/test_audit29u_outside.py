"""The path a new team walks (issue 29), tried from outside in new directions: docs/deploy.md's nginx in front
of ``serve --workers 2`` on PostgreSQL and Redis, with bodies past the gateway's limits, replicas and servers
going away mid-stream, and the web app at a phone's size through the proxy."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from agentspace import cluster
from tests.fakes.anthropic_upstream import text_response
from tests.scale_servers import Redis
from tests.test_deploy import HEADERS, PUBLIC, TOKEN, Stack, stack, wait_for  # noqa: F401 - stack: the fixture
from tests.test_deploy import pytestmark as needs_nginx
from tests.test_web_app import CHROMIUM, PHONE, playwright_api

pytestmark = needs_nginx
MIB = 1024 * 1024


async def test_a_body_past_the_v1_limit_gets_the_gateways_413_through_nginx_not_a_502(
    stack: Stack,  # noqa: F811
    fake_anthropic: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """deploy.md's site sets no ``client_max_body_size`` because "the gateway checks every body itself and answers
    413 in each API's shape". It refused a body past 32 MiB from its ``Content-Length`` and closed the connection
    with the rest unread: the kernel reset it under nginx, which was still sending the body (``proxy_request_buffering
    off``), and the official SDKs got nginx's HTML ``502 Bad Gateway`` (which they retry, uploading it again)."""
    fake_anthropic.default = text_response("never asked")
    monkeypatch.setenv("SSL_CERT_FILE", str(stack.cert))  # the SDKs trust the proxy's certificate
    text = "word " * (40 * MIB // 5)
    model = "anthropic/claude-sonnet-4-6"

    def calls() -> list[Exception]:
        headers = {"Host": PUBLIC}
        oai = openai.OpenAI(base_url=stack.url + "/v1", api_key=TOKEN, default_headers=headers, max_retries=0)
        claude = anthropic.Anthropic(base_url=stack.url, api_key=TOKEN, default_headers=headers, max_retries=0)
        refused = []
        for _ in range(3):  # a race before: the reset reached nginx before or after the answer
            for call in (
                lambda: oai.chat.completions.create(model=model, messages=[{"role": "user", "content": text}]),
                lambda: oai.responses.create(model=model, input=text),
                lambda: claude.messages.create(
                    model=model, max_tokens=10, messages=[{"role": "user", "content": text}]
                ),
            ):
                try:
                    call()
                except Exception as e:  # noqa: BLE001 - each is checked below
                    refused.append(e)
        return refused

    refused = await asyncio.to_thread(calls)
    assert len(refused) == 9
    for error in refused:
        assert getattr(error, "status_code", None) == 413, repr(error)
        assert "exceeds 33554432 bytes" in str(error), error
    assert "request_too_large" in str(refused[2])  # Anthropic's type, from /v1/messages
    # The connection to the workers is usable at once: the next call is answered.
    fake_anthropic.enqueue(text_response("Small enough."))
    small = {"model": model, "messages": [{"role": "user", "content": "Hi"}]}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{stack.url}/v1/chat/completions", ssl=stack.ssl, headers=HEADERS, json=small) as r:
            assert r.status == 200, await r.text()
    assert len(fake_anthropic.requests) == 1  # only the small call reached the provider


def serving_worker(redis_url: str) -> int:
    """The PID of the worker streaming the one running answer: its replica id (``host-PID-random``) holds the
    session's stream lock in Redis."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        [key] = client.keys(f"{cluster.PREFIX}:lock:*")
        holder = client.get(key)
    finally:
        client.close()
    assert holder is not None
    return int(holder.decode().rsplit(":", 1)[0].rsplit("-", 2)[1])


@pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium not found: apt-get install chromium (scripts/test does it as root)"
)
async def test_the_web_app_on_a_phone_says_so_when_the_worker_streaming_its_answer_dies(
    stack: Stack,  # noqa: F811
    fake_anthropic: Any,
    redis_srv: Redis,
) -> None:
    """Chromium at a phone's size, through deploy.md's nginx, on ``serve --workers 2``: the worker streaming the
    answer is killed (an OOM kill, a crash). The web app read the broken stream as an error, then reloaded the
    stored session, which has no answer (it died with its worker): the question stood there with nothing under it,
    no error, no partial answer. It now asks for the answer again (``GET /api/chat/{id}/stream``, on any worker),
    which replays what was said and ends with the gateway's error, and keeps that error on screen."""
    port = int(stack.url.rsplit(":", 1)[1])
    # The browser's origin has the port: deploy.md says to list it in allowed_origins then.
    await asyncio.to_thread(stack.stop)
    text = stack.config.read_text(encoding="utf-8")
    stack.config.write_text(
        text.replace(f'allowed_origins = ["https://{PUBLIC}"]', f'allowed_origins = ["https://{PUBLIC}:{port}"]'),
        encoding="utf-8",
    )
    stack.start()
    await wait_for(f"http://127.0.0.1:{stack.gateway_port}/healthz")
    words = [f"word{n} " for n in range(40)]
    fake_anthropic.enqueue(text_response("".join(words), chunks=words).with_delay(0.25))
    await asyncio.to_thread(browse_and_kill, port, redis_srv.url)


def browse_and_kill(port: int, redis_url: str) -> None:
    """Send a message from a phone-sized Chromium; kill the worker streaming its answer; check what is shown."""
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", f"--host-resolver-rules=MAP {PUBLIC} 127.0.0.1"],
        )
        try:
            context = browser.new_context(viewport=PHONE, ignore_https_errors=True, is_mobile=True, has_touch=True)
            page = context.new_page()
            page.goto(f"https://{PUBLIC}:{port}/")
            page.get_by_label("Gateway token or client key").fill(TOKEN)
            page.get_by_role("button", name="Sign in").click()
            page.get_by_role("navigation", name="Pages").wait_for()
            prompt = page.get_by_label("Message", exact=True)
            prompt.fill("Hello")
            prompt.press("Enter")
            answer = page.locator("li.message.assistant").last
            answer.get_by_text("word3").wait_for(timeout=30_000)
            os.kill(serving_worker(redis_url), signal.SIGKILL)
            alert = page.get_by_role("alert")
            alert.wait_for(timeout=60_000)  # the other worker tells once the dead one's lease lapses
            assert "stopped" in alert.inner_text(), alert.inner_text()
            assert "word0" in answer.inner_text()  # what was said before the kill stays
            page.wait_for_timeout(2000)  # the sessions list and the stored session are read again: it stays
            assert page.get_by_role("alert").count() == 1
            assert page.locator("li.message.user").last.inner_text().strip() == "Hello"
            assert page.get_by_role("button", name="Send").is_enabled()
        finally:
            browser.close()
