"""A data directory on a disk that fills up (a small tmpfs, mounted for the test; skipped where mounting is not
allowed), tried from outside with a real ``agentspace serve``: the WebSocket and ``/api/chat`` refuse a turn
whose user message the disk refuses with ``STORAGE_ERROR``, nothing reaches the upstream, no usage record is
made and nothing stays reserved; once there is room again the same sessions take turns, in order.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from agentspace.cli import main as cli
from agentspace.pending import RETRY_SECONDS
from agentspace.storage import SessionStore, UsageStore
from agentspace.storage import ledger as ledger_module
from agentspace.storage.ledger import Ledger, read_journal
from agentspace.types import now_iso
from scripts.harness import GatewayProcess
from tests.fakes import anthropic_upstream as fa
from tests.support.ledgers import journal_entries, wait_for_notes

BIG = "x" * 20_000  # more than any page of slack a full tmpfs leaves at a file's end


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs at ``tmp_path/data`` (the gateway's data directory; its config and log stay outside)."""
    mount = tmp_path / "data"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(mount)], capture_output=True, check=False
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Fill the disk to its last byte with one file (removed to make room again)."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        block = b"\0" * 65536
        while True:
            try:
                f.write(block)
            except OSError as e:
                assert e.errno == errno.ENOSPC
                break
        while len(block) > 1:  # the tail, in smaller pieces
            block = block[: len(block) // 2]
            try:
                while True:
                    f.write(block)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    return filler


async def ws_turn(server: GatewayProcess, key: str, content: str, session_id: str | None = None) -> list[Any]:
    frame: dict[str, Any] = {"type": "chat.send", "id": "r", "content": content}
    if session_id is not None:
        frame["sessionId"] = session_id
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession() as http, http.ws_connect(server.ws_url, headers=headers) as ws:
        await ws.send_json(frame)
        frames: list[dict[str, Any]] = []
        while not frames or frames[-1]["type"] not in ("chat.stream.end", "error"):
            frames.append(json.loads((await ws.receive(timeout=30)).data))
    return frames


async def http_turn(server: GatewayProcess, key: str, chat_id: str, content: str) -> tuple[int, list[Any]]:
    body = {
        "id": chat_id,
        "messages": [{"id": f"u{os.urandom(4).hex()}", "role": "user", "parts": [{"type": "text", "text": content}]}],
    }
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession() as http, http.post(f"{server.url}/api/chat", json=body, headers=headers) as resp:
        raw = (await resp.read()).decode()
        if resp.content_type == "application/json":
            return resp.status, [json.loads(raw)]
    return resp.status, [json.loads(line[6:]) for line in raw.split("\n\n") if line.startswith("data: {")]


async def session_messages(server: GatewayProcess, session_id: str) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {server.token}"}
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{server.url}/api/sessions/{session_id}", headers=headers) as resp,
    ):
        assert resp.status == 200, await resp.text()
        return list((await resp.json())["session"]["messages"])


async def messages_call(server: GatewayProcess, text: str = "hi", *, stream: bool = False) -> int:
    """A /v1/messages call (passed through to the fake Anthropic upstream); its status once its body is read."""
    headers = {"x-api-key": server.token, "anthropic-version": "2023-06-01"}
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": text}],
        "stream": stream,
    }
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{server.url}/v1/messages", json=body, headers=headers) as resp,
    ):
        await resp.read()
        return resp.status


