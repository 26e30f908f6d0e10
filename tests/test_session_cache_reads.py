"""The session cache hands out its messages as they are (storage/embedded/sessions.py): a careless caller that
changes what a read returned must not change the session, for the next read, the API or the next turn's context.
The real app, a WebSocket chat with a tool call against the fake Anthropic upstream, and the files read back."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from agentspace.plugins import create_plugin_manager
from agentspace.storage.embedded.sessions import SessionStore
from agentspace.transports import state as STATE
from tests.fakes.anthropic_upstream import text_response, tool_use_response
from tests.support.ws import chat, connect
from tests.tool_plugins import WeatherTools


def careless_changes(session: dict[str, Any]) -> list[Callable[[], object]]:
    """What a caller could do to the messages it read, at every depth: each must be refused."""
    user, answer = session["messages"][0], session["messages"][1]
    call = next(p for p in answer["parts"] if p["type"] == "tool-call")
    result = next(p for p in answer["parts"] if p["type"] == "tool-result")
    return [
        lambda: user.__setitem__("content", "changed"),
        lambda: user.update(content="changed"),
        lambda: user.pop("content"),
        lambda: user.setdefault("extra", 1),
        lambda: user.clear(),
        lambda: answer["parts"].append({"type": "text", "text": "injected"}),
        lambda: answer["parts"].pop(),
        lambda: answer["parts"].__setitem__(0, {"type": "text", "text": "injected"}),
        lambda: answer["parts"].sort(key=str),
        lambda: call["input"].__setitem__("city", "Rome"),
        lambda: result["output"].update(forecast="rain"),
        lambda: answer["usage"].__delitem__("inputTokens"),
    ]


async def test_a_read_cannot_change_the_cached_session(
    make_client: Callable[..., Any], token: str, fake_anthropic: Any, isolated_env: Path
) -> None:
    pm = create_plugin_manager()
    pm.register(WeatherTools())
    client: TestClient = await make_client(pm=pm)
    gw = client.server.app[STATE.REGISTRY]
    fake_anthropic.enqueue(
        tool_use_response("get_weather", {"city": "Paris"}, text="Checking."), text_response("Sunny in Paris.")
    )
    ws = await connect(client, token)
    frames = await chat(ws, "weather?")
    assert frames[-1]["type"] == "chat.stream.end", frames[-1]
    sid = frames[0]["sessionId"]
    headers = {"Authorization": f"Bearer {token}"}

    async def over_http() -> dict[str, Any]:
        response = await client.get(f"/api/sessions/{sid}", headers=headers)
        assert response.status == 200
        return dict((await response.json())["session"])

    before = await over_http()
    assert [m["role"] for m in before["messages"]] == ["user", "assistant"]

    for read in (await gw.sessions.get(sid), {"messages": await gw.sessions.messages(sid)}):
        for change in careless_changes(read):
            with pytest.raises(TypeError):
                change()
        # What the read itself is (a new dict and list) the caller may change: the cache's are others.
        read["messages"].clear()
        read["title"] = "changed"
    # A copy to change is the caller's own.
    mine = copy.deepcopy(await gw.sessions.get(sid))
    next(p for p in mine["messages"][1]["parts"] if p["type"] == "tool-call")["input"]["city"] = "Rome"
    mine["messages"][0]["content"] = "changed"

    assert await over_http() == before
    assert await gw.sessions.get(sid) == before
    # ... and it is what the file holds (the CLI's read parses it).
    assert SessionStore(isolated_env).get_sync(sid) == before

    # The next turn's context is the stored one.
    fake_anthropic.enqueue(text_response("Still sunny."))
    frames = await chat(ws, "and tomorrow?", sessionId=sid)
    assert frames[-1]["type"] == "chat.stream.end", frames[-1]
    sent = fake_anthropic.requests[-1].body["messages"]
    assert sent[0]["content"][0]["text"] == "weather?"
    tool_use = next(b for b in sent[1]["content"] if b["type"] == "tool_use")
    assert tool_use["input"] == {"city": "Paris"}
    assert sent[-1]["content"][0]["text"] == "and tomorrow?"
    after = await over_http()
    assert after["messages"][:2] == before["messages"] and len(after["messages"]) == 4
    await ws.close()
