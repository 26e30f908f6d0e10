"""agentspace plugin: an offline provider that echoes the last user message, for ``echo/...`` model ids.

It lets anyone run the whole gateway (sessions, streaming, usage, costs) without an API key or a network,
and it is a predictable model for tests and benchmarks. ``echo/reasoning`` streams reasoning first.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

from agentspace import (
    ChatMessage,
    Config,
    ConfigError,
    Part,
    Provider,
    ProviderEvent,
    ProviderFinish,
    ProviderRequest,
    ReasoningDelta,
    ReasoningPart,
    TextDelta,
    TextPart,
    TokenUsage,
    ToolCallPart,
    ToolResultPart,
    count_tokens,
    hookimpl,
)

PREFIX = "echo/"
REASONING_MODEL = "echo/reasoning"
SETTINGS: dict[str, tuple[tuple[type, ...], Any]] = {"delay_ms": ((int, float), 0)}

# A word with the whitespace around it, so the chunks join back into the exact text.
_WORD = re.compile(r"\s*\S+\s*")


def chunks(text: str) -> list[str]:
    """``text`` split word by word; joining the chunks gives ``text`` back."""
    return _WORD.findall(text) or ([text] if text else [])


def part_text(part: Part) -> str:
    """What a part contributes to the input size (tool inputs and outputs count as their JSON)."""
    if isinstance(part, (TextPart, ReasoningPart)):
        return part.text
    if isinstance(part, ToolCallPart):
        return json.dumps(part.input)
    if isinstance(part, ToolResultPart):
        return output_text(part.output)
    return ""


def output_text(output: Any) -> str:
    return output if isinstance(output, str) else json.dumps(output)


def echo_text(messages: list[ChatMessage]) -> str:
    """The last message's text, or in the tool loop (last message = tool results) the tools' output."""
    if not messages:
        return ""
    last = messages[-1]
    results = [p for p in last.parts if isinstance(p, ToolResultPart)]
    if results:
        return "\n".join(output_text(p.output) for p in results)
    return last.text


class EchoProvider:
    """Serves every ``echo/...`` id; needs no API key and makes no network calls."""

    name = "echo"

    def __init__(self, delay_ms: float = 0) -> None:
        self.delay = delay_ms / 1000

    def claims(self, model: str) -> bool:
        return model.startswith(PREFIX)

    def models(self) -> list[str]:
        """Listed by ``agentspace models`` and ``GET /api/models``; no key needed."""
        return ["echo/echo", "echo/reasoning"]

    async def stream(self, request: ProviderRequest) -> AsyncIterator[ProviderEvent]:
        text = echo_text(request.messages)
        parts: list[Part] = []
        reasoning = ""
        if request.model == REASONING_MODEL:
            reasoning = f"Thinking about: {text}"
            for piece in chunks(reasoning):
                await self._pause()
                yield ReasoningDelta(piece)
            parts.append(ReasoningPart(reasoning))
        for piece in chunks(text):
            await self._pause()
            yield TextDelta(piece)
        if text:
            parts.append(TextPart(text))
        sent = [request.system, *(part_text(p) for m in request.messages for p in m.parts)]
        reasoning_tokens = count_tokens(reasoning)
        usage = TokenUsage(
            input_tokens=count_tokens("\n".join(t for t in sent if t)),
            # Like real providers, reasoning is billed as output.
            output_tokens=reasoning_tokens + count_tokens(text),
            reasoning_tokens=reasoning_tokens,
        )
        yield ProviderFinish("stop", usage, ChatMessage("assistant", parts))

    async def _pause(self) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)


def delay_ms(config: Config) -> float:
    value = config.plugin_settings("echo", SETTINGS)["delay_ms"]
    if value < 0:
        raise ConfigError(config.source, "plugins.echo.delay_ms", f"expected a number >= 0, got {value!r}")
    return float(value)


@hookimpl
def register_providers(register: Callable[[Provider], None], config: Config) -> None:
    register(EchoProvider(delay_ms(config)))
