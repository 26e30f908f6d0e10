"""Sessions that last, tried from outside (issue 28): what a long session through the web app's (and
``useChat``'s default) transport and the inspector's prediction looked like to a user."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agentspace.config import parse_config
from agentspace.pricing import model_info
from agentspace.transports import state
from scripts.harness import child_env
from tests.fakes.openai_upstream import text_response, usage
from tests.support.ws import chat, connect, receive_after
from tests.test_litellm_provider import collect, finish_of, make_request
from tests.test_prompt_cache import turn_text


def ui_text(raw: str) -> tuple[str, str]:
    """(the answer's message id, its text) from a UI message stream."""
    chunks = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
    message_id = next(c["messageId"] for c in chunks if c["type"] == "start")
    return message_id, "".join(c.get("delta", "") for c in chunks if c["type"] == "text-delta")


async def test_a_long_http_chat_that_resends_its_conversation_keeps_answering(
    make_client: Any, auth_headers: dict[str, str]
) -> None:
    """``useChat``'s default transport (and the web app) sends the whole conversation with every turn. Its text
    past ``[server] max_body_bytes`` made every later turn of the session a 413: the turns it resends are read
    only to create a session, so only the message answered keeps that limit."""
    limit = 64 * 1024
    client = await make_client(server={"max_body_bytes": limit})
    messages: list[dict[str, Any]] = []
    for turn in range(1, 13):  # 8 KB a turn: past the limit from the ninth
        messages.append({"id": f"u{turn}", "role": "user", "parts": [{"type": "text", "text": turn_text(turn, 8000)}]})
        body = {"id": "resent", "messages": messages, "trigger": "submit-message"}
        response = await client.post("/api/chat", json=body, headers=auth_headers)
        raw = await response.text()
        assert response.status == 200, (turn, len(json.dumps(body)), raw[:300])
        message_id, answer = ui_text(raw)
        messages.append({"id": message_id, "role": "assistant", "parts": [{"type": "text", "text": answer}]})
    assert len(json.dumps(messages)) > limit
    session = await (await client.get("/api/sessions/resent", headers=auth_headers)).json()
    assert len(session["session"]["messages"]) == 24

    # The message answered keeps the limit.
    big = {"id": "u-big", "role": "user", "parts": [{"type": "text", "text": "x" * (limit + 1)}]}
    response = await client.post("/api/chat", json={"id": "resent", "messages": [big]}, headers=auth_headers)
    assert response.status == 413 and (await response.json())["error"]["code"] == "PAYLOAD_TOO_LARGE"


async def test_the_inspector_predicts_the_turn_whose_history_window_moved(
    make_client: Any, token: str, fake_anthropic: Any
) -> None:
    """``[chat] history_limit`` cuts the history in steps: the turn where the cut moves sends another first
    message, so it reads nothing of what the previous call cached. The inspector predicted a read of the whole
    prefix there (its cost 12x too low); its prediction is now within 5% of the billed input on every turn."""
    fake_anthropic.caching = True
    client = await make_client(chat={"history_limit": 6})
    ws = await connect(client, token)
    session_id = ""
    moved = 0
    for turn in range(1, 11):
        text = turn_text(turn, 6000)
        predicted = None
        if session_id:
            frame = {"type": "context.inspect", "id": f"i{turn}", "sessionId": session_id, "userMessage": text}
            predicted = (await receive_after(ws, frame))["totals"]
        frames = await chat(ws, text, f"r{turn}", **({"sessionId": session_id} if session_id else {}))
        assert frames[-1]["type"] == "chat.stream.end", frames[-1]
        session_id = frames[0]["sessionId"]
        usage = frames[-1]["usage"]
        if predicted is not None:
            moved += usage["cacheReadTokens"] == 0
            billed = usage["inputCost"]
            assert abs(predicted["costWithCache"] - billed) <= 0.05 * billed, (turn, predicted, usage)
    assert moved >= 2  # the window moved on some turns (and they read nothing)
    await ws.close()


@pytest.mark.parametrize("model", ["anthropic/claude-hiaku-4-5", "nosuchprovider/model"])
def test_serve_refuses_a_compact_model_nothing_serves(tmp_path: Path, model: str) -> None:
    """A typo in ``[chat] compact_model`` started the gateway; then every compaction failed (MODEL_NOT_FOUND) and
    the turns were left out instead, only a log line saying so. It stops the start, as ``[models] default``
    does."""
    config = tmp_path / "agentspace.toml"
    config.write_text(
        f'[storage]\ndata_dir = "{tmp_path / "data"}"\n\n[chat]\ncompact_model = "{model}"\n', encoding="utf-8"
    )
    result = subprocess.run(
        [sys.executable, "-m", "agentspace", "serve", "--config", str(config), "--port", "0"],
        env=child_env(tmp_path / "data"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stdout[-500:]
    assert f"{config}: chat.compact_model: expected a model" in result.stderr and model in result.stderr
    assert "listening" not in result.stdout and "Traceback" not in result.stderr


async def test_a_summary_cuts_what_the_call_sends_not_what_history_limit_left_out(
    make_client: Any, token: str, fake_anthropic: Any
) -> None:
    """With ``[chat] history_limit`` in effect (its default, 50 messages), the oldest turns after the last cut are
    not sent. The cut counted them as freed: the summary covered them, the call after it still sent most of the
    window (40,271 tokens of 45,904, not at most half), and the next summary was bought two turns later."""
    fake_anthropic.caching = True
    window = 50_000
    client = await make_client(
        {"chat": {"context_policy": "compact"}, "pricing": {"anthropic/claude-sonnet-4-5": {"context_window": window}}}
    )
    ws = await connect(client, token)
    session_id = ""
    for turn in range(1, 71):  # 30 short turns, then 40 of 8 KB: the window overflows past history_limit
        text = f"short message {turn}" if turn <= 30 else turn_text(turn, 8000)
        frames = await chat(ws, text, f"r{turn}", **({"sessionId": session_id} if session_id else {}))
        assert frames[-1]["type"] == "chat.stream.end", frames[-1]
        session_id = frames[0]["sessionId"]
    await ws.close()
    records = await client.app[state.REGISTRY].usage.records(session_id=session_id)
    records.sort(key=lambda r: r["timestamp"])
    after = [records[i + 1] for i, r in enumerate(records[:-1]) if r.get("purpose") == "compact"]
    assert after
    half = (window - 4096) * 0.5
    for record in after:  # the call after each summary: at most half the window (and its new message)
        prompt = record["inputTokens"] + record["cacheReadTokens"] + record["cacheWriteTokens"]
        assert prompt <= half + 2100, (prompt, half)


async def test_one_hour_cache_writes_reported_through_litellm_are_priced_as_such(fake_openai: Any) -> None:
    """Claude behind litellm (Vertex AI, Bedrock) with ``prompt_cache_ttl = "1h"``: litellm reports the writes'
    split by TTL (``cache_creation_token_details``), and the gateway took them all as 5-minute writes, priced at
    1.25x the input price where the upstream bills 2x. Here through the OpenAI-compatible route litellm parses the
    same way; priced with Vertex AI's Claude rates."""
    reported = usage(1000, 5, cached=200)
    reported["prompt_tokens_details"]["cache_write_tokens"] = 700
    reported["prompt_tokens_details"]["cache_creation_token_details"] = {
        "ephemeral_5m_input_tokens": 100,
        "ephemeral_1h_input_tokens": 600,
    }
    fake_openai.enqueue(text_response("ok", usage=reported))
    got = finish_of(await collect(make_request(fake_openai))).usage
    assert got is not None
    assert (got.input_tokens, got.cache_read_tokens, got.cache_write_tokens) == (100, 200, 700)
    assert got.cache_write_1h_tokens == 600
    info = model_info(parse_config({}), "vertex_ai/claude-sonnet-4-5")
    assert info.cache_write_1h_per_mtok == 6.0
    expected = (100 * 3.0 + 200 * 0.3 + 100 * 3.75 + 600 * 6.0) / 1_000_000
    assert abs(info.cost(got).input_cost - expected) < 1e-12
