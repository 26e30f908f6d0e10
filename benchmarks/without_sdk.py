"""``agentspace`` with its Anthropic calls made without the SDK: what the SDK costs, measured (never for real use).

    python benchmarks/without_sdk.py serve --config FILE ...     (the agentspace CLI, with this plugin)
    python benchmarks/ab.py . . --b-without-sdk                  (the same tree, with and without the SDK)

The built-in Anthropic provider uses the official SDK (README.md). This plugin's provider claims the same
``anthropic/...`` ids ahead of it (registered later, so pluggy asks it first) and differs in one thing only:
the streamed Messages request is one plain aiohttp POST instead of ``client.messages...create``; the request
parameters, the SSE decoding and the event mapping are the built-in's own functions. The difference between
the two sides of ``ab.py`` is therefore the SDK's per-call work and its HTTP client's. It handles the
benchmark's happy path and reports any other status as an error; it has none of the SDK's error mapping,
timeouts or retries.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp

from agentspace.events import ProviderError, ProviderEvent
from agentspace.hookspecs import hookimpl
from agentspace.providers.anthropic import _StreamState, request_params
from agentspace.providers.base import Provider, ProviderRequest
from agentspace.providers.sse import sse_events

API_VERSION = "2023-06-01"


class WithoutSDKProvider:
    name = "anthropic-without-sdk"

    def __init__(self) -> None:
        self._http: aiohttp.ClientSession | None = None

    def claims(self, model: str) -> bool:
        return model.startswith("anthropic/")

    async def stream(self, request: ProviderRequest) -> AsyncIterator[ProviderEvent]:
        if self._http is None:
            self._http = aiohttp.ClientSession()
        url = (request.base_url or "https://api.anthropic.com").rstrip("/") + "/v1/messages"
        headers = {"x-api-key": request.api_key or "", "anthropic-version": API_VERSION}
        state = _StreamState()
        async with self._http.post(url, json=request_params(request), headers=headers) as response:
            if response.status != 200:
                raise ProviderError("LLM_ERROR", f"upstream HTTP {response.status}", status=response.status)
            async for batch in sse_events(response.content.iter_any()):
                for name, data in batch:
                    for event in state.handle(name, data):
                        yield event
        yield state.finish()

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()


@hookimpl
def register_providers(register: Callable[[Provider], None], config: Any) -> None:
    register(WithoutSDKProvider())


def main() -> None:
    from agentspace.cli import main as cli
    from agentspace.plugins import get_plugin_manager

    get_plugin_manager().register(sys.modules[__name__], name="benchmarks.without_sdk")
    cli(prog_name="agentspace")


if __name__ == "__main__":
    main()
