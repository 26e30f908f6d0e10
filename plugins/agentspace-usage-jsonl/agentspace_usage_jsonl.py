"""agentspace plugin: a usage sink that appends every usage record to a JSON Lines file.

One line per provider call, ``UsageRecord.to_dict()`` as JSON: easy to ship to a log pipeline, to ``jq``, or
to load into a spreadsheet. Each line is written with a single ``write`` on a file opened with ``O_APPEND``
and fsynced before ``record`` returns, so a crash loses at most the record being written and concurrent
writers (two gateways sharing the file) never interleave within a line.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from agentspace import Config, ConfigError, UsageRecord, UsageSink, hookimpl

SETTINGS: dict[str, tuple[tuple[type, ...], Any]] = {"path": ((str,), None)}


class JsonlUsageSink:
    name = "jsonl"

    def __init__(self, path: Path) -> None:
        self.path = path
        # One worker thread: the event loop never blocks on disk, and lines land in the order of the calls.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agentspace-usage-jsonl")

    async def record(self, record: UsageRecord) -> None:
        line = (json.dumps(record.to_dict(), ensure_ascii=False) + "\n").encode()
        await asyncio.get_running_loop().run_in_executor(self._writer, self._append, line)

    async def aclose(self) -> None:
        """Called by the gateway at shutdown; waits for queued lines to be written."""
        await asyncio.to_thread(self._writer.shutdown, wait=True)

    def _append(self, line: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Opened per record: a rotated or deleted file is recreated instead of written into the void.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)


def jsonl_path(config: Config) -> Path:
    path = config.plugin_settings("usage-jsonl", SETTINGS)["path"]
    if path is None:
        return config.data_dir / "usage.jsonl"
    if not path:
        raise ConfigError(config.source, "plugins.usage-jsonl.path", f"expected a file path, got {path!r}")
    return config.resolve_path(path)


@hookimpl
def register_usage_sinks(register: Callable[[UsageSink], None], config: Config) -> None:
    register(JsonlUsageSink(jsonl_path(config)))
