"""Bad input on every way in (issue 27's hardening round), tried from outside a third time: what the earlier
rounds (test_audit27_outside, test_audit27r_outside) left."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

import tests.fakes.anthropic_upstream as fa
import tests.fakes.openai_upstream as fo
from tests.support.terminal import on_a_terminal
from tests.support.ws import chat, connect
from tests.test_cli_e2e import run_cli, ws_url
from tests.test_clients import bearer
from tests.test_hardening import EVIL, assert_inert, post_raw


async def test_sessions_compact_escapes_the_summary_it_prints(
    client: TestClient, token: str, fake_anthropic: fa.FakeAnthropic, isolated_env: Path
) -> None:
    # The summary is a model's text, stored in the session: `sessions show` escapes it, `compact` printed it raw
    socket = await connect(client, token)
    session_id = (await chat(socket, "first", "r1"))[0]["sessionId"]
    await chat(socket, "second", "r2", sessionId=session_id)
    await socket.close()
    fake_anthropic.enqueue(fa.text_response("Summary " + EVIL, chunks=1))
    compacted = await run_cli(["sessions", "compact", session_id, "--url", ws_url(client)], isolated_env)
    assert compacted.exit_code == 0, compacted.output
    assert_inert(compacted.output, lines=True)
    assert "Summary \\x1b]0;PWNED\\x07" in compacted.output


async def test_lemonade_a_local_server_is_not_reachable_without_its_table(
    client: TestClient, token: str, fake_anthropic: fa.FakeAnthropic
) -> None:
    # litellm's lemonade provider (in its cost map, no key) calls http://localhost:8000 unless told otherwise: a
    # client's model id made the gateway POST to a local port, as ollama/x and llamafile/x did before
    status, _, body = await post_raw(
        client,
        "/v1/chat/completions",
        token,
        json.dumps(
            {"model": "lemonade/gpt-oss-20b-mxfp4-GGUF", "messages": [{"role": "user", "content": "hi"}]}
        ).encode(),
    )
    assert status == 404 and body["error"]["code"] == "model_not_found", body
    socket = await connect(client, token)
    assert (await chat(socket, "hi", model="lemonade/x"))[-1]["code"] == "MODEL_NOT_FOUND"
    await socket.close()


async def test_agentspace_chat_shows_escapes_in_an_answer_as_text(
    client: TestClient, fake_anthropic: fa.FakeAnthropic, isolated_env: Path
) -> None:
    # The answer is stored text that `sessions show` escapes; `chat` wrote it to the terminal raw (a retitled
    # terminal, colours, a cleared screen), the thinking too
    fake_anthropic.enqueue(fa.thinking_response("Thinking " + EVIL, "Answer " + EVIL + "\n\tindented"))
    result = await run_cli(["chat", "--url", ws_url(client)], isolated_env, input="hi\n")
    assert result.exit_code == 0, result.output
    assert_inert(result.output, lines=True)
    assert "Answer \\x1b]0;PWNED\\x07" in result.output and "Thinking \\x1b]0;PWNED" in result.output
    assert "\n\tindented" in result.output  # line breaks and tabs stay what they are


async def test_agentspace_ask_on_a_terminal_shows_escapes_in_the_answer_as_text(
    client: TestClient, fake_anthropic: fa.FakeAnthropic, isolated_env: Path
) -> None:
    base = str(client.make_url("/")).rstrip("/")
    fake_anthropic.enqueue(fa.text_response("Answer " + EVIL, chunks=4))
    out = await asyncio.to_thread(on_a_terminal, "ask", "--url", base, "hi")
    assert b"\x1b" not in out and b"\x07" not in out and "\x9b".encode() not in out, out
    assert b"Answer \\x1b]0;PWNED\\x07" in out, out
    fake_anthropic.enqueue(fa.text_response("Answer " + EVIL, chunks=4))
    piped = await run_cli(["ask", "--url", base, "hi"], isolated_env)  # into a pipe: the text as it is
    assert piped.exit_code == 0 and "Answer \x1b]0;PWNED\x07" in piped.output, piped.output


async def test_stream_options_include_usage_is_checked_by_type_as_stream_is(
    client: TestClient, token: str, fake_anthropic: fa.FakeAnthropic
) -> None:
    # "false" was read by truthiness: the stream ended with a usage chunk whose choices are empty, which a client
    # that asked for none indexes (choices[0]); OpenAI answers 400 for a string there
    body = {
        "model": "claude-sonnet-4-5",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": "false"},
    }
    status, _, answer = await post_raw(client, "/v1/chat/completions", token, json.dumps(body).encode())
    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_request_error", answer
    assert answer["error"]["param"] == "stream_options.include_usage", answer
    body["stream_options"] = {"include_usage": False}
    async with client.post("/v1/chat/completions", json=body, headers=bearer(token)) as resp:
        assert resp.status == 200 and b'"usage"' not in await resp.read()


async def test_a_responses_text_format_strict_is_checked_by_type(
    client: TestClient, token: str, fake_anthropic: fa.FakeAnthropic
) -> None:
    # "strict": "false" was read by truthiness and asked Claude for strict structured output; Chat Completions'
    # tools refuse a strict that is no boolean, and so does OpenAI
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    body = {
        "model": "claude-sonnet-4-5",
        "input": "hi",
        "text": {"format": {"type": "json_schema", "name": "out", "schema": schema, "strict": "false"}},
    }
    status, _, answer = await post_raw(client, "/v1/responses", token, json.dumps(body).encode())
    assert status == 400 and answer["error"]["param"] == "text.format.strict", answer
    assert not fake_anthropic.requests, "nothing is sent upstream"


async def test_a_tool_results_is_error_is_checked_by_type_on_translated_messages(
    make_client: Any, token: str, fake_openai: fo.FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    # /v1/messages for a model another provider serves: "is_error": "false" was read by truthiness and the tool's
    # result went to the model as a failure; Anthropic answers 400 for a string there
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")
    client = await make_client(providers={"openai": {"base_url": fake_openai.url}})
    call = {"type": "tool_use", "id": "t1", "name": "lookup", "input": {}}
    result = {"type": "tool_result", "tool_use_id": "t1", "content": "42", "is_error": "false"}
    body = {
        "model": "openai/gpt-4o-mini",
        "max_tokens": 50,
        "messages": [
            {"role": "user", "content": "look it up"},
            {"role": "assistant", "content": [call]},
            {"role": "user", "content": [result]},
        ],
    }
    status, _, answer = await post_raw(client, "/v1/messages", token, json.dumps(body).encode())
    assert status == 400 and answer["error"]["type"] == "invalid_request_error", answer
    assert "is_error" in answer["error"]["message"], answer
    assert not fake_openai.requests, "nothing is sent upstream"
