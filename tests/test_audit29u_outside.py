"""The path a new team walks (issue 29), tried from outside in new directions: docs/deploy.md's nginx in front
of ``serve --workers 2`` on PostgreSQL and Redis, with bodies past the gateway's limits, replicas and servers
going away mid-stream, and the web app at a phone's size through the proxy."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from tests.fakes.anthropic_upstream import text_response
from tests.test_deploy import HEADERS, Stack, stack  # noqa: F401 - the fixture: nginx before two workers

MIB = 1024 * 1024


async def test_a_body_past_the_v1_limit_gets_the_gateways_413_through_nginx_not_a_502(
    stack: Stack,  # noqa: F811
    fake_anthropic: Any,
) -> None:
    """deploy.md's site sets no ``client_max_body_size`` because "the gateway checks every body itself and answers
    413 in each API's shape". It refused a body past 32 MiB from its ``Content-Length`` and closed the connection
    with the rest unread: the kernel reset it under nginx, which was still sending the body (``proxy_request_buffering
    off``), and the user got nginx's HTML ``502 Bad Gateway``, which the SDKs retry (uploading it again)."""
    fake_anthropic.default = text_response("never asked")
    text = "word " * (40 * MIB // 5)
    sent = {
        "/v1/chat/completions": {
            "model": "anthropic/claude-sonnet-4-6",
            "messages": [{"role": "user", "content": text}],
        },
        "/v1/messages": {
            "model": "anthropic/claude-sonnet-4-6",
            "max_tokens": 10,
            "messages": [{"role": "user", "content": text}],
        },
        "/v1/responses": {"model": "anthropic/claude-sonnet-4-6", "input": text},
    }
    headers = {**HEADERS, "Content-Type": "application/json", "anthropic-version": "2023-06-01"}
    async with aiohttp.ClientSession() as http:
        for path, body in sent.items():
            async with http.post(f"{stack.url}{path}", ssl=stack.ssl, headers=headers, data=json.dumps(body)) as r:
                answer = await r.text()
                assert r.status == 413, (path, r.status, answer[:200])
                error = json.loads(answer)["error"]
                assert "exceeds 33554432 bytes" in error["message"], (path, error)
                if path == "/v1/messages":
                    assert error["type"] == "request_too_large", error
        # The connection to the workers is usable at once: the next call is answered.
        fake_anthropic.enqueue(text_response("Small enough."))
        small = {"model": "anthropic/claude-sonnet-4-6", "messages": [{"role": "user", "content": "Hi"}]}
        async with http.post(f"{stack.url}/v1/chat/completions", ssl=stack.ssl, headers=HEADERS, json=small) as r:
            assert r.status == 200, await r.text()
    assert not fake_anthropic.requests[:-1]  # only the small call reached the provider
