"""The terminal clients against the real gateway: `agentspace chat`, `inspect`, `sessions` and `usage` through
click's runner, with the server and the fake Anthropic upstream running on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient
from click.testing import CliRunner, Result

from agentspace.cli import main as cli
from tests.fakes.anthropic_upstream import text_response, thinking_response


async def run_cli(args: list[str], home: Path, input: str | None = None) -> Result:
    # The CLI runs its own event loop: give it a thread while the server keeps serving on ours.
    runner = CliRunner()
    return await asyncio.to_thread(runner.invoke, cli, args, input=input, env={"AGENTSPACE_HOME": str(home)})


def ws_url(client: TestClient) -> str:
    return str(client.make_url("/gateway")).replace("http://", "ws://")


async def test_chat_inspect_sessions_usage(client: TestClient, fake_anthropic: Any, isolated_env: Path) -> None:
    fake_anthropic.enqueue(
        thinking_response(
            "Considering the question.",
            "First answer.",
            usage={"input_tokens": 20},
            delta_usages=[{"output_tokens": 9}],
        ),
        text_response("Second answer.", usage={"input_tokens": 30}, delta_usages=[{"output_tokens": 4}]),
    )
    result = await run_cli(["chat", "--url", ws_url(client)], isolated_env, input="What is it?\nAnd then?\n")
    assert result.exit_code == 0, result.output
    assert "First answer." in result.output and "Second answer." in result.output
    assert "Considering the question." in result.output  # reasoning is shown (dimmed on a terminal)
    assert "20 in / 9 out tokens" in result.output and "30 in / 4 out tokens" in result.output

    listed = await run_cli(["sessions", "list", "--json"], isolated_env)
    (session,) = json.loads(listed.output)
    assert session["messageCount"] == 4 and session["title"] == "What is it?"
    # both lines went to one session: the second call carried the first exchange
    assert len(fake_anthropic.requests[-1].body["messages"]) == 3

    inspected = await run_cli(["inspect", session["id"], "--url", ws_url(client)], isolated_env)
    assert inspected.exit_code == 0, inspected.output
    for name in ("system_prompt", "response_format", "history", "user_message"):
        assert name in inspected.output

    usage = await run_cli(["usage", "--by-model"], isolated_env)
    assert usage.exit_code == 0 and "anthropic/claude-sonnet-4-5" in usage.output
    assert json.loads((await run_cli(["usage", "--json"], isolated_env)).output)["grandTotal"]["totalTokens"] == 63

    shown = await run_cli(["sessions", "show", session["id"]], isolated_env)
    assert "Second answer." in shown.output


async def test_chat_takes_the_http_url_ask_takes(client: TestClient, fake_anthropic: Any, isolated_env: Path) -> None:
    # `ask --url` and `chat --url` share AGENTSPACE_URL: the gateway's http(s) address must do for both, as
    # docs/deploy.md's https://gateway.example.com does for ask (chat dials its /gateway WebSocket).
    base = str(client.make_url("/")).rstrip("/")
    for url in (base, base + "/"):
        fake_anthropic.enqueue(text_response(f"Over {url}."))
        result = await run_cli(["chat", "--url", url], isolated_env, input="hello\n")
        assert result.exit_code == 0, result.output
        assert f"Over {url}." in result.output


async def test_chat_reports_errors(client: TestClient, isolated_env: Path, monkeypatch: Any) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    result = await run_cli(["chat", "--url", ws_url(client)], isolated_env, input="hello\n")
    assert result.exit_code == 1
    assert "NO_API_KEY" in result.output and "agentspace keys add anthropic" in result.output


async def test_the_cli_reads_what_the_server_stores_while_it_runs(
    client: TestClient, fake_anthropic: Any, isolated_env: Path, auth_headers: dict[str, str]
) -> None:
    # The server keeps recent sessions parsed in a cache only its own writes change; the CLI reads the files.
    # After each turn both must show the same session and the same usage, and a deletion by the CLI must not
    # be undone by the server's cached copy.
    async def turn(chat_id: str, n: int) -> None:
        fake_anthropic.enqueue(text_response(f"Answer {n}.", usage={"input_tokens": 10 + n}))
        body = {
            "id": chat_id,
            "messages": [{"id": f"u{n}", "role": "user", "parts": [{"type": "text", "text": f"Q{n}"}]}],
        }
        resp = await client.post("/api/chat", json=body, headers=auth_headers)
        assert resp.status == 200 and (await resp.read()).endswith(b"data: [DONE]\n\n")

    for n in range(3):
        await turn("live", n)
        served = (await (await client.get("/api/sessions/live", headers=auth_headers)).json())["session"]
        shown = await run_cli(["sessions", "show", "live", "--json"], isolated_env)
        assert shown.exit_code == 0, shown.output
        assert json.loads(shown.output)["messages"] == served["messages"]
        assert [m["content"] for m in served["messages"]][-2:] == [f"Q{n}", f"Answer {n}."]
        report = await (await client.get("/api/usage?by=session", headers=auth_headers)).json()
        cli_report = json.loads((await run_cli(["usage", "--by-session", "--json"], isolated_env)).output)
        assert cli_report["perSession"] == report["perSession"]
        assert report["perSession"]["live"]["inputTokens"] == sum(10 + k for k in range(n + 1))

    deleted = await run_cli(["sessions", "delete", "live", "--yes"], isolated_env)
    assert deleted.exit_code == 0, deleted.output
    gone = await client.get("/api/sessions/live", headers=auth_headers)
    assert gone.status == 404 and (await gone.json())["error"]["code"] == "SESSION_NOT_FOUND"
    await turn("live", 9)  # the same id again: a new session, without the deleted one's messages
    served = (await (await client.get("/api/sessions/live", headers=auth_headers)).json())["session"]
    assert [m["content"] for m in served["messages"]] == ["Q9", "Answer 9."]
    shown = await run_cli(["sessions", "show", "live", "--json"], isolated_env)
    assert json.loads(shown.output)["messages"] == served["messages"]


async def test_an_untrusted_certificate_is_named_not_a_stopped_gateway(tmp_path: Path, isolated_env: Path) -> None:
    # docs/deploy.md puts the gateway behind nginx with TLS: a client machine that does not trust the
    # certificate (self-signed, an internal CA) must be told so, not to start a server that is running.
    import ssl
    import subprocess

    from aiohttp import web

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", str(key), "-out", str(cert),
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    runner = web.AppRunner(web.Application())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        for command in (["ask", "--token", "t", "hi"], ["chat", "--token", "t"]):
            result = await run_cli([*command, "--url", f"https://127.0.0.1:{port}"], isolated_env, input="hi\n")
            assert result.exit_code == 1, result.output
            assert "certificate" in result.output and "SSL_CERT_FILE" in result.output, result.output
            assert "agentspace serve" not in result.output, result.output
    finally:
        await runner.cleanup()


async def test_chat_and_ask_say_when_to_try_again(
    client: TestClient, fake_anthropic: Any, isolated_env: Path, auth_headers: dict[str, str]
) -> None:
    # A refusal that says when to retry (a client's rpm here) printed only "Error [RATE_LIMITED]: ..." (chat) or
    # "HTTP 429 ..." (ask): the seconds the server sent (retryAfter, Retry-After) were dropped.
    made = await client.post("/api/clients", json={"name": "slow", "rpm": 1}, headers=auth_headers)
    key = (await made.json())["key"]
    fake_anthropic.enqueue(text_response("One."))
    chat = await run_cli(["chat", "--url", ws_url(client), "--token", key], isolated_env, input="one\ntwo\n")
    assert "One." in chat.output
    assert "Error [RATE_LIMITED]" in chat.output and "(try again in " in chat.output, chat.output
    base = str(client.make_url("/")).rstrip("/")
    ask = await run_cli(["ask", "--url", base, "--token", key, "three"], isolated_env)
    assert ask.exit_code == 1 and "HTTP 429" in ask.output and "(try again in " in ask.output, ask.output
