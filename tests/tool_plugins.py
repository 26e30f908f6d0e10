"""Tools registered the way a plugin registers them, for the tool-loop tests."""

from __future__ import annotations

from typing import Any

from agentspace import Tool, hookimpl


class WeatherTools:
    """``get_weather`` answers; ``broken`` always raises (its error must reach the model and the client)."""

    @hookimpl
    def register_tools(self, register: Any, config: Any) -> None:
        async def weather(args: dict[str, Any]) -> dict[str, Any]:
            return {"city": args["city"], "forecast": "sunny"}

        async def broken(args: dict[str, Any]) -> Any:
            raise RuntimeError("sensor offline")

        register(
            Tool(
                "get_weather",
                "Weather for a city",
                {"type": "object", "properties": {"city": {"type": "string"}}},
                weather,
            )
        )
        register(Tool("broken", "Always fails", {"type": "object", "properties": {}}, broken))
