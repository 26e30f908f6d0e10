"""One door (issue 31) tried from outside a third time: the same request answered alike wherever it comes in."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from click.testing import CliRunner, Result

from agentspace.cli import main
from tests.fakes.anthropic_upstream import FakeAnthropic, error_status
from tests.support.ws import chat, connect, receive, receive_after
from tests.test_clients import add_client, bearer


async def test_an_auth_frame_on_an_authenticated_socket_is_refused_unless_it_is_the_sockets_credential(
    client: TestClient, token: str
) -> None:
    """A socket keeps the credential it opened with: the same one sent again is ``auth.ok``; a wrong one, none,
    or another caller's is refused (the socket stays as it was), not answered ``auth.ok`` as if it were taken."""
    other = add_client("alice")
    ws = await connect(client, token)
    assert await receive_after(ws, {"type": "auth", "id": 1, "token": token}) == {"type": "auth.ok", "requestId": 1}
    for i, frame in enumerate(({"token": "bogus"}, {}, {"token": other}), start=2):
        reply = await receive_after(ws, {"type": "auth", "id": i, **frame})
        assert (reply["type"], reply["requestId"], reply["code"]) == ("error", i, "UNAUTHORIZED"), reply
    assert (await chat(ws, "still the admin's socket"))[-1]["type"] == "chat.stream.end"
    await ws.close()
    # Authenticated by its first frame (a browser): the same rule.
    ws = await client.ws_connect("/gateway")
    assert await receive_after(ws, {"type": "auth", "id": "a", "token": other}) == {"type": "auth.ok", "requestId": "a"}
    assert await receive_after(ws, {"type": "auth", "id": "b", "token": other}) == {"type": "auth.ok", "requestId": "b"}
    reply = await receive_after(ws, {"type": "auth", "id": "c", "token": token})
    assert (reply["type"], reply["code"]) == ("error", "UNAUTHORIZED"), reply
    await ws.close()


async def test_wrong_tokens_in_auth_frames_count_as_failed_authentications(client: TestClient, token: str) -> None:
    """An authenticated socket is no way round the failed-authentication limit (docs/protocol.md): past ten a
    minute, its wrong tokens are answered RATE_LIMITED, as a new socket's would be."""
    ws = await connect(client, token)
    codes: list[str] = []
    while "RATE_LIMITED" not in codes and len(codes) < 40:  # (the limit drains as time passes: no fixed count)
        codes.append((await receive_after(ws, {"type": "auth", "id": len(codes), "token": "guess"}))["code"])
    assert codes[:10] == ["UNAUTHORIZED"] * 10 and codes[-1] == "RATE_LIMITED", codes
    await ws.close()
    ws = await client.ws_connect("/gateway")
    await ws.send_json({"type": "auth", "id": 1, "token": "guess"})
    assert (await receive(ws))["code"] == "RATE_LIMITED"
    await ws.close()


async def test_resuming_a_chat_where_nothing_of_the_callers_streams_is_204_for_a_client_key_too(
    client: TestClient, auth_headers: dict[str, str]
) -> None:
    """useChat with ``resume: true`` asks ``GET /api/chat/{id}/stream`` when a chat opens, a new one too, and takes
    any answer but 204 or a stream as a failure (it shows an error). The gateway token got 204 for a new chat's
    id, a client key 404 SESSION_NOT_FOUND, which neither docs/protocol.md nor the OpenAPI document lists.
    Another client's session answers the same 204: nothing of the caller's streams there, and it cannot tell."""
    alice, bob = add_client("alice"), add_client("bob")
    for headers in (auth_headers, bearer(alice)):
        async with client.get("/api/chat/new-chat-1/stream", headers=headers) as resp:
            assert (resp.status, await resp.read()) == (204, b""), (headers, resp.status)
    ws = await connect(client, alice)
    session_id = (await chat(ws, "alice's"))[0]["sessionId"]
    await ws.close()
    async with client.get(f"/api/chat/{session_id}/stream", headers=bearer(bob)) as resp:
        assert (resp.status, await resp.read()) == (204, b""), resp.status
    # Stopping names a running answer: nothing of the caller's to stop is the documented NOT_FOUND, for a new
    # chat's id and another client's session alike (a client key got SESSION_NOT_FOUND, the gateway token NOT_FOUND).
    for headers, sid in ((auth_headers, "new-chat-1"), (bearer(alice), "new-chat-1"), (bearer(bob), session_id)):
        async with client.delete(f"/api/chat/{sid}/stream", headers=headers) as resp:
            assert (resp.status, (await resp.json())["error"]["code"]) == (404, "NOT_FOUND"), (headers, sid)


