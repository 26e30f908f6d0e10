"""Issue 25 (the embedded store at the physical limit) tried from outside again, in new directions: the usage
reports' inputs at the edges of their range, and what a report tells a client about the store's files."""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from click.testing import CliRunner

from agentspace.cli import main
from agentspace.storage.embedded.append_log import encode_lines
from agentspace.storage.embedded.usage import write_log_segment
from agentspace.types import now_iso
from scripts.harness import GatewayProcess
from tests.support import ws
from tests.test_clients import add_client, bearer


@pytest.mark.parametrize("since", ["999999d", "99999999999w", "0001-01-01T00:00:00+05:00", "9999-12-31T23:00:00-05:00"])
async def test_a_since_out_of_the_range_of_dates_is_refused_by_name(
    client: TestClient, auth_headers: dict[str, str], isolated_env: Path, since: str
) -> None:
    """`since` of the usage reports (`/api/usage`, `agentspace usage --since`) is a duration ago or a date, and
    bad input gets a clear error. A duration reaching before the year 1 (``999999d``, what one might type for
    "all of it") or a date whose UTC time is outside the years 1-9999 made the report raise OverflowError: a
    500 "the gateway failed" from the server, a traceback from the CLI. Both now say what is wrong with it."""
    response = await client.get("/api/usage", params={"since": since}, headers=auth_headers)
    assert response.status == 400, await response.text()
    error = (await response.json())["error"]
    assert error["code"] == "INVALID_MESSAGE" and "since" in error["message"], error
    assert "range of dates" in error["message"], error

    result = CliRunner().invoke(main, ["usage", "--since", since])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "--since" in result.output and "range of dates" in result.output, result.output


async def test_a_clients_usage_report_does_not_name_the_servers_damaged_files(
    client: TestClient, auth_headers: dict[str, str], isolated_env: Path
) -> None:
    """docs/protocol.md: ``damagedFiles`` of a listing is "for the admin": a client key's listing and search give
    ``[]``, never the server's paths. Its usage report (``/api/usage``, the WebSocket's ``usage.query``) named
    them all the same: the data directory's absolute path (the server's home and user name in it) and files of
    every client's records. The admin's report still names them (and ``agentspace doctor``)."""
    key = add_client("alice")
    now = now_iso()
    record = {"id": "r1", "timestamp": now, "model": "m", "client": "alice", "totalCost": 0.5}
    write_log_segment(isolated_env, now[:10], 0, [record])
    damaged = isolated_env / "usage" / now[:10] / "00001.jsonl"
    damaged.write_bytes(b"not a record\n")

    admin = await (await client.get("/api/usage", headers=auth_headers)).json()
    assert admin["damagedFiles"] == [str(damaged)], admin
    response = await client.get("/api/usage", params={"by": "client"}, headers=bearer(key))
    assert response.status == 200, await response.text()
    report = await response.json()
    assert report["perClient"]["alice"]["totalCost"] == 0.5, report
    assert report["damagedFiles"] == [], report
    socket = await ws.connect(client, key)
    try:
        reply = await ws.receive_after(socket, {"type": "usage.query", "id": "q1"})
    finally:
        await socket.close()
    assert reply["grandTotal"]["totalCost"] == 0.5 and reply["damagedFiles"] == [], reply


def long_session_with_marks(data_dir: Path, session_id: str, turns: int) -> int:
    """A session log as the store writes it (docs/architecture.md, "Stored shapes"): ``turns`` questions and
    answers, and an update of every question after the first few (a context cut's mark, which the context policy
    writes every few turns of a session that has reached its window: here at every turn, to make the difference
    plain). Returns the messages' count."""
    entries: list[dict[str, Any]] = []
    count = 0

    def summary() -> dict[str, Any]:
        stamp = "2026-12-01T10:00:00.000Z"
        info = {"id": session_id, "title": "long", "model": "anthropic/claude-sonnet-4-5", "createdAt": stamp}
        return {"session": {**info, "lastActivityAt": stamp, "messageCount": count, "seenCount": count}}

    for turn in range(turns):
        for role in ("user", "assistant"):
            entries += [{"message": {"id": f"{role[0]}{turn}", "role": role, "content": f"{role} {turn}"}}]
            count += 1
            entries += [summary()]
        if turn >= 10:
            mark = {"contextCut": {"at": "2026-12-01T10:00:00.000Z", "tokens": 190_000}}
            entries += [{"update": {"id": f"u{turn - 10}", "changes": mark}}, summary()]
    path = data_dir / "sessions" / f"{session_id}.jsonl"
    path.parent.mkdir(parents=True)
    path.write_bytes(encode_lines(entries))
    return count


def limit_cpu() -> None:
    """In the server process, before exec: at most CPU_SECONDS of CPU, then SIGXCPU ends it."""
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_SECONDS, CPU_SECONDS + 5))


CPU_SECONDS = 20


async def test_a_long_session_with_a_mark_at_most_turns_is_read_in_time_linear_in_its_size(tmp_path: Path) -> None:
    """Issue 25: sessions read cheaply. A session not in the server's cache (after a restart, or pushed out of it)
    is read by replaying its log; each update entry (the context policy's cut or summary mark, which a long agent
    session at its window writes every few turns; a failed turn's error mark; an edit) was applied by a pass over
    every message, so the read took updates x messages: 0.03 s at 1,000 messages with 500 marks, 0.7 s at 4,000,
    11 s at 16,000. Measured here not by the clock but by the CPU the server may use at all (``RLIMIT_CPU``): a
    30,000 message session read in quadratic time needs far more than its start and a linear read (a few
    seconds)."""
    data_dir = tmp_path / "data"
    count = long_session_with_marks(data_dir, "long", 15_000)
    gateway = GatewayProcess(data_dir, "http://127.0.0.1:9")
    gateway.preexec_fn = limit_cpu
    await gateway.start()
    try:
        headers = {"Authorization": f"Bearer {gateway.token}"}
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{gateway.url}/api/sessions/long", headers=headers) as response:
                assert response.status == 200, await response.text()
                session = (await response.json())["session"]
        assert session["messageCount"] == count == len(session["messages"])
        marked = [m["id"] for m in session["messages"] if "contextCut" in m]
        assert marked == [f"u{turn}" for turn in range(15_000 - 10)]
    finally:
        await gateway.aclose()
