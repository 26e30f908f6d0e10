"""One session used from two ``agentspace serve`` replicas on PostgreSQL and Redis (and the CLI on the same
database): a change made through one door shows at once through the others, and a session cannot be deleted
or compacted under an answer streaming on another replica; one deleted anyway (the CLI) ends that answer with
SESSION_NOT_FOUND. Real processes against real servers."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from click.testing import CliRunner

from agentspace.cli import main
from scripts.harness import GatewayProcess
from tests.fakes import anthropic_upstream as fa
from tests.test_replicas import HEADERS, SLOW, chat_body, finish_of, usage_rows


async def test_changes_on_one_replica_show_on_the_other_and_a_streaming_session_is_kept(
    replicas: list[GatewayProcess], fake_anthropic: Any, pg_dsn: str
) -> None:
    a, b = replicas
    async with aiohttp.ClientSession(headers=HEADERS) as http:
        async with http.post(f"{a.url}/api/chat", json=chat_body("s1", "apple")) as resp:
            assert resp.status == 200
            await resp.read()
        async with http.get(f"{b.url}/api/sessions?q=apple") as resp:
            assert [s["id"] for s in (await resp.json())["sessions"]] == ["s1"]  # B's search index knows it now
        async with http.patch(f"{a.url}/api/sessions/s1", json={"title": "Banana bread"}) as resp:
            assert resp.status == 200
        async with http.get(f"{b.url}/api/sessions?q=banana") as resp:
            assert [s["id"] for s in (await resp.json())["sessions"]] == ["s1"]
        async with http.get(f"{b.url}/api/sessions") as resp:
            assert [(s["id"], s["title"]) for s in (await resp.json())["sessions"]] == [("s1", "Banana bread")]
        async with http.get(f"{b.url}/api/sessions/s1") as resp:
            assert (await resp.json())["session"]["title"] == "Banana bread"

        # An answer streams on A: B refuses to delete or compact the session under it.
        fake_anthropic.enqueue(fa.text_response(SLOW, chunks=60).with_delay(0.05))
        started = await http.post(f"{a.url}/api/chat", json=chat_body("s1", "more"))
        await started.content.readuntil(b"text-delta")
        for method, path in (("DELETE", "/api/sessions/s1"), ("POST", "/api/sessions/s1/compact")):
            async with http.request(method, f"{b.url}{path}") as resp:
                assert resp.status == 409 and (await resp.json())["error"]["code"] == "STREAM_IN_PROGRESS", path
        assert [c["type"] for c in finish_of(await asyncio.wait_for(started.read(), 30))] == ["finish"]
        async with http.get(f"{b.url}/api/sessions/s1") as resp:
            assert [m["content"] for m in (await resp.json())["session"]["messages"]][2:] == ["more", SLOW]

        # Once it ended, B deletes it, and A no longer shows it anywhere.
        async with http.delete(f"{b.url}/api/sessions/s1") as resp:
            assert resp.status == 204
        async with http.get(f"{a.url}/api/sessions/s1") as resp:
            assert resp.status == 404
        async with http.get(f"{a.url}/api/sessions?q=banana") as resp:
            assert (await resp.json())["sessions"] == []
        async with http.get(f"{a.url}/api/sessions") as resp:
            assert (await resp.json())["sessions"] == []
    assert len(await usage_rows(pg_dsn)) == 2  # one record per call


async def test_a_session_deleted_by_the_cli_while_a_replica_streams_in_it(
    replicas: list[GatewayProcess], fake_anthropic: Any, pg_dsn: str
) -> None:
    a, b = replicas
    async with aiohttp.ClientSession(headers=HEADERS) as http:
        fake_anthropic.enqueue(fa.text_response(SLOW, chunks=60).with_delay(0.05))
        started = await http.post(f"{a.url}/api/chat", json=chat_body("s2"))
        await started.content.readuntil(b"text-delta")
        args = ["--config", str(b.config_path), "sessions", "delete", "--yes", "s2"]
        deleted = await asyncio.to_thread(CliRunner().invoke, main, args)
        assert deleted.exit_code == 0, deleted.output
        ends = finish_of(await asyncio.wait_for(started.read(), 30))
        # The client learns the session is gone (not a disk error, not a retried write).
        assert [c["type"] for c in ends] == ["error"] and "deleted" in ends[0]["errorText"], ends
        async with http.get(f"{b.url}/api/sessions/s2") as resp:
            assert resp.status == 404
    rows = await usage_rows(pg_dsn)
    assert len(rows) == 1 and not rows[0]["is_error"]  # the call is billed once
    assert "retrying" not in a.log()
