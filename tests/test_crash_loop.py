"""A crash loop, tried from outside: a real ``agentspace serve`` under mixed concurrent load (the WebSocket,
``/api/chat``, ``/v1/messages``, ``/v1/chat/completions`` and ``/v1/responses``, all streaming from a fake
Anthropic upstream that paces its deltas, so that answers are in flight) is SIGKILLed at random moments and
restarted on the same data directory (and killed once more while it starts), several times in a row. After each restart: every answer a client saw
end is stored and readable, every request the upstream received has exactly one usage record (recovered ones
with the input the upstream reported), and at the end the reports equal a scan of the records and
``agentspace doctor`` finds no damage.

The longer soak: ``python -m tests.test_crash_loop --rounds 30`` (``scripts/crash_test.py`` is another, over
the WebSocket and ``/api/chat`` with an upstream that fails now and then).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from agentspace.cli import main as cli
from agentspace.storage import SessionStore, UsageStore
from scripts.harness import GatewayProcess
from tests.fakes import anthropic_upstream as fa

ANSWER = "word " * 20
INPUT = 321
KINDS = ("ws", "chat", "messages", "completions", "responses")
MODEL = "anthropic/claude-sonnet-4-5"
ROUNDS = 4


@dataclass
class Seen:
    """One request as its client saw it: the session it named, and whether it saw the answer's end."""

    kind: str
    tag: str  # in its question: which requests the upstream received
    session_id: str = ""  # the tag, or the session the WebSocket created
    text: str = ""
    ended: bool = False


def sse_data(raw: bytes) -> list[str]:
    return [line[6:] for line in raw.decode(errors="replace").split("\n") if line.startswith("data: ")]


async def one_request(http: aiohttp.ClientSession, server: GatewayProcess, seen: Seen) -> None:
    """Run one request of its kind to its end (or until the server dies under it), noting what it saw."""
    headers = {"Authorization": f"Bearer {server.token}", "X-Agentspace-Session": seen.session_id}
    question = [{"role": "user", "content": f"q {seen.tag}"}]
    if seen.kind == "ws":
        async with http.ws_connect(server.ws_url, headers=headers) as ws:
            await ws.send_json({"type": "chat.send", "id": "r", "content": f"q {seen.tag}"})
            async for msg in ws:
                frame = json.loads(msg.data)
                if frame["type"] == "session.created":
                    seen.session_id = frame["sessionId"]
                seen.text += frame.get("delta", "") if frame["type"] == "chat.stream.delta" else ""
                if frame["type"] in ("chat.stream.end", "error"):
                    seen.ended = frame["type"] == "chat.stream.end"
                    return
        return
    if seen.kind == "chat":
        url, body = (
            "/api/chat",
            {
                "id": seen.session_id,
                "messages": [{"id": "u", "role": "user", "parts": [{"type": "text", "text": f"q {seen.tag}"}]}],
            },
        )
    elif seen.kind == "messages":
        url, body = "/v1/messages", {"model": MODEL, "max_tokens": 200, "messages": question, "stream": True}
        headers["anthropic-version"] = "2023-06-01"
    elif seen.kind == "completions":
        url = "/v1/chat/completions"
        body = {"model": MODEL, "messages": question, "stream": True, "stream_options": {"include_usage": True}}
    else:
        url, body = "/v1/responses", {"model": MODEL, "input": f"q {seen.tag}", "stream": True}
    raw = b""
    async with http.post(server.url + url, json=body, headers=headers) as resp:
        async for chunk in resp.content.iter_any():
            raw += chunk
    data = sse_data(raw)
    events = [json.loads(d) for d in data if d.startswith("{")]
    if seen.kind == "chat":
        seen.text = "".join(e["delta"] for e in events if e.get("type") == "text-delta")
        seen.ended = any(e.get("type") == "finish" for e in events)
    elif seen.kind == "messages":
        seen.ended = any(e.get("type") == "message_stop" for e in events)
    elif seen.kind == "completions":
        seen.ended = data[-1:] == ["[DONE]"] and any(
            c.get("finish_reason") for e in events for c in e.get("choices", [])
        )
    else:
        seen.ended = any(e.get("type") == "response.completed" for e in events)