async def stored_records(disk: Path, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The usage records once there are ``count`` (a refused record is stored by a retry within seconds)."""
    for _ in range(int(timeout / 0.1)):
        records = list(UsageStore(disk).records_sync())
        if len(records) >= count:
            return records
        await asyncio.sleep(0.1)
    return list(UsageStore(disk).records_sync())


async def test_a_call_after_the_disk_refused_the_ledger_is_recovered_after_a_crash(
    disk: Path, fake_anthropic: fa.FakeAnthropic
) -> None:
    """The disk fills while /v1/messages calls come in until the ledger journal runs out of room (its write takes
    what fits of a line). Room again, the next call is killed mid-answer: the next start still posts it, as the
    upstream reported it, and every call the upstream saw has exactly one record."""
    fake_anthropic.default = fa.text_response("fine", usage={"input_tokens": 77})
    server = GatewayProcess(disk, fake_anthropic.url)
    try:
        await server.start()
        assert await messages_call(server) == 200
        filler = fill(disk)
        statuses = [await messages_call(server) for _ in range(40)]
        assert set(statuses) == {200, 503} and statuses[-1] == 503, statuses  # the journal ran out of room
        filler.unlink()
        answered = len(fake_anthropic.requests)
        assert len(await stored_records(disk, answered)) == answered  # the refused records, stored by a retry

        fake_anthropic.default = fa.text_response("slow " * 10, chunks=10, usage={"input_tokens": 77}).with_delay(1.0)
        flying = asyncio.create_task(messages_call(server, stream=True))
        while len(fake_anthropic.requests) == answered:
            await asyncio.sleep(0.02)
        # message_start relayed and its usage noted in the journal (at once; later under load)
        await wait_for_notes(lambda: journal_entries(disk), 1, _reported_77)
        await server.kill()
        with pytest.raises(aiohttp.ClientError):
            await flying
        await server.start()
        records = await stored_records(disk, answered + 1)
        assert await server.terminate() == 0
    finally:
        await server.aclose()
    assert len(records) == answered + 1 and len({r["id"] for r in records}) == answered + 1
    assert all(r["inputTokens"] == 77 for r in records)
    (recovered,) = [r for r in records if r["recovered"]]
    assert recovered["error"] == "INTERRUPTED" and "inputTokens" not in recovered["estimatedFields"]


def _reported_77(entry: dict[str, Any]) -> bool:
    return bool((entry.get("usage") or {}).get("inputTokens") == 77)


async def spend_until_refused(server: GatewayProcess, key: str) -> tuple[int, str]:
    """New WebSocket turns until the budget refuses one: how many were answered, and the refusal's code."""
    for answered in range(20):
        frames = await ws_turn(server, key, "spend")
        if frames[-1]["type"] == "error":
            return answered, frames[-1]["code"]
    raise AssertionError("the budget never refused a turn")


async def test_a_user_message_the_disk_refuses_refuses_the_turn_and_holds_nothing(
    disk: Path, fake_anthropic: fa.FakeAnthropic
) -> None:
    """The disk full: a turn whose user message does not fit (a new session, or a long message in an existing
    one) is STORAGE_ERROR on the WebSocket and on /api/chat; the upstream sees nothing and no record is made.
    Room again: the same sessions take turns in order, and the client that was refused spends its whole budget,
    as many turns as a client that never was (no reservation stayed held)."""
    fake_anthropic.default = fa.text_response("fine", usage={"input_tokens": 50})
    env = {"AGENTSPACE_HOME": str(disk)}
    keys = {}
    for name in ("team", "ref"):  # $0.10: room for one turn's reservation (4096 output tokens), not two
        added = CliRunner().invoke(cli, ["clients", "add", name, "--budget", "0.1", "--period", "total"], env=env)
        assert added.exit_code == 0, added.output
        keys[name] = added.stdout.strip()
    server = GatewayProcess(disk, fake_anthropic.url)
    try:
        await server.start()
        sessions = {}
        for name, key in keys.items():
            frames = await ws_turn(server, key, "hello")
            assert frames[-1]["type"] == "chat.stream.end", frames[-1]
            sessions[name] = frames[0]["sessionId"]
            status, chunks = await http_turn(server, key, f"h-{name}", "hello")
            assert status == 200 and chunks[-1]["type"] == "finish", chunks[-1]
        calls, records = len(fake_anthropic.requests), len(list(UsageStore(disk).records_sync()))

        filler = fill(disk)
        team = keys["team"]
        # (A new session is one append to the session journal: a short one may still fit in the slack of the
        # journal's last page, so the new sessions here have long messages too.)
        for frames in (
            await ws_turn(server, team, BIG),
            await ws_turn(server, team, BIG, sessions["team"]),
        ):
            assert [f["type"] for f in frames] in (["error"], ["session.created", "error"]), frames
            assert frames[-1]["code"] == "STORAGE_ERROR" and "nothing was sent" in frames[-1]["message"]
        for chat_id in ("h-new", "h-team"):
            status, (refusal,) = await http_turn(server, team, chat_id, BIG)
            assert status == 503 and refusal["error"]["code"] == "STORAGE_ERROR", refusal
        assert len(fake_anthropic.requests) == calls  # nothing went upstream
        assert len(list(UsageStore(disk).records_sync())) == records  # and nothing was recorded
        filler.unlink()

        for name, key in keys.items():  # room again: the same sessions, in order
            frames = await ws_turn(server, key, "again", sessions[name])
            assert frames[-1]["type"] == "chat.stream.end", frames[-1]
            status, chunks = await http_turn(server, key, f"h-{name}", "again")
            assert status == 200 and chunks[-1]["type"] == "finish", chunks[-1]
            for sid in (sessions[name], f"h-{name}"):
                messages = await session_messages(server, sid)
                assert [m["role"] for m in messages] == ["user", "assistant"] * 2, sid
                assert [m["content"] for m in messages[::2]] == ["hello", "again"]

        fake_anthropic.default = fa.text_response("fine", usage={"input_tokens": 5000})  # $0.015 a turn
        team_spent = await spend_until_refused(server, keys["team"])
        ref_spent = await spend_until_refused(server, keys["ref"])
        assert team_spent == ref_spent and team_spent[0] >= 1 and team_spent[1] == "BUDGET_EXCEEDED", (
            team_spent,
            ref_spent,
        )
        assert await server.terminate() == 0
    finally:
        await server.aclose()
    records_now = list(UsageStore(disk).records_sync())
    assert len(records_now) == len(fake_anthropic.requests)
    assert not SessionStore(disk).listing_sync(whole=True).damaged_files


async def test_turns_on_a_full_disk_keep_every_session_in_order(disk: Path, fake_anthropic: fa.FakeAnthropic) -> None:
    """Sixty turns of every size on a full disk, over the WebSocket and /api/chat in six sessions: each is
    refused (STORAGE_ERROR; 503 before the stream, an error chunk after), or answered and stored now or by a
    retry. Room again: every session reads as user and assistant messages in turn, every answer a client saw
    end is stored, and every call the upstream received has exactly one usage record."""
    rng = random.Random(1)
    answer = "answer " * 30
    fake_anthropic.default = fa.text_response(answer, chunks=5, usage={"input_tokens": 50})
    server = GatewayProcess(disk, fake_anthropic.url)
    try:
        await server.start()
        token = server.token
        sessions = [(await ws_turn(server, token, "hello"))[0]["sessionId"] for _ in range(3)]
        for n in range(3):
            sessions.append(f"h{n}")
            assert (await http_turn(server, token, f"h{n}", "hello"))[0] == 200
        filler = fill(disk)
        ended: dict[str, int] = {}
        for i in range(60):
            sid = sessions[3 * (i % 2) + rng.randrange(3)]
            text = "y" * rng.choice([5, 50, 500, 1500, 3000])
            if i % 2 == 0:
                frames = await ws_turn(server, token, text, sid)
                last = frames[-1]
                assert last["type"] == "chat.stream.end" or last["code"] == "STORAGE_ERROR", last
                if last["type"] == "chat.stream.end":
                    ended[sid] = ended.get(sid, 0) + 1
            else:
                status, chunks = await http_turn(server, token, sid, text)
                if status == 503:
                    assert chunks[0]["error"]["code"] == "STORAGE_ERROR", chunks
                elif chunks[-1]["type"] == "finish":
                    ended[sid] = ended.get(sid, 0) + 1
                else:
                    assert status == 200 and chunks[-1]["type"] == "error", chunks[-1]
                    assert "could not be stored" in chunks[-1]["errorText"], chunks[-1]
        filler.unlink()
        for _ in range(int(4 * RETRY_SECONDS / 0.2)):  # the writes kept in memory are retried every few seconds
            stored = [await session_messages(server, sid) for sid in sessions]
            records = list(UsageStore(disk).records_sync())
            if len(records) == len(fake_anthropic.requests) and all(len(m) % 2 == 0 for m in stored):
                break
            await asyncio.sleep(0.2)
        for sid in sessions:
            messages = await session_messages(server, sid)
            assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2), sid
            answers = [m for m in messages[1::2] if "error" not in m]
            assert all(m["content"] == answer for m in answers), sid
            assert len(answers) >= 1 + ended.get(sid, 0), sid
        assert await server.terminate() == 0
    finally:
        await server.aclose()
    records = list(UsageStore(disk).records_sync())
    assert len(records) == len({r["id"] for r in records}) == len(fake_anthropic.requests)
    assert all(r["inputTokens"] == 50 for r in records)
    assert "lost" not in server.log()


