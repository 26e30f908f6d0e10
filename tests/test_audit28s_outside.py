"""Sessions that last, tried from outside again (issue 28): a long session's edits and regenerates through
``useChat``'s body shapes after the context-window policy ran, the prompt cache's records, search and export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from agentspace.context_policy import COMPACT_PROMPT
from agentspace.transports import state
from tests.fakes.anthropic_upstream import error_status, prompt_blocks, text_response
from tests.support.ws import connect, receive_after
from tests.test_cli_e2e import run_cli
from tests.test_prompt_cache import turn_text


def user(message_id: str, text: str) -> dict[str, Any]:
    return {"id": message_id, "role": "user", "parts": [{"type": "text", "text": text}]}


async def ui_chat(client: TestClient, headers: dict[str, str], body: dict[str, Any]) -> list[dict[str, Any]]:
    """POST /api/chat; the UI message stream's chunks (the answer must finish)."""
    response = await client.post("/api/chat", json=body, headers=headers)
    raw = await response.text()
    assert response.status == 200, raw[:500]
    chunks = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
    assert chunks[-1]["type"] == "finish", chunks[-3:]
    return chunks


async def use_chat_turns(client: TestClient, headers: dict[str, str], session_id: str, texts: list[str]) -> list[Any]:
    """Turns as ``useChat`` sends them: the whole conversation so far, its answers with the ids the stream gave."""
    messages: list[dict[str, Any]] = []
    for n, text in enumerate(texts, 1):
        messages.append(user(f"u{n}", text))
        chunks = await ui_chat(client, headers, {"id": session_id, "messages": messages, "trigger": "submit-message"})
        answer = "".join(c.get("delta", "") for c in chunks if c["type"] == "text-delta")
        message_id = next(c["messageId"] for c in chunks if c["type"] == "start")
        messages.append({"id": message_id, "role": "assistant", "parts": [{"type": "text", "text": answer}]})
    return messages


def sent_text(body: dict[str, Any]) -> str:
    return json.dumps([body.get("system"), body["messages"]], ensure_ascii=False)


