"""What the last closing note left alone, third round (sessions, routing, plugins), tried from outside: through
the HTTP routes, the WebSocket and the CLI of the running app."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from aiohttp.test_utils import TestClient
from click.testing import CliRunner

from agentspace.cli import main as cli
from agentspace.plugins import PluginError
from agentspace.testing import gateway_client, make_config
from agentspace.transports import state
from tests.conftest import wait_until
from tests.fakes.anthropic_upstream import DEFAULT_TEXT, FakeAnthropic, error_status, text_response
from tests.support.ui_stream import DONE, post_chat, read_all, user
from tests.support.ws import chat, connect, receive_after
from tests.test_audit32s_outside import Sink, Sinks
from tests.test_budget_alerts import BUDGET, SMALL_ANSWERS, Receiver, _count, chat_body, receiver, spend  # noqa: F401
from tests.test_context_policy import records
from tests.test_routing import deployments, fakes, group, routed, sdk  # noqa: F401

MODEL = "anthropic/claude-sonnet-4-6"


async def test_two_compactions_of_one_session_buy_one_summary(
    client: TestClient, token: str, auth_headers: dict[str, str], fake_anthropic: FakeAnthropic
) -> None:
    """Two ``POST /api/sessions/{id}/compact`` at once each bought a summary and both were stored. While the
    first runs, the session is held as a turn holds it: a second compaction, and a turn (which may compact
    too), are refused with STREAM_IN_PROGRESS; one summary is bought."""
    ws = await connect(client, token)
    session_id = (await chat(ws, "My name is Ada."))[0]["sessionId"]
    await chat(ws, "What is 7 times 6?", "r2", sessionId=session_id)
    gate = asyncio.Event()
    fake_anthropic.enqueue(text_response("Ada asked 7x6.").held(gate))
    sent = len(fake_anthropic.requests)
    first = asyncio.create_task(client.post(f"/api/sessions/{session_id}/compact", headers=auth_headers))

    async def summarising() -> bool:
        return len(fake_anthropic.requests) > sent

    await wait_until(summarising)
    second = await client.post(f"/api/sessions/{session_id}/compact", headers=auth_headers)
    assert second.status == 409 and (await second.json())["error"]["code"] == "STREAM_IN_PROGRESS"
    reply = await receive_after(ws, {"type": "session.compact", "id": "c", "sessionId": session_id})
    assert reply["type"] == "error" and reply["code"] == "STREAM_IN_PROGRESS", reply
    turn = await receive_after(ws, {"type": "chat.send", "id": "r3", "content": "more", "sessionId": session_id})
    assert turn["type"] == "error" and turn["code"] == "STREAM_IN_PROGRESS", turn
    gate.set()
    done = await first
    assert done.status == 200 and (await done.json())["compacted"] is True
    assert len(fake_anthropic.requests) == sent + 1  # one summary bought
    session = (await (await client.get(f"/api/sessions/{session_id}", headers=auth_headers)).json())["session"]
    assert len([m for m in session["messages"] if m.get("summary")]) == 1
    assert [r.get("purpose") for r in await records(client, session_id)].count("compact") == 1
    # The session is free again: the next turn answers.
    frames = await chat(ws, "Thanks", "r4", sessionId=session_id)
    assert frames[-1]["type"] == "chat.stream.end", frames[-1]
    await ws.close()


@pytest.mark.parametrize("backend", ["embedded", "postgres"])
async def test_search_folds_case_as_unicode_does(
    make_client: Any, auth_headers: dict[str, str], request: pytest.FixtureRequest, backend: str
) -> None:
    """Search lower-cased (``str.lower``): "STRASSE" did not find "Straße", nor "ΛΌΓΟΣ" "λόγος" (a final
    sigma). Case-folded on both backends, through the HTTP search and the CLI's."""
    storage = {"backend": "postgres", "dsn": request.getfixturevalue("pg_dsn")} if backend == "postgres" else {}
    client = await make_client(storage=storage) if storage else await make_client()
    store = client.app[state.REGISTRY].sessions
    street = await store.create(model=MODEL, messages=[{"role": "user", "content": "Die Straße nach Köln"}])
    word = await store.create(model=MODEL, messages=[{"role": "user", "content": "ὁ λόγος, the word"}])
    for query, found in (("STRASSE", street), ("straße", street), ("ΛΌΓΟΣ", word), ("λόγοσ", word)):
        body = await (await client.get("/api/sessions", params={"q": query}, headers=auth_headers)).json()
        assert [s["id"] for s in body["sessions"]] == [found["id"]], (query, body)
    if backend == "embedded":  # the CLI reads the data directory
        result = CliRunner().invoke(cli, ["sessions", "search", "STRASSE", "--json"])
        assert result.exit_code == 0 and [s["id"] for s in json.loads(result.output)] == [street["id"]], result.output