async def test_a_start_on_a_full_disk_posts_the_killed_calls_once_there_is_room(
    disk: Path, fake_anthropic: fa.FakeAnthropic
) -> None:
    """Killed mid-answer, then started again on a disk with no room: the server starts, and the calls the
    killed process left pending are posted once there is room; a later start posts none of them again."""
    fake_anthropic.default = fa.text_response("slow " * 10, chunks=10, usage={"input_tokens": 77}).with_delay(1.0)
    server = GatewayProcess(disk, fake_anthropic.url)
    try:
        await server.start()
        flying = [asyncio.create_task(messages_call(server, stream=True)) for _ in range(3)]
        while len(fake_anthropic.requests) < 3:
            await asyncio.sleep(0.02)
        await wait_for_notes(lambda: journal_entries(disk), 3, _reported_77)  # as above
        await server.kill()
        await asyncio.gather(*flying, return_exceptions=True)
        filler = fill(disk)
        await server.start()
        assert list(UsageStore(disk).records_sync()) == []
        filler.unlink()
        records = await stored_records(disk, 3)
        assert await server.terminate() == 0
        await server.start()  # and once more: nothing posted twice
        await asyncio.sleep(1)
        assert await server.terminate() == 0
    finally:
        await server.aclose()
    again = list(UsageStore(disk).records_sync())
    assert len(records) == len(again) == 3 and len({r["id"] for r in again}) == 3
    assert all(r["recovered"] and r["inputTokens"] == 77 for r in again)