async def load_until_killed(server: GatewayProcess, kill_after: float, ids: itertools.count[int]) -> list[Seen]:
    """Twelve clients send requests of every kind back to back; the server is SIGKILLed ``kill_after`` seconds
    after an answer of every kind ended."""
    seen: list[Seen] = []
    stop = asyncio.Event()

    async def client(n: int) -> None:
        async with aiohttp.ClientSession() as http:
            while not stop.is_set():
                tag = f"c{next(ids)}"
                request = Seen(KINDS[n % len(KINDS)], tag, "" if n % len(KINDS) == 0 else tag)
                seen.append(request)
                try:
                    await one_request(http, server, request)
                except (TimeoutError, aiohttp.ClientError, ValueError):
                    return  # the server died under it

    clients = [asyncio.create_task(client(n)) for n in range(12)]
    # Answers of every kind flow, then a random moment. A fresh process's first calls are slow: those through the
    # Anthropic SDK wait for its import, while the pass-through (no SDK) answers meanwhile.
    for _ in range(600):
        if {s.kind for s in seen if s.ended} == set(KINDS):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(kill_after)
    await server.kill()
    stop.set()
    await asyncio.wait_for(asyncio.gather(*clients), 30)
    return seen


async def records_when_settled(data_dir: Path, calls: int) -> list[dict[str, Any]]:
    """The usage records once there are as many as calls (those a killed process left pending are posted at
    the start; a few more seconds cannot make a missing one appear)."""
    for _ in range(100):
        records = list(UsageStore(data_dir).records_sync())
        if len(records) >= calls:
            break
        await asyncio.sleep(0.1)
    return records


async def stored_messages(http: aiohttp.ClientSession, server: GatewayProcess, session_id: str) -> list[Any]:
    async with http.get(f"{server.url}/api/sessions/{session_id}") as resp:
        assert resp.status == 200, (session_id, resp.status, await resp.text())
        return list((await resp.json())["session"]["messages"])


async def test_sigkill_again_and_again_under_mixed_load(tmp_path: Path, fake_anthropic: fa.FakeAnthropic) -> None:
    await crash_loop(tmp_path, fake_anthropic, ROUNDS, random.Random())