async def test_an_edit_before_the_summary_leaves_the_summary_of_the_conversation_it_replaced(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    """A compacted session whose user edits a message the summary covers (``sendMessage`` with its
    ``messageId``): the answers after it are set aside, the summary's mark among them. Every later call still
    started after that mark: it sent the summary of the conversation the user had just edited away, and not
    the edited question (nor anything before the mark); the call began with an assistant message."""
    texts = [f"Turn {n}: the code word of turn {n} is WORD{n}." for n in range(1, 5)]
    messages = await use_chat_turns(client, auth_headers, "edited", texts)
    fake_anthropic.enqueue(text_response("OLD SUMMARY: the code words were WORD1, WORD2 and WORD3."))
    response = await client.post("/api/sessions/edited/compact", headers=auth_headers)
    assert (await response.json())["compacted"] is True

    # The user edits turn 2 (useChat sends the conversation up to the edited message, with its id).
    edited = [*messages[:2], user("u2", "Turn 2, edited: the code word is NEWWORD.")]
    await ui_chat(client, auth_headers, {"id": "edited", "messages": edited, "trigger": "submit-message"})
    chunks = await ui_chat(
        client, auth_headers, {"id": "edited", "messages": [user("u5", "What was the code word of turn 2?")]}
    )
    assert chunks[-1]["finishReason"] == "stop"
    sent = fake_anthropic.requests[-1].body
    assert "OLD SUMMARY" not in sent_text(sent), sent["system"]
    assert "NEWWORD" in sent_text(sent) and "WORD1" in sent_text(sent)
    assert sent["messages"][0]["role"] == "user"
    # The inspector shows what the call sends: no summary section.
    reply = await (await client.get("/api/sessions/edited/context", headers=auth_headers)).json()
    assert "summary" not in [s["name"] for s in reply["sections"]]
    # Compacting again summarises the conversation as it is now.
    fake_anthropic.enqueue(text_response("NEW SUMMARY: the code word of turn 2 is NEWWORD."))
    response = await client.post("/api/sessions/edited/compact", headers=auth_headers)
    compacted = await response.json()
    assert compacted["compacted"] is True
    assert compacted["summarizedMessages"] == 4  # turn 1 and the edited turn 2, not the answers set aside
    summarised = sent_text(fake_anthropic.requests[-1].body)
    assert "NEWWORD" in summarised and "WORD3" not in summarised
    await ui_chat(client, auth_headers, {"id": "edited", "messages": [user("u6", "And now?")]})
    assert "NEW SUMMARY" in sent_text(fake_anthropic.requests[-1].body)


async def test_a_cut_after_an_edit_frees_what_the_calls_sent_not_the_answers_set_aside(
    make_client: Any, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    """The context-window policy cuts where enough of what the calls send goes. It counted the turns an edit
    had set aside (which no call sends) as freed: the cut came too early, and the call after the summary still
    sent most of the window (a cut is to leave at most half of it)."""
    fake_anthropic.caching = True  # the fake counts the real input, as the API does
    window = 50_000
    client = await make_client(
        {
            "chat": {"context_policy": "compact", "history_limit": 10_000},
            "pricing": {"anthropic/claude-sonnet-4-5": {"context_window": window}},
        }
    )
    messages = await use_chat_turns(client, auth_headers, "cut", [turn_text(n, 8000) for n in range(1, 12)])
    # The user edits turn 2: turns 3 to 11 (about 18k tokens) are set aside.
    edited = [*messages[:2], user("u2", "Turn 2, shorter.")]
    await ui_chat(client, auth_headers, {"id": "cut", "messages": edited, "trigger": "submit-message"})
    for n in range(12, 40):
        await ui_chat(client, auth_headers, {"id": "cut", "messages": [user(f"u{n}", turn_text(n, 8000))]})
        if any(r.body.get("system") == COMPACT_PROMPT for r in fake_anthropic.requests):
            break
    summaries = [i for i, r in enumerate(fake_anthropic.requests) if r.body.get("system") == COMPACT_PROMPT]
    assert len(summaries) == 1
    await ui_chat(client, auth_headers, {"id": "cut", "messages": [user("u99", "short")]})
    after = fake_anthropic.reported[-1]  # the call after the summary (and its short message)
    prompt = after["input_tokens"] + after["cache_read_input_tokens"] + after["cache_creation_input_tokens"]
    assert prompt <= (window - 4096) * 0.5, prompt


async def test_a_search_with_more_matches_than_it_answers_says_so(
    client: TestClient, auth_headers: dict[str, str], token: str, isolated_env: Path
) -> None:
    """A search answered the 50 most recent matches (the CLI 200) and nothing else: a conversation older than the
    50th match of a common word could not be found, and nothing said that any were left out. ``more`` says so now,
    and ``limit`` asks for more (REST, WebSocket; the CLI's ``--limit`` and a line on stderr)."""
    for n in range(52):
        await ui_chat(client, auth_headers, {"id": f"inv{n}", "messages": [user("u1", f"Invoice number {n}")]})
    response = await client.get("/api/sessions", params={"q": "invoice"}, headers=auth_headers)
    found = await response.json()
    assert len(found["sessions"]) == 50 and found["more"] is True
    assert found["sessions"][0]["id"] == "inv51"  # the most recent first
    everything = await (await client.get("/api/sessions?q=invoice&limit=60", headers=auth_headers)).json()
    assert len(everything["sessions"]) == 52 and everything["more"] is False
    assert "inv0" in {s["id"] for s in everything["sessions"]}
    bad = await client.get("/api/sessions?q=invoice&limit=0", headers=auth_headers)
    assert bad.status == 400 and (await bad.json())["error"]["fields"][0]["path"] == "limit"

    ws = await connect(client, token)
    reply = await receive_after(ws, {"type": "session.list", "id": "s", "query": "invoice", "limit": 3})
    assert [s["id"] for s in reply["sessions"]] == ["inv51", "inv50", "inv49"] and reply["more"] is True
    await ws.close()

    result = await run_cli(["sessions", "search", "invoice", "--limit", "51", "--json"], isolated_env)
    assert result.exit_code == 0 and len(json.loads(result.stdout)) == 51
    assert "these are the 51 most recent" in result.stderr
    result = await run_cli(["sessions", "search", "invoice"], isolated_env)
    assert "inv0 " in result.output and "more" not in result.stderr.lower()


async def test_a_summary_too_long_for_the_compact_model_is_made_in_parts_that_fit_it(
    make_client: Any, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    """``[chat] compact_model`` with a smaller window than the session's model (a cheap summariser beside a
    1M-token model; or a session moved to a model with a smaller window): the oldest turns went to it in one call
    of half the session's window, which the provider refuses, so every compaction failed and the turns were left
    out unsummarised. The summary is now made in parts that fit, each reading the summary so far."""
    fake_anthropic.caching = True  # the fake counts the real input, as the API does
    summariser, small = "anthropic/claude-haiku-4-5", 12_000
    client = await make_client(
        {
            "chat": {"context_policy": "compact", "compact_model": summariser, "history_limit": 10_000},
            "pricing": {
                "anthropic/claude-sonnet-4-5": {"context_window": 50_000},
                summariser: {"context_window": small},
            },
        }
    )
    for n in range(1, 40):
        await ui_chat(client, auth_headers, {"id": "parts", "messages": [user(f"u{n}", turn_text(n, 8000))]})
        if any(r.body.get("system") == COMPACT_PROMPT for r in fake_anthropic.requests):
            break
    calls = [r.body for r in fake_anthropic.requests if r.body.get("system") == COMPACT_PROMPT]
    assert len(calls) >= 2, len(calls)
    for body in calls:
        assert body["model"] == "claude-haiku-4-5"
        assert sum(tokens for _, tokens, _ in prompt_blocks(body)) + body["max_tokens"] <= small
    assert all("Summary so far:" in json.dumps(body["messages"]) for body in calls[1:])
    records = await client.app[state.REGISTRY].usage.records(session_id="parts")
    assert len([r for r in records if r.get("purpose") == "compact"]) == len(calls)
    session = await (await client.get("/api/sessions/parts", headers=auth_headers)).json()
    summaries = [m["summary"] for m in session["session"]["messages"] if m.get("summary")]
    assert len(summaries) == 1 and summaries[0]["model"] == summariser


async def test_the_window_leaves_room_for_the_thinking_budget_the_call_asks_for(
    make_client: Any, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    """With extended thinking in its budget form (Claude Sonnet 4.5, Haiku 4.5, Opus 4.5: ``max_tokens`` is the
    budget plus ``[chat] max_tokens``), the policy measured the context against the window minus
    ``[chat] max_tokens`` only: calls whose input and ``max_tokens`` passed the window went out, which Anthropic
    refuses, and a session in that band could fail turn after turn (a failed turn adds nothing to the context)."""
    fake_anthropic.caching = True  # the fake counts the real input, as the API does
    window = 50_000
    client = await make_client(
        {
            "chat": {"context_policy": "compact", "history_limit": 10_000},
            "pricing": {"anthropic/claude-sonnet-4-5": {"context_window": window}},
        }
    )
    for n in range(1, 30):
        await ui_chat(client, auth_headers, {"id": "budget", "messages": [user(f"u{n}", turn_text(n, 8000))]})
    chats = [r.body for r in fake_anthropic.requests if r.body.get("system") != COMPACT_PROMPT]
    assert all(body["thinking"]["type"] == "enabled" for body in chats)
    for body in chats:
        assert sum(tokens for _, tokens, _ in prompt_blocks(body)) + body["max_tokens"] <= window
    reply = await (await client.get("/api/sessions/budget/context", headers=auth_headers)).json()
    assert reply["totals"]["inputWindow"] == window - chats[-1]["max_tokens"]


async def test_answers_set_aside_by_regenerates_do_not_use_up_the_history_limit(
    make_client: Any, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    """``[chat] history_limit`` counted the answers a regenerate set aside, which no call sends: after a few
    regenerates a conversation well within the limit lost its oldest turns, here even the question the last
    answer answers (the call began with that answer)."""
    client = await make_client(chat={"history_limit": 6})
    messages = await use_chat_turns(client, auth_headers, "regen", ["First question", "Second", "Third question"])
    for _ in range(4):  # useChat's regenerate(): the conversation up to the last user message
        body = {"id": "regen", "messages": messages[:-1], "trigger": "regenerate-message", "messageId": "x"}
        await ui_chat(client, auth_headers, body)
    await ui_chat(client, auth_headers, {"id": "regen", "messages": [user("u4", "Fourth")]})
    sent = fake_anthropic.requests[-1].body["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant"] * 3 + ["user"]
    assert "First question" in json.dumps(sent[0])


async def test_the_inspector_after_an_edit_whose_answer_failed_predicts_from_the_conversation_kept(
    make_client: Any, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    """An edit whose answer failed leaves the answers it set aside as the newest with a ``lastCall``: the
    inspector predicted a read of everything the abandoned conversation had cached (its cost a fraction of the
    bill). It predicts from the last answer of the conversation kept."""
    fake_anthropic.caching = True  # the fake counts the real input, as the API does
    client = await make_client(chat={"max_retries": 0})
    messages = await use_chat_turns(client, auth_headers, "failed", [turn_text(n, 8000) for n in range(1, 5)])
    fake_anthropic.enqueue(error_status(400))
    edited = [*messages[:2], user("u2", turn_text(20, 8000))]
    response = await client.post("/api/chat", json={"id": "failed", "messages": edited}, headers=auth_headers)
    assert '"type":"error"' in await response.text()
    draft = turn_text(5, 8000)
    predicted = await (
        await client.post("/api/sessions/failed/context", json={"userMessage": draft}, headers=auth_headers)
    ).json()
    chunks = await ui_chat(client, auth_headers, {"id": "failed", "messages": [user("u5", draft)]})
    billed = chunks[-1]["messageMetadata"]["usage"]
    assert predicted["totals"]["cacheReadTokens"] == billed["cacheReadTokens"], (predicted["totals"], billed)
    assert abs(predicted["totals"]["costWithCache"] - billed["inputCost"]) <= 0.05 * billed["inputCost"]
