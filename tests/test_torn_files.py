"""Files torn and damaged from outside while the server is stopped, tried with a real ``agentspace serve``: a
session file, a usage segment and a ledger journal, each cut in the middle of a line or with garbage in the
middle. The server starts, warns, moves the damaged files aside (docs/architecture.md), posts every call a
journal still shows, and the reports count every record they can read.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
from click.testing import CliRunner

from agentspace.cli import main as cli
from agentspace.storage import UsageStore
from scripts.harness import GatewayProcess
from tests import test_disk_full as disk_full
from tests.fakes import anthropic_upstream as fa

GARBAGE = b"\x00\xff garbage from outside \x13\n"


async def ws_turn(server: GatewayProcess, content: str, session_id: str | None = None) -> list[dict[str, Any]]:
    return await disk_full.ws_turn(server, server.token, content, session_id)


async def killed_mid_call(server: GatewayProcess, fake: fa.FakeAnthropic, session_id: str) -> None:
    """A turn whose answer is under way (message_start noted) when the server is killed."""
    fake.enqueue(fa.text_response("slow " * 10, chunks=10, usage={"input_tokens": 55}).with_delay(1.0))
    calls = len(fake.requests)
    turn = asyncio.create_task(ws_turn(server, "slow", session_id))
    while len(fake.requests) == calls:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.5)
    await server.kill()
    try:
        await turn
    except (aiohttp.ClientError, TypeError, ValueError):
        pass  # the socket closed under it


async def journal_of_a_killed_call(data_dir: Path, fake: fa.FakeAnthropic) -> tuple[Path, list[bytes], dict[str, Any]]:
    """A server killed mid-call after a turn: its ledger journal, the journal's lines, and the killed call's
    pending entry."""
    fake.default = fa.text_response("fine", usage={"input_tokens": 55})
    server = GatewayProcess(data_dir, fake.url)
    try:
        await server.start()
        sid = (await ws_turn(server, "hello"))[0]["sessionId"]
        await killed_mid_call(server, fake, sid)
    finally:
        await server.aclose()
    (journal,) = (data_dir / "ledger").glob("journal-*.jsonl")
    lines = journal.read_bytes().splitlines(keepends=True)
    return journal, lines, [json.loads(line) for line in lines if b'"event":"pending"' in line][-1]


def cut_mid_line(path: Path) -> None:
    """Cut the file in the middle of its last line."""
    raw = path.read_bytes()
    start = raw.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(raw[: start + (len(raw) - start) // 2])


def garbage_in_the_middle(path: Path) -> None:
    """Replace the file's second line with garbage."""
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join([lines[0], GARBAGE, *lines[2:]]))


def usage(data_dir: Path, *args: str) -> Any:
    result = CliRunner().invoke(cli, ["usage", "--json", *args], env={"AGENTSPACE_HOME": str(data_dir)})
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


async def test_a_journal_with_garbage_and_a_torn_line_is_recovered_and_kept_aside(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic
) -> None:
    """A dead process's journal damaged from outside: every entry still readable is posted (one record each),
    the damaged lines are named in a warning, the journal is moved aside rather than deleted, and the next
    start posts nothing twice."""
    data_dir = tmp_path / "data"
    journal, lines, pending = await journal_of_a_killed_call(data_dir, fake_anthropic)
    # Another call's entry after damage: garbage, a line of JSON that is no entry, an entry missing its model.
    del pending["event"]
    second = {**pending, "event": "pending", "id": "usage_second", "inputTokens": 12}
    broken = {k: v for k, v in second.items() if k != "model"} | {"id": "usage_broken"}
    journal.write_bytes(
        b"".join(
            [
                *lines,
                GARBAGE,
                b"42\n",
                json.dumps(broken).encode() + b"\n",
                json.dumps(second).encode() + b"\n",
                b'{"event":"note","id":"usage_second","answered":true}\n',
                b'{"event":"note","id":"usage_second","usage":{"inputT',  # torn
            ]
        )
    )
    before = len(list(UsageStore(data_dir).records_sync()))

    server = GatewayProcess(data_dir, fake_anthropic.url)
    try:
        await server.start()
        assert await server.terminate() == 0
        server = GatewayProcess(data_dir, fake_anthropic.url)
        await server.start()  # a second start posts nothing twice
        assert await server.terminate() == 0
    finally:
        await server.aclose()
    records = {r["id"]: r for r in UsageStore(data_dir).records_sync()}
    assert len(records) == before + 2, list(records)
    assert records[pending["id"]]["recovered"] and records[pending["id"]]["inputTokens"] == 55
    assert records["usage_second"]["recovered"] and records["usage_second"]["inputTokens"] == 12
    assert not list((data_dir / "ledger").glob("journal-*.jsonl"))
    (aside,) = (data_dir / "ledger").glob("journal-*.jsonl.damaged-*")
    assert GARBAGE in aside.read_bytes()
    log = server.log()
    assert "Traceback" not in log and str(aside) in log and "3 damaged line(s)" in log
    assert usage(data_dir)["grandTotal"]["requestCount"] == len(records)
    doctor = CliRunner().invoke(cli, ["doctor"], env={"AGENTSPACE_HOME": str(data_dir)})
    assert doctor.exit_code == 1 and "ledger: 0 journal(s), 1 damaged" in doctor.output
    assert f"{aside}: damaged ledger journal" in doctor.output


