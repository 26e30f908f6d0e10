"""Gateway tools for tests that need a turn held between two steps of its tool loop."""

from __future__ import annotations

import asyncio
from typing import Any

from agentspace import Tool, hookimpl
from agentspace.plugins import create_plugin_manager


def slow_tool(entered: asyncio.Event, release: asyncio.Event) -> Any:
    """A plugin manager with a ``wait`` tool that sets ``entered`` and runs until ``release`` is set."""

    class SlowTool:
        @hookimpl
        def register_tools(self, register: Any, config: Any) -> None:
            async def wait(args: dict[str, Any]) -> str:
                entered.set()
                await release.wait()
                return "done"

            register(Tool("wait", "Waits", {"type": "object", "properties": {}}, wait))

    pm = create_plugin_manager()
    pm.register(SlowTool())
    return pm