async def test_a_rotation_the_disk_refuses_keeps_the_journal(disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A journal due for its rotation on a full disk: the fresh journal cannot be written, so the call waiting
    for it is refused, and the old journal, with the calls still open, stays where the next start reads it."""
    monkeypatch.setattr(ledger_module, "ROTATE_BYTES", 500)  # rotated after a few entries, not 4 MiB
    ledger = Ledger(disk)
    for n in range(10):
        await ledger.pending({"id": f"usage_{n}", "time": now_iso(), "model": "m", "inputTokens": 1})
    filler = fill(disk)
    with pytest.raises(OSError):
        await ledger.pending({"id": "usage_refused", "time": now_iso(), "model": "m", "inputTokens": 1})
    (journal,) = (disk / "ledger").glob("journal-*.jsonl")
    assert [e["id"] for e in read_journal(journal)] == [f"usage_{n}" for n in range(10)]
    filler.unlink()
    await ledger.pending({"id": "usage_later", "time": now_iso(), "model": "m", "inputTokens": 1})  # rotated now
    (rotated,) = (disk / "ledger").glob("journal-*.jsonl")
    assert rotated != journal and [e["id"] for e in read_journal(rotated)] == [
        *(f"usage_{n}" for n in range(10)),
        "usage_later",
    ]
    await ledger.aclose()


async def test_killed_with_writes_waiting_for_room_every_call_is_posted_once(
    disk: Path, fake_anthropic: fa.FakeAnthropic
) -> None:
    """Turns and /v1 calls on a full disk leave answers and records waiting in memory for a retry; the server is
    killed before there is room. Started again with room: every call the upstream received has exactly one
    record, every session reads whole and in turn, and doctor finds nothing damaged."""
    rng = random.Random(7)
    fake_anthropic.default = fa.text_response("answer " * 30, chunks=5, usage={"input_tokens": 50})
    server = GatewayProcess(disk, fake_anthropic.url)
    try:
        await server.start()
        token = server.token
        sessions = [(await ws_turn(server, token, "hello"))[0]["sessionId"] for _ in range(3)]
        filler = fill(disk)
        for i in range(30):
            if i % 3 == 0:  # a little room now and then: some writes fit, some do not, some in part
                os.truncate(filler, filler.stat().st_size - 8192)
            size = rng.choice([5, 50, 500, 3000])
            if i % 3 == 0:
                await messages_call(server, "m" * size, stream=bool(i % 2))
            elif i % 3 == 1:
                await ws_turn(server, token, "y" * size, rng.choice(sessions))
            else:
                await http_turn(server, token, f"h{rng.randrange(3)}", "z" * size)
        assert len(fake_anthropic.requests) > 3 + 10  # many calls went out while the disk was (almost) full
        await server.kill()
        filler.unlink()
        await server.start()
        records = await stored_records(disk, len(fake_anthropic.requests))
        headers = {"Authorization": f"Bearer {server.token}"}
        async with aiohttp.ClientSession(headers=headers) as http, http.get(f"{server.url}/api/sessions") as resp:
            listing = await resp.json()
        assert await server.terminate() == 0
    finally:
        await server.aclose()
    assert len(records) == len({r["id"] for r in records}) == len(fake_anthropic.requests)
    assert all(r["inputTokens"] == 50 or (r["recovered"] and not r["answered"]) for r in records), records
    assert listing["damagedFiles"] == []
    for summary in listing["sessions"]:
        messages = SessionStore(disk).get_sync(summary["id"])
        assert messages is not None
        roles = [m["role"] for m in messages["messages"]]
        assert all(a != b or a == "user" for a, b in zip(roles, roles[1:])), (summary["id"], roles)
    doctor = CliRunner().invoke(cli, ["doctor"], env={"AGENTSPACE_HOME": str(disk)})
    assert doctor.exit_code == 0, doctor.output


async def client_spend(server: GatewayProcess, name: str) -> float:
    headers = {"Authorization": f"Bearer {server.token}"}
    async with aiohttp.ClientSession(headers=headers) as http, http.get(f"{server.url}/api/clients/{name}") as resp:
        return float((await resp.json())["client"]["spend"]["usd"])


async def test_a_budget_on_an_almost_full_disk_counts_what_the_records_say(
    disk: Path, fake_anthropic: fa.FakeAnthropic
) -> None:
    """A budgeted client's turns on a disk with a little room now and then: answered, refused, or answered and
    stored by a retry. Room again: the client's spend is the sum of its records, and it spends on up to its
    budget, no further (nothing held, nothing counted twice)."""
    fake_anthropic.default = fa.text_response("answer " * 300, chunks=5, usage={"input_tokens": 5000})
    env = {"AGENTSPACE_HOME": str(disk)}
    added = CliRunner().invoke(cli, ["clients", "add", "team", "--budget", "0.2", "--period", "total"], env=env)
    assert added.exit_code == 0, added.output
    key = added.stdout.strip()
    server = GatewayProcess(disk, fake_anthropic.url)
    try:
        await server.start()
        filler = fill(disk)
        outcomes = []
        for i in range(12):
            if i % 2 == 0:  # a little room now and then
                os.truncate(filler, filler.stat().st_size - 8192)
            frames = await ws_turn(server, key, "q")
            outcomes.append(frames[-1].get("code") or frames[-1]["type"])
        # (a new session is one append to the session journal: some turns fit where a file would not, and the
        # budget may refuse the last ones)
        assert (
            {"chat.stream.end", "STORAGE_ERROR"}
            <= set(outcomes)
            <= {"chat.stream.end", "STORAGE_ERROR", "BUDGET_EXCEEDED"}
        ), outcomes
        filler.unlink()
        records = await stored_records(disk, len(fake_anthropic.requests))
        assert await client_spend(server, "team") == pytest.approx(sum(r["totalCost"] for r in records))
        while (await ws_turn(server, key, "q"))[-1]["type"] == "chat.stream.end":
            assert len(fake_anthropic.requests) < 30
        records = list(UsageStore(disk).records_sync())
        spend = await client_spend(server, "team")
        assert await server.terminate() == 0
    finally:
        await server.aclose()
    assert len(records) == len(fake_anthropic.requests)
    assert spend == pytest.approx(sum(r["totalCost"] for r in records))
    per_turn = records[0]["totalCost"]
    # Refused once the next turn's reservation (its 4096 output tokens at least) would pass the budget.
    assert 0.2 - 0.0615 - per_turn < spend <= 0.2 - 0.0615 + per_turn, (spend, per_turn)


async def test_a_call_the_full_disk_refuses_may_be_retried_by_the_sdks(
    disk: Path, fake_anthropic: fa.FakeAnthropic
) -> None:
    """STORAGE_ERROR is cured by waiting (room again): unlike a spent budget or a model not allowed, the /v1
    refusal does not tell the SDKs not to retry (``x-should-retry: false``, docs/protocol.md), and it says when
    to (``Retry-After``), on /api/chat too."""
    server = GatewayProcess(disk, fake_anthropic.url)
    try:
        await server.start()
        filler = fill(disk)
        headers = {"Authorization": f"Bearer {server.token}"}
        messages = [{"role": "user", "content": "hi " * 400}]  # a ledger line longer than the full disk's slack
        calls = (
            ("/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 16, "messages": messages}),
            ("/v1/chat/completions", {"model": "anthropic/claude-sonnet-4-5", "messages": messages}),
        )
        async with aiohttp.ClientSession() as http:
            for path, body in calls:
                for _ in range(5):  # until the journal's last page is full too
                    async with http.post(server.url + path, json=body, headers=headers) as resp:
                        text = await resp.text()
                        if resp.status == 503:
                            break
                assert resp.status == 503 and "STORAGE_ERROR" in text, text
                assert resp.headers.get("x-should-retry") != "false", (path, dict(resp.headers))
                assert resp.headers.get("Retry-After") == "1", (path, dict(resp.headers))  # when to try again
            chat = {"id": "h", "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": BIG}]}]}
            async with http.post(server.url + "/api/chat", json=chat, headers=headers) as resp:
                text = await resp.text()
                assert resp.status == 503 and "STORAGE_ERROR" in text, text
                assert resp.headers.get("Retry-After") == "1", dict(resp.headers)
        filler.unlink()
        assert await messages_call(server) == 200  # and waiting did cure it
        assert await server.terminate() == 0
    finally:
        await server.aclose()