async def test_torn_and_damaged_session_and_usage_files(tmp_path: Path, fake_anthropic: fa.FakeAnthropic) -> None:
    """A session file cut in the middle of its last line reads as it was before that write (a warning); one
    with garbage in the middle is moved aside and refused as SESSION_DAMAGED, named in listings and by doctor;
    a usage segment with garbage in the middle is named in the reports and moved aside by the writer, which goes
    on in a fresh segment that the reports count."""
    fake_anthropic.default = fa.text_response("fine", usage={"input_tokens": 55})
    data_dir = tmp_path / "data"
    server = GatewayProcess(data_dir, fake_anthropic.url)
    try:
        await server.start()
        torn = (await ws_turn(server, "hello torn"))[0]["sessionId"]
        await ws_turn(server, "more", torn)
        damaged = (await ws_turn(server, "hello damaged"))[0]["sessionId"]
        await ws_turn(server, "more", damaged)
        whole = (await ws_turn(server, "hello whole"))[0]["sessionId"]
        assert await server.terminate() == 0
    finally:
        await server.aclose()
    cut_mid_line(data_dir / "sessions" / f"{torn}.jsonl")
    garbage_in_the_middle(data_dir / "sessions" / f"{damaged}.jsonl")
    (segment,) = (data_dir / "usage").glob("*/*.jsonl")
    garbage_in_the_middle(segment)

    server = GatewayProcess(data_dir, fake_anthropic.url)
    try:
        await server.start()
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {server.token}"}) as http:
            async with http.get(f"{server.url}/api/sessions/{torn}") as resp:
                roles = [m["role"] for m in (await resp.json())["session"]["messages"]]
                assert roles == ["user", "assistant", "user"]  # the write cut in the middle is not there
            async with http.get(f"{server.url}/api/sessions/{damaged}") as resp:
                assert resp.status == 409 and (await resp.json())["error"]["code"] == "SESSION_DAMAGED"
            async with http.get(f"{server.url}/api/sessions") as resp:
                listing = await resp.json()
            assert {s["id"] for s in listing["sessions"]} == {torn, whole}
            (moved,) = listing["damagedFiles"]
            assert Path(moved).name.startswith(f"{damaged}.jsonl.damaged-")
            async with http.get(f"{server.url}/api/usage") as resp:
                assert (await resp.json())["damagedFiles"] == [str(segment)]
            for sid in (torn, whole):
                assert (await ws_turn(server, "again", sid))[-1]["type"] == "chat.stream.end"
            assert (await ws_turn(server, "again", damaged))[-1]["code"] == "SESSION_DAMAGED"
            async with http.get(f"{server.url}/api/usage") as resp:
                report = await resp.json()
        assert await server.terminate() == 0
    finally:
        await server.aclose()
    (aside,) = segment.parent.glob("*.damaged-*")
    assert report["grandTotal"]["requestCount"] == 2 and report["damagedFiles"] == [str(aside)]
    assert usage(data_dir)["grandTotal"]["requestCount"] == 2
    log = server.log()
    assert "cut off" in log and f"moved aside to {moved}" in log and f"moved aside to {aside}" in log
    doctor = CliRunner().invoke(cli, ["doctor"], env={"AGENTSPACE_HOME": str(data_dir)})
    assert doctor.exit_code == 1 and moved in doctor.output and str(aside) in doctor.output
    assert (
        "sessions: 2 readable, 1 damaged" in doctor.output and "usage: 2 records readable, 1 damaged" in doctor.output
    )
