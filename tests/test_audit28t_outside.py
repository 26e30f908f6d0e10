"""Sessions that last, tried from outside a fourth time (issue 28): compacting on demand after turns that failed,
the summarising call under a passing overload, and the prompt cache's marks."""

from __future__ import annotations

import json
from typing import Any

from agentspace.context_policy import COMPACT_PROMPT
from agentspace.transports import state
from tests.fakes.anthropic_upstream import error_status, text_response
from tests.support.ws import chat, connect, receive_after
from tests.test_prompt_cache import MarkedTools, turn_text


async def test_compacting_after_failed_turns_keeps_the_latest_answered_turn(
    make_client: Any, token: str, fake_anthropic: Any
) -> None:
    """A turn that fails before any output (the upstream refused it, or CONTEXT_TOO_LONG under ``refuse``, whose
    message says to compact) leaves an empty answer. Compacting on demand summarises every turn but the latest:
    the latest that was answered, not the failed one, which no call resends."""
    client = await make_client(chat={"max_retries": 0})
    ws = await connect(client, token)
    frames = await chat(ws, "My name is Ada.")
    session_id = frames[0]["sessionId"]
    fake_anthropic.enqueue(text_response("Noted: 42."))
    await chat(ws, "Remember the number 42.", "r2", sessionId=session_id)
    for n in range(2):  # two turns the upstream refuses: nothing of them is resent
        fake_anthropic.enqueue(error_status(400, "refused"))
        assert (await chat(ws, f"failing {n}", f"f{n}", sessionId=session_id))[-1]["type"] == "error"
    fake_anthropic.enqueue(text_response("Ada's summary."))
    reply = await receive_after(ws, {"type": "session.compact", "id": "c", "sessionId": session_id})
    assert reply["type"] == "session.compacted" and reply["compacted"] is True, reply
    assert reply["summarizedMessages"] == 2, reply  # the first turn only
    summarised = json.dumps(fake_anthropic.requests[-1].body["messages"])
    assert "Ada" in summarised and "42" not in summarised
    await chat(ws, "Which number?", "after", sessionId=session_id)
    sent = fake_anthropic.requests[-1].body
    assert "Ada's summary." in json.dumps(sent["system"])
    assert "Remember the number 42." in json.dumps(sent["messages"]), sent["messages"]  # the latest turn is kept
    # One answered turn and a failed one: nothing to compact (the only answered turn is the latest).
    frames = await chat(ws, "Alone.", "a1")
    alone = frames[0]["sessionId"]
    fake_anthropic.enqueue(error_status(400, "refused"))
    await chat(ws, "failing", "a2", sessionId=alone)
    calls = len(fake_anthropic.requests)
    reply = await receive_after(ws, {"type": "session.compact", "id": "c2", "sessionId": alone})
    assert reply["compacted"] is False and len(fake_anthropic.requests) == calls, reply
    assert all(r.body.get("system") != COMPACT_PROMPT for r in fake_anthropic.requests[calls:])
    await ws.close()


