"""agentspace plugin: the ``memory`` context section, built from a folder of markdown files.

Every ``*.md`` file of the folder is read on every call (edits show up on the next message), in name order,
each under a ``## FILE NAME`` heading. The total is capped at ``max_bytes`` and the cut is stated in the text,
so neither the model nor a user inspecting the context mistakes a truncated memory for a complete one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentspace import (
    Config,
    ConfigError,
    ContextRequest,
    ContextSectionBuilder,
    hookimpl,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 32_768
SETTINGS: dict[str, tuple[tuple[type, ...], Any]] = {"folder": ((str,), None), "max_bytes": ((int,), DEFAULT_MAX_BYTES)}


@dataclass(frozen=True, slots=True)
class MemorySettings:
    folder: Path
    max_bytes: int


def load_settings(config: Config) -> MemorySettings:
    """The ``[plugins.memory]`` table, validated; errors name the key like the core's config errors do."""
    table = config.plugin_settings("memory", SETTINGS)
    folder, max_bytes = table["folder"], table["max_bytes"]
    if max_bytes < 1:
        raise ConfigError(config.source, "plugins.memory.max_bytes", f"expected a positive integer, got {max_bytes!r}")
    return MemorySettings(config.resolve_path(folder) if folder else config.data_dir / "memory", max_bytes)


def render_memory(folder: Path, max_bytes: int) -> str:
    """The section text: each markdown file under its name, '' when there is nothing to show."""
    if not folder.is_dir():
        return ""
    blocks: list[str] = []
    budget = max_bytes
    cut: list[str] = []
    for path in sorted(p for p in folder.glob("*.md") if p.is_file()):
        if budget <= 0:
            cut.append(path.name)
            continue
        try:
            with path.open("rb") as f:
                # Read at most one byte past the budget: enough to know the file does not fit,
                # without loading a huge file into memory.
                data = f.read(budget + 1)
        except OSError as e:
            log.warning("memory: cannot read %s: %s", path, e.strerror or e)
            continue
        body = data.decode("utf-8", errors="replace").strip()
        if not body:
            continue
        heading = f"## {path.name}\n\n".encode()
        block = heading + body.encode()
        if len(block) > budget:
            cut.append(path.name)
            if budget <= len(heading):  # no room for any of the file's text
                budget = 0
                continue
            # errors="ignore" below drops a multi-byte character split by the cut instead of garbling it.
            block = block[:budget]
        blocks.append(block.decode("utf-8", errors="ignore"))
        budget -= len(block) + 2  # the blank line that joins blocks
    text = "\n\n".join(blocks)
    if cut:
        text += (
            f"\n\n[Memory truncated at {max_bytes} bytes (plugins.memory.max_bytes); "
            f"not shown in full: {', '.join(cut)}]"
        )
    return text


@dataclass(slots=True)
class MemorySection:
    settings: MemorySettings
    name: str = "memory"

    async def build(self, request: ContextRequest) -> str:
        # File reads run on a worker thread so a slow disk never blocks the event loop.
        return await asyncio.to_thread(render_memory, self.settings.folder, self.settings.max_bytes)


@hookimpl
def register_context_sections(register: Callable[[ContextSectionBuilder], None], config: Config) -> None:
    register(MemorySection(load_settings(config)))