async def crash_loop(tmp_path: Path, fake_anthropic: fa.FakeAnthropic, rounds: int, rng: random.Random) -> None:
    """``rounds`` kills and restarts, the invariants checked after each restart and at the end."""
    fake_anthropic.default = fa.text_response(ANSWER, chunks=10, usage={"input_tokens": INPUT}).with_delay(0.08)
    data_dir = tmp_path / "data"
    server = GatewayProcess(data_dir, fake_anthropic.url)
    ids = itertools.count()
    everything: list[Seen] = []
    try:
        await server.start()
        for round_ in range(rounds):
            seen = await load_until_killed(server, rng.uniform(0.0, 1.5), ids)
            everything += seen
            ended = [s for s in seen if s.ended]
            assert ended and len(ended) < len(seen), (round_, len(ended), len(seen))  # the kill landed mid-load
            # Killed again while it starts (recovering what the last one left pending, or just listening).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.start(), rng.uniform(0.2, 1.5))
            await server.kill()
            await server.start()
            calls = len(fake_anthropic.requests)
            records = await records_when_settled(data_dir, calls)
            # One record per call the upstream received; a call killed before its request left is posted voided
            # (no tokens, answered false), and so is one killed before the upstream's first event arrived.
            assert len({r["id"] for r in records}) == len(records)
            per_session: dict[str, list[dict[str, Any]]] = {}
            for record in records:
                per_session.setdefault(record["sessionId"], []).append(record)
            sessions = {s.tag: s.session_id for s in everything}
            received = [sessions[m] for r in fake_anthropic.requests for m in re.findall(r"q (c\d+)", r.raw.decode())]
            assert len(received) == len(set(received)) == calls
            for sid in received:
                assert len(per_session.get(sid, [])) == 1, (round_, sid, per_session.get(sid))
            assert all(len(r) == 1 for r in per_session.values()), per_session
            for sid in set(per_session) - set(received):
                ((record,),) = [per_session[sid]]
                assert record["recovered"] and not record["answered"], record  # it never reached the upstream
            for record in records:
                if record["recovered"] and not record["answered"]:  # killed before message_start arrived
                    assert record["inputTokens"] == record["outputTokens"] == 0, record
                else:
                    assert record["inputTokens"] == INPUT, record  # as reported, recovered or not
            headers = {"Authorization": f"Bearer {server.token}"}
            async with aiohttp.ClientSession(headers=headers) as http:
                for s in everything:
                    if s.ended:  # its answer stored, its one record made before the end went out
                        (record,) = per_session[s.session_id]
                        assert not record["recovered"] and record["outputTokens"] > 0, record
                        if s.kind in ("ws", "chat"):
                            messages = await stored_messages(http, server, s.session_id)
                            assert [m["role"] for m in messages] == ["user", "assistant"], s
                            assert s.text == ANSWER and messages[1]["content"] == ANSWER, s
                    else:
                        assert len(per_session.get(s.session_id, [])) <= 1, s
                    if s.kind in ("ws", "chat") and s.session_id in received:
                        # Its user message was durable before the provider was called.
                        messages = await stored_messages(http, server, s.session_id)
                        assert messages[0]["role"] == "user" and messages[0]["content"] == f"q {s.tag}", s
        assert await server.terminate() == 0
        assert not server.log_problems(), server.log_problems()
    finally:
        await server.aclose()

    records = list(UsageStore(data_dir).records_sync())
    voided = [r for r in records if r["recovered"] and not r["answered"]]
    assert len(records) - len(voided) <= len(fake_anthropic.requests) <= len(records)
    assert any(r["recovered"] and r["answered"] for r in records)
    assert list((data_dir / "ledger").iterdir()) == []  # every dead journal posted and removed, and its own
    assert {s.kind for s in everything if s.ended} == set(KINDS)
    listing = SessionStore(data_dir).listing_sync(whole=True)
    assert listing.damaged_files == []
    env = {"AGENTSPACE_HOME": str(data_dir)}
    report = CliRunner().invoke(cli, ["usage", "--by-session", "--json"], env=env)
    assert report.exit_code == 0, report.output
    total = json.loads(report.stdout)["grandTotal"]
    assert total["requestCount"] == sum(r["answered"] is not False for r in records)
    assert total["errorCount"] == sum(r["error"] is not None for r in records)
    assert total["inputTokens"] == sum(r["inputTokens"] for r in records)
    assert total["outputTokens"] == sum(r["outputTokens"] for r in records)
    assert total["totalCost"] == pytest.approx(sum(r["totalCost"] for r in records))
    doctor = CliRunner().invoke(cli, ["doctor"], env=env)
    assert doctor.exit_code == 0 and "0 damaged" in doctor.output, doctor.output


async def _soak(rounds: int, seed: int | None) -> None:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="agentspace-crash-loop-") as work:
        async with fa.started_fake_anthropic() as fake:
            await crash_loop(Path(work), fake, rounds, random.Random(seed))
    print(f"{rounds} rounds: every invariant held")


if __name__ == "__main__":  # the longer soak: python -m tests.test_crash_loop --rounds 30 [--seed N]
    import argparse

    parser = argparse.ArgumentParser(description="SIGKILL serve again and again under mixed load")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seed", type=int)
    arguments = parser.parse_args()
    asyncio.run(_soak(arguments.rounds, arguments.seed))