@pytest.mark.parametrize("backend", ["embedded", "postgres"])
async def test_the_listing_honours_limit_without_a_query(
    make_client: Any, token: str, auth_headers: dict[str, str], request: pytest.FixtureRequest, backend: str
) -> None:
    """``GET /api/sessions?limit=2`` (and ``session.list {limit}``) answered every session: ``limit`` counted with
    ``q`` only. Now the most recent ``limit``, with ``more``, as a search pages; a bad one is refused."""
    storage = {"backend": "postgres", "dsn": request.getfixturevalue("pg_dsn")} if backend == "postgres" else {}
    client = await make_client(storage=storage) if storage else await make_client()
    store = client.app[state.REGISTRY].sessions
    ids = [(await store.create(model=MODEL, messages=[{"role": "user", "content": f"n{n}"}]))["id"] for n in range(3)]
    every = await (await client.get("/api/sessions", headers=auth_headers)).json()
    newest = [s["id"] for s in every["sessions"]]
    assert sorted(newest) == sorted(ids)
    body = await (await client.get("/api/sessions", params={"limit": "2"}, headers=auth_headers)).json()
    assert [s["id"] for s in body["sessions"]] == newest[:2] and body["more"] is True, body
    assert every["more"] is False
    body = await (await client.get("/api/sessions", params={"limit": "3"}, headers=auth_headers)).json()
    assert [s["id"] for s in body["sessions"]] == newest and body["more"] is False, body
    refused = await client.get("/api/sessions", params={"limit": "0"}, headers=auth_headers)
    assert refused.status == 400 and (await refused.json())["error"]["code"] == "INVALID_MESSAGE"
    ws = await connect(client, token)
    reply = await receive_after(ws, {"type": "session.list", "id": "l", "limit": 1})
    assert [s["id"] for s in reply["sessions"]] == newest[:1] and reply["more"] is True, reply
    await ws.close()
    if backend == "embedded":  # the CLI reads the data directory
        result = CliRunner().invoke(cli, ["sessions", "list", "--limit", "2", "--json"])
        assert result.exit_code == 0 and [s["id"] for s in json.loads(result.stdout)] == newest[:2], result.output
        assert "these are the 2 most recently active" in result.stderr


async def test_a_groups_only_deployment_is_not_cooled_by_one_429(
    routed: Any,  # noqa: F811
    fakes: list[FakeAnthropic],  # noqa: F811
    token: str,
    auth_headers: dict[str, str],
) -> None:
    """A group of one deployment was cooled down by one 429: every call for the cooldown failed at once with
    "cooling down", though nothing else could take it. Spared, as LiteLLM's router spares it: the 429 reaches
    the client as it came, and the next call is sent (docs/routing.md)."""
    fakes[0].enqueue(error_status(429, retry_after=30))
    client = await routed(group(fakes, n=1))
    api = sdk(client, token)
    with pytest.raises(openai.RateLimitError):
        await api.chat.completions.create(model="claude", messages=[{"role": "user", "content": "Hi"}])
    reply = await api.chat.completions.create(model="claude", messages=[{"role": "user", "content": "Hi"}])
    assert reply.choices[0].message.content == DEFAULT_TEXT and len(fakes[0].requests) == 2
    shown = (await deployments(client, auth_headers))["claude/team-1"]
    assert shown["state"] == "active" and shown["recentErrors"][0]["code"] == "RATE_LIMITED", shown
    await api.close()


async def test_the_tpm_check_counts_the_requests_own_input(
    routed: Any,  # noqa: F811
    fakes: list[FakeAnthropic],  # noqa: F811
    token: str,
    auth_headers: dict[str, str],
) -> None:
    """A deployment's tpm was checked against its minute only: a call whose input alone did not fit what was
    left went to it anyway. Its input (as its reservation counted it) counts too: the call goes to the other
    deployment, while a small one still fits the first; on /v1 (translated and passed through) and a chat turn
    alike."""
    fakes[0].default = text_response("counted", usage={"input_tokens": 500, "output_tokens": 100})
    client = await routed(group(fakes, weights=[1000, 1], extra=[{"tpm": 1000}]))
    api = sdk(client, token)
    await api.chat.completions.create(model="claude", messages=[{"role": "user", "content": "Hi"}])
    assert len(fakes[0].requests) == 1  # its minute holds 600 tokens now
    long = "many words here " * 200  # some 800 tokens: more than the 400 left
    await api.chat.completions.create(model="claude", messages=[{"role": "user", "content": long}])
    chunks = await read_all(await post_chat(client, auth_headers, "big", user(long), model="claude"))
    assert chunks[-1] == DONE, chunks
    claude = anthropic.AsyncAnthropic(api_key=token, base_url=f"http://127.0.0.1:{client.port}", max_retries=0)
    await claude.messages.create(model="claude", max_tokens=16, messages=[{"role": "user", "content": long}])
    await claude.close()
    assert len(fakes[0].requests) == 1 and len(fakes[1].requests) == 3
    await api.chat.completions.create(model="claude", messages=[{"role": "user", "content": "Hi"}])
    assert len(fakes[0].requests) == 2  # a small one fits what is left
    await api.close()


