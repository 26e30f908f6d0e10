"""``agentspace storage migrate --to DSN`` through the CLI (click's CliRunner) into a real PostgreSQL:
twice over a data directory with sessions and usage, identical reports before and after, nothing doubled."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from agentspace.cli import main
from agentspace.storage.embedded.sessions import SessionStore
from agentspace.storage.embedded.usage import write_segment
from agentspace.storage.postgres import PostgresDatabase, PostgresSessionStore, PostgresUsageStore
from tests.test_storage_contract import record


def invoke(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def seed(data_dir: Path) -> None:
    """A data directory as a tinydb server leaves it: sessions with messages, usage over several days."""

    async def write() -> None:
        sessions = SessionStore(data_dir)
        for n in range(5):
            await sessions.create(model="anthropic/claude-sonnet-4-5", session_id=f"s{n}", client="cli")
            await sessions.append_message(f"s{n}", {"role": "user", "content": f"question {n}", "id": f"q{n}"})
            await sessions.append_message(f"s{n}", {"role": "assistant", "content": f"answer {n}", "id": f"a{n}"})
        await sessions.aclose()

    asyncio.run(write())
    for day in range(1, 4):
        records = [
            record(
                day * 1000 + n,
                model=("openai/gpt-4o", "anthropic/claude-sonnet-4-5")[n % 2],
                timestamp=f"2026-11-0{day}T10:00:{n % 60:02d}.000Z",
                session_id=f"s{n % 5}",
                error="UPSTREAM_ERROR" if n % 17 == 0 else None,
                answered=n % 34 != 0,
            ).to_dict()
            for n in range(700)
        ]
        write_segment(data_dir, f"2026-11-0{day}", 0, records[:400])
        write_segment(data_dir, f"2026-11-0{day}", 1, records[400:])


def usage_json(data_dir: Path, *extra: str) -> dict[str, Any]:
    result = invoke("--data-dir", str(data_dir), "usage", "--json", *extra)
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.output))


def test_migrate_twice_copies_everything_once(tmp_path: Path, pg_dsn: str, monkeypatch: Any) -> None:
    data_dir = tmp_path / "data"
    seed(data_dir)
    before = {flags: usage_json(data_dir, *flags) for flags in [(), ("--by-day",), ("--session", "s3")]}

    first = invoke("--data-dir", str(data_dir), "storage", "migrate", "--to", pg_dsn)
    assert first.exit_code == 0, first.output
    assert "sessions: 5 copied, 0 already there; usage records: 2100 copied, 0 already there" in first.output
    second = invoke("--data-dir", str(data_dir), "storage", "migrate", "--to", pg_dsn)
    assert second.exit_code == 0, second.output
    assert "sessions: 0 copied, 5 already there; usage records: 0 copied, 2100 already there" in second.output

    # The same reports from the database, through the same command with the postgres backend configured.
    config = tmp_path / "pg.toml"
    config.write_text(f'[storage]\nbackend = "postgres"\ndsn = "{pg_dsn}"\ndata_dir = "{data_dir}"\n')
    for flags, report in before.items():
        result = invoke("usage", "--config", str(config), "--json", *flags)
        assert result.exit_code == 0, result.output
        assert json.loads(result.output) == report, flags

    async def compare() -> None:
        db = PostgresDatabase(pg_dsn)
        try:
            assert await PostgresUsageStore(db).count() == 2100
            target = PostgresSessionStore(db)
            source = SessionStore(data_dir)
            assert [s["id"] for s in (await target.listing()).sessions] == [
                s["id"] for s in source.listing_sync().sessions
            ]
            for n in range(5):
                assert await target.get(f"s{n}") == source.get_sync(f"s{n}")
        finally:
            await db.aclose()

    asyncio.run(compare())


def test_migrate_names_an_unreachable_database(tmp_path: Path) -> None:
    seed(tmp_path / "data")
    result = CliRunner().invoke(
        main, ["--data-dir", str(tmp_path / "data"), "storage", "migrate", "--to", "postgresql://x@127.0.0.1:1/db"]
    )
    assert result.exit_code == 1
    assert "could not use its database" in result.output
