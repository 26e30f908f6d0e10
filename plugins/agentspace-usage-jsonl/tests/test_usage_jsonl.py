from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import agentspace_usage_jsonl
import pytest

from agentspace import Config, ConfigError, Cost, TokenUsage, UsageRecord, UsageSink
from agentspace.testing import installed_plugin, make_config, registered


def jsonl_sink(config: Config) -> Any:
    """The sink the plugin registers, obtained through the hook like the gateway does."""
    [sink] = registered("register_usage_sinks", config, agentspace_usage_jsonl)
    assert isinstance(sink, UsageSink) and sink.name == "jsonl"
    return sink


def jsonl_config(tmp_path: Path, **settings: Any) -> Config:
    return make_config(tmp_path, plugins={"usage-jsonl": settings})


def usage_record(n: int) -> UsageRecord:
    return UsageRecord(
        id=f"u{n}",
        timestamp="2025-01-01T00:00:00.000Z",
        model="echo/echo",
        provider="echo",
        session_id="s1",
        client="tests",
        usage=TokenUsage(10 + n, 5),
        cost=Cost(0.001, 0.002),
        latency_ms=12.5,
        finish_reason="stop",
    )


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_appends_one_json_line_per_record_in_order(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "usage.jsonl"
    path.parent.mkdir()
    path.write_text('{"earlier": true}\n')
    sink = jsonl_sink(jsonl_config(tmp_path, path="logs/usage.jsonl"))
    await asyncio.gather(*(sink.record(usage_record(n)) for n in range(50)))
    await sink.aclose()
    lines = read_lines(path)
    assert lines[0] == {"earlier": True}
    assert [line["id"] for line in lines[1:]] == [f"u{n}" for n in range(50)]
    assert lines[1] == usage_record(0).to_dict()


async def test_default_path_is_usage_jsonl_in_the_data_dir_private_to_the_user(tmp_path: Path) -> None:
    sink = jsonl_sink(jsonl_config(tmp_path))
    await sink.record(usage_record(1))
    path = tmp_path / "data" / "usage.jsonl"
    assert read_lines(path) == [usage_record(1).to_dict()]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_a_deleted_file_is_recreated(tmp_path: Path) -> None:
    sink = jsonl_sink(jsonl_config(tmp_path, path="u.jsonl"))
    await sink.record(usage_record(1))
    (tmp_path / "u.jsonl").rename(tmp_path / "u.jsonl.1")  # what log rotation does
    await sink.record(usage_record(2))
    assert [line["id"] for line in read_lines(tmp_path / "u.jsonl")] == ["u2"]


async def test_writes_and_fsyncs_off_the_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync
    fsync_threads: list[str] = []

    def slow_fsync(fd: int) -> None:  # a slow disk
        fsync_threads.append(threading.current_thread().name)
        time.sleep(0.2)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    sink = jsonl_sink(jsonl_config(tmp_path))
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    await sink.record(usage_record(1))
    task.cancel()
    assert fsync_threads and all(name.startswith("agentspace-usage-jsonl") for name in fsync_threads)
    assert ticks >= 5


@pytest.mark.parametrize(
    ("settings", "key"), [({"path": ""}, "plugins.usage-jsonl.path"), ({"file": "x"}, "plugins.usage-jsonl.file")]
)
def test_bad_settings_name_the_key(tmp_path: Path, settings: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        jsonl_sink(jsonl_config(tmp_path, **settings))
    assert e.value.key == key


def test_discovered_through_the_entry_point() -> None:
    installed = installed_plugin("usage-jsonl")
    assert installed.plugin is agentspace_usage_jsonl
    assert installed.info["package"] == "agentspace-usage-jsonl"
    assert installed.info["hooks"] == ["register_usage_sinks"]