async def test_a_model_silent_past_the_idle_timeout_moves_to_its_fallback(
    make_client: Any, auth_headers: dict[str, str], fake_anthropic: FakeAnthropic
) -> None:
    """A turn whose model sent nothing for ``[chat] idle_timeout_seconds`` moved on only from a group's
    deployment: a model's ``[models] fallbacks`` were never tried, and the turn ended in "idle timeout". It
    moves to the fallback too (docs/routing.md)."""
    fake_anthropic.enqueue(text_response("too late").silent_for(30))
    client = await make_client(
        models={"fallbacks": {MODEL: ["anthropic/claude-haiku-4-5"]}}, chat={"idle_timeout_seconds": 1.0}
    )
    chunks = await read_all(await post_chat(client, auth_headers, "stalled", user("Hi"), model=MODEL))
    assert chunks[-1] == DONE
    assert not [c for c in chunks if isinstance(c, dict) and c.get("type") == "error"], chunks
    text = "".join(c["delta"] for c in chunks if isinstance(c, dict) and c.get("type") == "text-delta")
    assert text == DEFAULT_TEXT
    assert [r.body["model"] for r in fake_anthropic.requests] == ["claude-sonnet-4-6", "claude-haiku-4-5"]
    # Each model tried is a call of its own: the silent one's record says it timed out, billing nothing.
    recs = await records(client, "stalled")
    assert [(r["model"], r["answered"]) for r in recs] == [(MODEL, False), ("anthropic/claude-haiku-4-5", True)]
    assert recs[0]["inputTokens"] == 0 and recs[0]["totalCost"] == 0, recs[0]


class _OtherSink(Sink):  # named as Sink ("tuned")
    pass


async def test_two_usage_sinks_of_one_name_stop_the_start_naming_both(tmp_path: Path) -> None:
    """Two sinks named alike started, and their queue and drop metrics (labelled by name) were one. The second
    stops the start, naming the plugin that registered it and both sinks' classes (docs/plugins.md)."""
    with pytest.raises(PluginError) as raised:
        async with gateway_client(make_config(tmp_path), Sinks(Sink()), Sinks(_OtherSink())):
            pass
    said = str(raised.value)
    assert "usage sink 'tuned'" in said and "_OtherSink" in said and ".Sink)" in said, said
    assert "name them apart" in said, said


async def test_each_budget_alert_appends_its_line_and_an_earlier_file_is_taken_over(
    make_client: Any,
    fake_anthropic: FakeAnthropic,
    receiver: Receiver,  # noqa: F811
    auth_headers: dict[str, str],
    isolated_env: Path,
) -> None:
    """``alerts-sent.json`` (the alerts already sent) was rewritten whole on each alert: with many clients each
    alert wrote every client's. Each alert now appends its own line to ``alerts-sent.jsonl``; what an earlier
    version kept in ``alerts-sent.json`` is taken over at the next start, and nothing is sent twice."""
    settings = {"alerts": {"webhook_url": receiver.url, "thresholds": [0.5]}, "chat": SMALL_ANSWERS}
    client = await make_client(**settings, thinking={"enabled": False})
    keys = []
    for name in ("ann", "bob", "cy"):
        made = await client.post("/api/clients", json={"name": name, "budgetUsd": BUDGET}, headers=auth_headers)
        keys.append({"Authorization": f"Bearer {(await made.json())['key']}"})
    path = isolated_env / "alerts-sent.jsonl"
    seen = b""
    for n, headers in enumerate(keys, 1):
        fake_anthropic.enqueue(spend(2000))  # 60% of the budget
        assert (await client.post("/api/chat", json=chat_body(f"s{n}", n), headers=headers)).status == 200

        async def alerted(n: int = n) -> bool:
            return len(receiver.alerts) >= n and path.exists() and path.read_bytes().count(b"\n") >= n

        await wait_until(alerted)
        now = path.read_bytes()
        assert now.startswith(seen) and now.count(b"\n") == n, now  # appended, the earlier lines as they were
        seen = now
    await client.close()
    # As an earlier version kept them: one document.
    sent = dict(json.loads(line) for line in seen.splitlines())
    path.unlink()
    (isolated_env / "alerts-sent.json").write_text(json.dumps(sent))
    again = await make_client(**settings, thinking={"enabled": False})
    fake_anthropic.enqueue(spend(1000))  # 90%: past 50% still, sent already
    assert (await again.post("/api/chat", json=chat_body("s9", 9), headers=keys[0])).status == 200
    fake_anthropic.enqueue(spend(2000))
    made = await again.post("/api/clients", json={"name": "dee", "budgetUsd": BUDGET}, headers=auth_headers)
    dee = {"Authorization": f"Bearer {(await made.json())['key']}"}
    assert (await again.post("/api/chat", json=chat_body("s10", 10), headers=dee)).status == 200
    await wait_until(lambda: _count(receiver, 4))
    assert [a["client"] for a in receiver.alerts] == ["ann", "bob", "cy", "dee"]  # ann's not again
    assert not (isolated_env / "alerts-sent.json").exists()
    assert len(path.read_bytes().splitlines()) == 4
