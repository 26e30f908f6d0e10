"""Finding old conversations and taking them along: ``GET /api/sessions?q=``, WebSocket ``session.list`` with
``query``, ``agentspace sessions search|export|compact`` and ``agentspace inspect``, against the real gateway."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from agentspace.transports import state
from tests.fakes.anthropic_upstream import text_response
from tests.support.ws import chat, connect, receive_after
from tests.test_cli_e2e import run_cli, ws_url


async def make_sessions(client: TestClient, token: str, fake_anthropic: Any) -> list[str]:
    ws = await connect(client, token)
    ids = []
    for n, topic in enumerate(["gardening tips", "Quantum Flux capacitors", "bread baking"]):
        fake_anthropic.enqueue(text_response(f"Answer about {topic}."))
        frames = await chat(ws, f"Tell me about {topic}", f"r{n}")
        session_id = frames[0]["sessionId"]
        fake_anthropic.enqueue(text_response("More.", chunks=1))
        await chat(ws, f'And the history of {topic}, with "quotes" and a\nnewline?', f"s{n}", sessionId=session_id)
        ids.append(session_id)
    await ws.close()
    return ids


async def test_search_over_rest_and_websocket(
    client: TestClient, token: str, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    garden, quantum, bread = await make_sessions(client, token, fake_anthropic)
    response = await client.get("/api/sessions", params={"q": "quantum flux"}, headers=auth_headers)
    body = await response.json()
    assert response.status == 200 and [s["id"] for s in body["sessions"]] == [quantum]
    assert "Quantum Flux" in body["sessions"][0]["match"]
    # Message text, not only titles: an answer's words, and a phrase with quotes and a line break.
    body = await (await client.get("/api/sessions", params={"q": "answer about bread"}, headers=auth_headers)).json()
    assert [s["id"] for s in body["sessions"]] == [bread]
    body = await (await client.get("/api/sessions", params={"q": 'with "quotes" and a'}, headers=auth_headers)).json()
    assert {s["id"] for s in body["sessions"]} == {garden, quantum, bread}
    body = await (await client.get("/api/sessions", params={"q": "nothing like this"}, headers=auth_headers)).json()
    assert body["sessions"] == []
    response = await client.get("/api/sessions", params={"q": " "}, headers=auth_headers)
    assert response.status == 400 and (await response.json())["error"]["code"] == "INVALID_MESSAGE"

    ws = await connect(client, token)
    reply = await receive_after(ws, {"type": "session.list", "id": "l", "query": "GARDENING"})
    assert reply["type"] == "session.list.result" and [s["id"] for s in reply["sessions"]] == [garden]
    await ws.close()

    # A later message is found at once (the index notices the session changed).
    ws = await connect(client, token)
    fake_anthropic.enqueue(text_response("ok"))
    await chat(ws, "now about sourdough starters", "x", sessionId=garden)
    await ws.close()
    body = await (await client.get("/api/sessions", params={"q": "sourdough"}, headers=auth_headers)).json()
    assert [s["id"] for s in body["sessions"]] == [garden]


async def test_a_client_finds_its_own_sessions_only(
    client: TestClient, token: str, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    await make_sessions(client, token, fake_anthropic)  # the admin's
    created = await client.post("/api/clients", headers=auth_headers, json={"name": "alice"})
    key = (await created.json())["key"]
    alice = {"Authorization": f"Bearer {key}"}
    body = {
        "id": "alice-1",
        "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": "gardening for alice"}]}],
    }
    response = await client.post("/api/chat", json=body, headers=alice)
    assert response.status == 200
    await response.read()
    found = await (await client.get("/api/sessions", params={"q": "gardening"}, headers=alice)).json()
    assert [s["id"] for s in found["sessions"]] == ["alice-1"]
    everyone = await (await client.get("/api/sessions", params={"q": "gardening"}, headers=auth_headers)).json()
    assert len(everyone["sessions"]) == 2


async def test_export_md_and_json(
    client: TestClient, token: str, auth_headers: dict[str, str], fake_anthropic: Any, isolated_env: Path
) -> None:
    garden, *_ = await make_sessions(client, token, fake_anthropic)
    response = await client.get(f"/api/sessions/{garden}/export", params={"format": "md"}, headers=auth_headers)
    text = await response.text()
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/markdown")
    assert response.headers["Content-Disposition"] == f'attachment; filename="{garden}.md"'
    assert (
        text.startswith("# Tell me about gardening tips")
        and "## User" in text
        and "Answer about gardening tips." in text
    )
    response = await client.get(f"/api/sessions/{garden}/export", params={"format": "json"}, headers=auth_headers)
    session = json.loads(await response.text())["session"]
    assert session["id"] == garden and len(session["messages"]) == 4
    response = await client.get(f"/api/sessions/{garden}/export", params={"format": "pdf"}, headers=auth_headers)
    assert response.status == 400

    exported = await run_cli(["sessions", "export", garden, "--format", "md"], isolated_env)
    assert exported.exit_code == 0 and exported.output == text
    out = isolated_env / "out.json"
    exported = await run_cli(["sessions", "export", garden, "--format", "json", "-o", str(out)], isolated_env)
    assert exported.exit_code == 0 and json.loads(out.read_text())["session"]["id"] == garden


async def test_cli_search_compact_and_inspect(
    client: TestClient, token: str, fake_anthropic: Any, isolated_env: Path
) -> None:
    _, quantum, _ = await make_sessions(client, token, fake_anthropic)
    found = await run_cli(["sessions", "search", "flux capacitor"], isolated_env)
    assert found.exit_code == 0 and quantum in found.output and "Flux capacitor" in found.output
    data = json.loads((await run_cli(["sessions", "search", "flux", "--json"], isolated_env)).output)
    assert [s["id"] for s in data] == [quantum]
    none = await run_cli(["sessions", "search", "zzz-nothing"], isolated_env)
    assert none.exit_code == 0 and "No session contains" in none.output

    fake_anthropic.enqueue(text_response("Quantum flux capacitors were discussed."))
    compacted = await run_cli(["sessions", "compact", quantum, "--url", ws_url(client)], isolated_env)
    assert compacted.exit_code == 0, compacted.output
    assert "2 messages summarised" in compacted.output and "Quantum flux capacitors were discussed." in compacted.output
    again = await run_cli(["sessions", "compact", quantum, "--url", ws_url(client)], isolated_env)
    assert again.exit_code == 0 and "Nothing to compact" in again.output

    inspected = await run_cli(["inspect", quantum, "--url", ws_url(client)], isolated_env)
    assert inspected.exit_code == 0, inspected.output
    assert "summary" in inspected.output and "Expected input cost" in inspected.output
    # The expected cost names the tokens it is for: the TOTAL row's estimate scaled by the last call's report.
    shown = json.loads((await run_cli(["inspect", quantum, "--json", "--url", ws_url(client)], isolated_env)).output)
    calibrated = shown["totals"]["calibratedTokens"]
    assert f"Expected input cost of {calibrated:,} tokens" in inspected.output


@pytest.mark.parametrize("backend", ["embedded", "postgres"])
async def test_a_phrase_from_turn_3_of_1000_sessions_in_under_200_ms(
    make_client: Any,
    auth_headers: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    backend: str,
) -> None:
    """The embedded store answers under 200 ms once warm; PostgreSQL finds the same session (not timed)."""
    storage = {"backend": "postgres", "dsn": request.getfixturevalue("pg_dsn")} if backend == "postgres" else {}
    client = await make_client(storage=storage) if storage else await make_client()
    store = client.app[state.REGISTRY].sessions
    rng = random.Random(3)
    words = "alpha beta gamma delta river stone cloud paper garden window lamp orbit".split()
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", lambda fd: None)  # seeding is setup
        target = ""
        for n in range(1000):
            messages = []
            for turn in range(1, 11):
                question = " ".join(rng.choice(words) for _ in range(100))
                if n == 500 and turn == 3:
                    question += " the violet heron counts backwards"
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": question[::-1]}]
            summary = await store.create(model="anthropic/claude-sonnet-4-6", messages=messages)
            target = summary["id"] if n == 500 else target
    timings = []
    for _ in range(4):  # the first search of the process reads every session once
        started = time.perf_counter()
        response = await client.get("/api/sessions", params={"q": "Violet Heron"}, headers=auth_headers)
        body = await response.json()
        timings.append(time.perf_counter() - started)
        assert [s["id"] for s in body["sessions"]] == [target]
        assert "violet heron" in body["sessions"][0]["match"]
    if backend == "embedded":
        assert min(timings[1:]) < 0.2, timings


async def test_search_and_compact_on_postgres(
    make_client: Any, token: str, auth_headers: dict[str, str], fake_anthropic: Any, pg_dsn: str
) -> None:
    client = await make_client(storage={"backend": "postgres", "dsn": pg_dsn})
    garden, quantum, bread = await make_sessions(client, token, fake_anthropic)
    for _ in range(2):  # the second search answers from the index
        body = await (await client.get("/api/sessions", params={"q": "flux capacitors"}, headers=auth_headers)).json()
        assert [s["id"] for s in body["sessions"]] == [quantum]
        assert "Quantum Flux capacitors" in body["sessions"][0]["match"]
    fake_anthropic.enqueue(text_response("Bread was discussed."))
    response = await client.post(f"/api/sessions/{bread}/compact", headers=auth_headers)
    assert (await response.json())["compacted"] is True
    records = await client.app[state.REGISTRY].usage.records(session_id=bread)
    assert len(records) == 3  # two turns and the summary


async def test_a_client_never_finds_another_clients_session_of_the_same_id_or_name(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    """Two clients chat in a session each called ``plans``: each finds its own, by the id it knows. A client
    deleted and created again under the same name does not find the sessions of the one before."""

    async def new_client(name: str) -> dict[str, str]:
        created = await client.post("/api/clients", headers=auth_headers, json={"name": name})
        assert created.status in (200, 201), await created.text()
        return {"Authorization": f"Bearer {(await created.json())['key']}"}

    async def say(headers: dict[str, str], text: str) -> None:
        message = {"id": "m1", "role": "user", "parts": [{"type": "text", "text": text}]}
        response = await client.post("/api/chat", json={"id": "plans", "messages": [message]}, headers=headers)
        assert response.status == 200
        await response.read()

    async def search(headers: dict[str, str], text: str) -> list[dict[str, Any]]:
        response = await client.get("/api/sessions", params={"q": text}, headers=headers)
        assert response.status == 200
        return list((await response.json())["sessions"])

    alice, bob = await new_client("alice"), await new_client("bob")
    await say(alice, "alice plans a trip to Lisbon")
    await say(bob, "bob plans a trip to Oslo")
    assert [(s["id"], "Oslo" in s["match"]) for s in await search(bob, "plans a trip")] == [("plans", True)]
    assert [(s["id"], "Lisbon" in s["match"]) for s in await search(alice, "plans a trip")] == [("plans", True)]
    assert await search(bob, "Lisbon") == []
    deleted = await client.delete("/api/clients/alice", headers=auth_headers)
    assert deleted.status in (200, 204)
    again = await new_client("alice")
    assert await search(again, "Lisbon") == []
    assert (await (await client.get("/api/sessions", headers=again)).json())["sessions"] == []  # as the listing


async def test_a_renamed_title_is_found_at_once(
    client: TestClient, token: str, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    garden, *_ = await make_sessions(client, token, fake_anthropic)
    assert (await (await client.get("/api/sessions", params={"q": "zebra"}, headers=auth_headers)).json())[
        "sessions"
    ] == []
    response = await client.patch(f"/api/sessions/{garden}", json={"title": "The Zebra project"}, headers=auth_headers)
    assert response.status == 200, await response.text()
    body = await (await client.get("/api/sessions", params={"q": "zebra PROJECT"}, headers=auth_headers)).json()
    assert [(s["id"], s["title"]) for s in body["sessions"]] == [(garden, "The Zebra project")]
    assert "Zebra project" in body["sessions"][0]["match"]


async def test_answers_set_aside_by_an_edit_are_not_found(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any, isolated_env: Path
) -> None:
    """An answer given again (``replaced``) is left out of ``GET /api/sessions/{id}`` and exports: search (REST
    and the CLI) neither finds it nor shows its words in ``match``."""

    async def send(text: str, answer: str) -> None:
        fake_anthropic.enqueue(text_response(answer))
        message = {"id": "m1", "role": "user", "parts": [{"type": "text", "text": text}]}
        response = await client.post("/api/chat", json={"id": "edited", "messages": [message]}, headers=auth_headers)
        assert response.status == 200 and (await response.text()).endswith("data: [DONE]\n\n")

    await send("Name a large seabird", "The wandering albatross.")
    await send("Name a large seabird, please", "The pelican.")
    for query, found in [("albatross", False), ("pelican", True)]:
        body = await (await client.get("/api/sessions", params={"q": query}, headers=auth_headers)).json()
        assert [s["id"] for s in body["sessions"]] == (["edited"] if found else []), (query, body)
        assert all("albatross" not in s["match"] for s in body["sessions"])
    result = await run_cli(["sessions", "search", "albatross"], isolated_env)
    assert result.exit_code == 0 and "edited" not in result.output, result.output
    result = await run_cli(["sessions", "search", "pelican"], isolated_env)
    assert "edited" in result.output, result.output


async def test_the_cli_export_leaves_out_answers_set_aside(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any, isolated_env: Path
) -> None:
    """docs/protocol.md: replaced answers are left out of exports; the CLI's as well as the REST one."""
    for text, answer in [("Name a seabird", "The wandering albatross."), ("Name a seabird, please", "The pelican.")]:
        fake_anthropic.enqueue(text_response(answer))
        message = {"id": "m1", "role": "user", "parts": [{"type": "text", "text": text}]}
        response = await client.post("/api/chat", json={"id": "edited", "messages": [message]}, headers=auth_headers)
        assert response.status == 200 and (await response.text()).endswith("data: [DONE]\n\n")
    rest = await client.get("/api/sessions/edited/export", params={"format": "json"}, headers=auth_headers)
    assert "albatross" not in await rest.text()
    for fmt in ["md", "json"]:
        exported = await run_cli(["sessions", "export", "edited", "--format", fmt], isolated_env)
        assert exported.exit_code == 0 and "The pelican." in exported.output, exported.output
        assert "albatross" not in exported.output, (fmt, exported.output)
    # `sessions show` is the whole session: the answer set aside is there, and says so.
    shown = await run_cli(["sessions", "show", "edited"], isolated_env)
    assert shown.exit_code == 0, shown.output

    def header(answer: str) -> str:
        return shown.output.split(answer)[0].rstrip().splitlines()[-1]

    assert "set aside" in header("The wandering albatross.") and "set aside" not in header("The pelican.")


async def test_a_bad_websocket_query_names_the_field_the_frame_has(client: TestClient, token: str) -> None:
    """WebSocket ``session.list`` takes ``query`` (REST: ``q``): its refusal names the field the client sent."""
    ws = await connect(client, token)
    for n, query in enumerate(["", 5, "x" * 501]):
        reply = await receive_after(ws, {"type": "session.list", "id": f"l{n}", "query": query})
        assert reply["type"] == "error" and reply["code"] == "INVALID_MESSAGE", reply
        assert reply["message"].startswith("query: "), reply
    await ws.close()
