"""Issue 25 (the embedded store at the physical limit) tried from outside again, in new directions: the usage
reports' inputs at the edges of their range, and what a report tells a client about the store's files."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient
from click.testing import CliRunner

from agentspace.cli import main
from agentspace.storage.embedded.usage import write_log_segment
from agentspace.types import now_iso
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