async def test_a_websocket_refused_its_header_and_its_auth_frame_is_one_failed_authentication(
    client: TestClient,
) -> None:
    """docs/protocol.md: past ten failed authentications a minute the answer is RATE_LIMITED. A client that sends
    its credential in the upgrade's header and in an auth frame (``agentspace chat`` does) was counted twice per
    attempt, and refused RATE_LIMITED from its sixth wrong attempt; now ten, as on HTTP, then RATE_LIMITED."""
    codes = []
    for i in range(10):
        ws = await client.ws_connect("/gateway", headers={"Authorization": f"Bearer wrong-{i}"})
        await ws.send_json({"type": "auth", "id": i, "token": f"wrong-{i}"})
        codes.append((await receive(ws))["code"])
        await ws.close()
    assert codes == ["UNAUTHORIZED"] * 10, codes
    statuses: list[int] = []
    while 429 not in statuses and len(statuses) < 30:  # then RATE_LIMITED, whichever the way in
        async with client.get("/api/models", headers={"Authorization": "Bearer wrong"}) as resp:
            statuses.append(resp.status)
    assert statuses[-1] == 429, statuses


@pytest.mark.parametrize("status", [529, 503, 500])
async def test_an_upstream_failure_that_says_when_to_retry_says_it_on_every_v1_endpoint(
    make_client: Any, auth_headers: dict[str, str], fake_anthropic: FakeAnthropic, status: int
) -> None:
    """Anthropic overloaded (529) or failing (5xx) with ``retry-after``: /v1/messages passed the header on, and
    so did a /v1/messages call translated for another model; /v1/chat/completions and /v1/responses dropped it
    (on 429s only), so the OpenAI SDK retried on its own short backoff into the same overload."""
    client = await make_client(chat={"max_retries": 0})
    calls = (
        (
            "/v1/messages",
            {"model": "claude-sonnet-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "Hi"}]},
        ),
        (
            "/v1/chat/completions",
            {"model": "anthropic/claude-sonnet-4-5", "messages": [{"role": "user", "content": "Hi"}]},
        ),
        ("/v1/responses", {"model": "anthropic/claude-sonnet-4-5", "input": "Hi"}),
    )
    for path, body in calls:
        fake_anthropic.enqueue(error_status(status, retry_after=7))
        async with client.post(path, json=body, headers=auth_headers) as resp:
            assert resp.status >= 500 and resp.headers.get("Retry-After") == "7", (path, resp.status, resp.headers)


async def test_ask_can_lower_what_a_budget_reserves_as_its_refusal_advises(
    client: TestClient, fake_anthropic: FakeAnthropic, isolated_env: Path
) -> None:
    """``agentspace ask`` goes through /v1/chat/completions, which without ``max_tokens`` reserves the model's
    own output limit (64,000 on Claude Haiku 4.5: $0.32). A client with $0.10 left chats on the WebSocket (the
    turn reserves ``[chat] max_tokens`` and the thinking budget) but ``ask`` was refused with "lower max_tokens",
    which it had no way to do. ``--max-tokens`` sends it."""
    key = add_client("ana", "--budget", "0.1")
    model = "anthropic/claude-haiku-4-5"

    def ask(*options: str) -> Result:
        args = ["ask", "--url", str(client.make_url("/")), "--token", key, "-m", model, *options, "hi"]
        return CliRunner().invoke(main, args, env={"AGENTSPACE_HOME": str(isolated_env)})

    refused = await asyncio.to_thread(ask)
    assert refused.exit_code == 1 and "BUDGET_EXCEEDED" in refused.output, refused.output
    assert "lower max_tokens" in refused.output
    ws = await connect(client, key)
    assert (await chat(ws, "hi", model=model))[-1]["type"] == "chat.stream.end"
    await ws.close()
    asked = await asyncio.to_thread(ask, "--max-tokens", "1000")
    assert asked.exit_code == 0, asked.output
    assert fake_anthropic.requests[-1].body["max_tokens"] == 1000