async def test_the_summarising_call_is_retried_after_an_overload_as_a_turn_is(
    client: Any, token: str, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    """[chat] max_retries retries a model call that failed with a retryable error (529, 429, 5xx): the summarising
    call too. Before, one passing overload failed compacting on demand (a 502), and under ``compact`` left the
    oldest turns out unsummarised for good."""
    ws = await connect(client, token)
    frames = await chat(ws, "My name is Ada.")
    session_id = frames[0]["sessionId"]
    await chat(ws, "And I like primes.", "r2", sessionId=session_id)
    await ws.close()
    fake_anthropic.enqueue(error_status(529, retry_after=0), text_response("Ada likes primes."))
    response = await client.post(f"/api/sessions/{session_id}/compact", headers=auth_headers)
    body = await response.json()
    assert response.status == 200 and body["compacted"] is True and body["summary"] == "Ada likes primes.", body
    summaries = [r for r in fake_anthropic.requests if r.body.get("system") == COMPACT_PROMPT]
    assert len(summaries) == 2  # the overloaded attempt and the retry
    registry = client.app[state.REGISTRY]
    compactions = [r for r in await registry.usage.records(session_id=session_id) if r.get("purpose") == "compact"]
    assert len(compactions) == 1 and compactions[0]["attempts"] == 2 and compactions[0]["error"] is None, compactions


async def test_one_hour_marks_never_follow_a_plugin_tools_five_minute_mark(
    make_client: Any, token: str, fake_anthropic: Any, plugin_manager: Any
) -> None:
    """With ``prompt_cache_ttl = "1h"``, a plugin tool marked as Anthropic's docs show (``{"type": "ephemeral"}``:
    5 minutes) came before the gateway's one-hour marks, which the API refuses (a longer-lived entry must come
    first), so every turn failed. The gateway's marks follow the shorter TTL then."""
    fake_anthropic.caching = True
    plugin_manager.register(MarkedTools())
    client = await make_client({"chat": {"prompt_cache_ttl": "1h"}}, pm=plugin_manager)
    ws = await connect(client, token)
    session_id = None
    for turn in (1, 2):
        extra = {"sessionId": session_id} if session_id else {}
        frames = await chat(ws, turn_text(turn), f"r{turn}", **extra)
        assert frames[-1]["type"] == "chat.stream.end", frames[-1]
        session_id = frames[0]["sessionId"]
    assert frames[-1]["usage"]["cacheReadTokens"] > 0
    await ws.close()


async def test_the_history_window_starts_at_a_question_not_an_answer(
    make_client: Any, token: str, fake_anthropic: Any
) -> None:
    """``[chat] history_limit``'s window moves in steps of half the limit. With an odd half (the default limit, 50,
    moves by 25 messages) it started at an answer on every other step: half the turns of a long session sent an
    answer without its question first, which Bedrock's Converse API (Claude behind litellm) refuses. The window
    starts at the question after that point; it still stays put between steps, so the cache keeps reading."""
    fake_anthropic.caching = True
    client = await make_client({"chat": {"history_limit": 6}})
    ws = await connect(client, token)
    session_id = None
    reads = []
    for turn in range(1, 12):
        extra = {"sessionId": session_id} if session_id else {}
        frames = await chat(ws, turn_text(turn, 6_000), f"r{turn}", **extra)
        assert frames[-1]["type"] == "chat.stream.end", frames[-1]
        session_id = frames[0]["sessionId"]
        sent = fake_anthropic.requests[-1].body["messages"]
        assert sent[0]["role"] == "user" and len(sent) <= 6 + 1, [m["role"] for m in sent]
        reads.append(frames[-1]["usage"]["cacheReadTokens"])
    assert sum(1 for r in reads[1:] if r > 0) >= 5, reads  # most turns still read the previous prefix
    await ws.close()


async def test_a_summarising_call_that_stops_sending_ends_at_the_idle_timeout(
    make_client: Any, token: str, fake_anthropic: Any
) -> None:
    """``[chat] idle_timeout_seconds`` ends a call whose provider sends nothing for that long: the summarising call
    too. Before, a summary that stalled held compacting on demand (and, under ``compact``, the turn that needed it,
    before any output) until the provider's own timeout, ten minutes by default."""
    # (long enough for a loaded machine's first call, which loads the provider's SDK within the idle clock)
    client = await make_client(chat={"idle_timeout_seconds": 8.0, "max_retries": 0})
    ws = await connect(client, token)
    frames = await chat(ws, "one")
    session_id = frames[0]["sessionId"]
    assert (await chat(ws, "two", "r2", sessionId=session_id))[-1]["type"] == "chat.stream.end"
    fake_anthropic.enqueue(text_response("late summary").stall(60, after=1))
    reply = await receive_after(ws, {"type": "session.compact", "id": "c", "sessionId": session_id})
    assert reply["type"] == "error" and reply["code"] == "LLM_ERROR" and "idle" in reply["message"], reply
    records = await client.app[state.REGISTRY].usage.records(session_id=session_id)
    compactions = [r for r in records if r.get("purpose") == "compact"]
    assert len(compactions) == 1 and compactions[0]["error"] == "LLM_ERROR", compactions
    fake_anthropic.release()
    await ws.close()
