"""What a third-party plugin gets wrong must not take the gateway down, and must be named when it stops the
start (docs/plugins.md): a usage sink hanging in ``start`` or ``aclose``, a hook registering an object of the
wrong kind, a ``server_startup`` that raises."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from agentspace import UsageRecord, hookimpl
from agentspace.config import Config
from tests.conftest import wait_until
from tests.test_sink_isolation import start_client, stored_usage, ws_turn


class Hangs:
    """A sink that never finishes ``start`` nor ``aclose``, beside one that works."""

    name = "hangs"

    def __init__(self) -> None:
        self.got: list[str] = []

    async def start(self) -> None:
        await asyncio.sleep(3600)

    async def record(self, record: UsageRecord) -> None:
        self.got.append(record.id)

    async def aclose(self) -> None:
        await asyncio.sleep(3600)


class Works:
    name = "works"

    def __init__(self) -> None:
        self.got: list[str] = []

    async def record(self, record: UsageRecord) -> None:
        self.got.append(record.id)


class Sinks:
    def __init__(self, *sinks: object) -> None:
        self.sinks = sinks

    @hookimpl
    def register_usage_sinks(self, register: Callable[[Any], None], config: Config) -> None:
        for sink in self.sinks:
            register(sink)


async def test_a_sink_hanging_in_start_or_aclose_neither_keeps_the_server_down_nor_up(
    make_client: Any, token: str, fake_anthropic: Any
) -> None:
    hangs, works = Hangs(), Works()
    started = time.monotonic()
    client = await start_client(make_client, Sinks(hangs, works))
    assert time.monotonic() - started < 10  # the server listens though one sink's start never ends
    frames, took = await ws_turn(client, token, "hello")
    assert frames[-1]["type"] == "chat.stream.end" and took < 5
    await wait_until(lambda: _true(len(works.got) == 1))
    assert works.got == sorted(await stored_usage(client))
    assert hangs.got == []  # no record before its start ended: it was not ready for one
    started = time.monotonic()
    await client.close()
    assert time.monotonic() - started < 15  # a drain (5 s) and a bounded aclose (5 s), not for ever


async def _true(value: bool) -> bool:
    return value
