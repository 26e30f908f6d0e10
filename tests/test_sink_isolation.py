"""Usage sinks other than the store of record are isolated from the answer (docs/plugins.md, "Delivery"):
a webhook sink that is down, slow (5 s) or answering 500 changes nothing a WebSocket, ``/api/chat`` or
``/v1`` client sees, does not delay ``chat.stream.end``, and gets every record once it recovers. Its
failures are counted in ``/metrics``; at shutdown its queue drains (bounded)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from agentspace import UsageRecord, hookimpl
from agentspace.config import Config
from agentspace.plugins import create_plugin_manager
from agentspace.sinks import DropRecord
from agentspace.transports import state
from tests.conftest import wait_until
from tests.fakes.anthropic_upstream import text_response
from tests.support.ui_stream import post_chat, read_all, user
from tests.support.ws import chat, connect


class Webhook:
    """A real HTTP server on 127.0.0.1 taking usage records; ``mode`` is ``ok``, ``slow`` (5 s) or ``500``.
    ``down()`` closes its port; ``up()`` opens it again on the same port."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.received: list[dict[str, Any]] = []
        # Closed: every POST waits here before its answer; ``held`` counts those waiting.
        self.gate = asyncio.Event()
        self.gate.set()
        self.held = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _post(self, request: web.Request) -> web.Response:
        body = await request.json()
        if not self.gate.is_set():
            self.held += 1
            await self.gate.wait()
            self.held -= 1
        if self.mode == "slow":
            await asyncio.sleep(5)
        if self.mode == "500":
            return web.Response(status=500, text="broken")
        self.received.append(body)
        return web.Response(status=204)

    async def up(self) -> None:
        app = web.Application()
        app.router.add_post("/usage", self._post)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        if not self.port:
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def down(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def ids(self) -> set[str]:
        return {r["id"] for r in self.received}


class WebhookSink:
    """What a plugin author writes: POST each record as JSON; a non-2xx answer raises (and is retried)."""

    name = "webhook"
    retry_max_seconds = 0.5  # retry soon, so that the test sees the recovery quickly

    def __init__(self, url: str) -> None:
        self.url = url
        self.session: aiohttp.ClientSession | None = None
        self.started = self.closed = False

    async def start(self) -> None:
        # Longer than a WebSocket frame is waited for (10 s): a turn that waited for this sink would fail.
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        self.started = True

    async def record(self, record: UsageRecord) -> None:
        assert self.session is not None
        async with self.session.post(self.url, json=record.to_dict()) as resp:
            resp.raise_for_status()

    async def aclose(self) -> None:
        if self.session is not None:
            await self.session.close()
        self.closed = True


class WebhookPlugin:
    def __init__(self, sink: WebhookSink) -> None:
        self.sink = sink

    @hookimpl
    def register_usage_sinks(self, register: Callable[[WebhookSink], None], config: Config) -> None:
        register(self.sink)


@pytest.fixture
async def webhook() -> AsyncIterator[Webhook]:
    hook = Webhook()
    await hook.up()
    yield hook
    await hook.down()


@pytest.fixture
def with_sink(webhook: Webhook, monkeypatch: pytest.MonkeyPatch) -> WebhookSink:
    monkeypatch.setenv("AGENTSPACE_LOAD_PLUGINS", "metrics")
    return WebhookSink(f"http://127.0.0.1:{webhook.port}/usage")


async def start_client(make_client: Any, *plugins: object) -> TestClient:
    pm = create_plugin_manager()
    for plugin in plugins:
        pm.register(plugin)
    return await make_client(pm=pm)


async def stored_usage(client: TestClient) -> set[str]:
    """The ids the store of record holds (read through the running gateway's usage store)."""
    gw = client.server.app[state.REGISTRY]
    return {r["id"] for r in await gw.usage.records()}


async def ws_turn(client: TestClient, token: str, text: str) -> tuple[list[dict[str, Any]], float]:
    """One WebSocket turn: its frames, and the seconds from chat.send to chat.stream.end."""
    ws = await connect(client, token)
    started = time.perf_counter()
    frames = await chat(ws, text)
    took = time.perf_counter() - started
    await ws.close()
    return frames, took


def shape(frames: list[dict[str, Any]]) -> list[str]:
    return [f["type"] for f in frames]


async def metric(client: TestClient, headers: dict[str, str], name: str) -> float:
    text = await (await client.get("/metrics", headers=headers)).text()
    for line in text.splitlines():
        if line.startswith(name + '{sink="webhook"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("trouble", ["down", "slow", "500"])
async def test_a_failing_webhook_changes_nothing_a_client_sees_and_loses_no_record(
    make_client: Any,
    webhook: Webhook,
    with_sink: WebhookSink,
    token: str,
    auth_headers: dict[str, str],
    fake_anthropic: Any,
    trouble: str,
) -> None:
    fake_anthropic.default = text_response("Fine, thanks", chunks=3)
    client = await start_client(make_client, WebhookPlugin(with_sink))
    assert with_sink.started  # start() ran when the server started

    # What a client sees while the webhook works: the reference.
    good_frames, _ = await ws_turn(client, token, "warm up")
    for i in range(15):
        await ws_turn(client, token, f"ok {i}")
    good_http, good_v1 = await http_and_v1_turns(client, auth_headers, "chat-ok")
    await wait_until(lambda: _ready(len(webhook.received) == 18))

    if trouble == "down":
        await webhook.down()
    else:
        webhook.mode = trouble
        webhook.gate.clear()  # the webhook holds every POST until the turns below have ended
    bad_frames, _ = await ws_turn(client, token, "while broken")
    for i in range(15):
        await ws_turn(client, token, f"broken {i}")
    # The same frames (ids and times aside), each turn's chat.stream.end sent while the sink was still
    # waiting for the webhook: nothing a turn ends with waits for it (no timing, which a loaded machine skews).
    assert shape(bad_frames) == shape(good_frames)
    assert bad_frames[-1]["type"] == "chat.stream.end"
    if trouble != "down":
        assert webhook.held == 1  # the sink's worker, on its first record, one at a time
        webhook.gate.set()

    # /api/chat and /v1 answer as they did: the same stream parts and the same completion (ids aside).
    assert await http_and_v1_turns(client, auth_headers, "chat-broken") == (good_http, good_v1)

    if trouble != "slow":  # a slow webhook does not fail: it only takes its time
        await wait_until(lambda: _positive(metric(client, auth_headers, "agentspace_sink_failures_total")))
    assert await metric(client, auth_headers, "agentspace_sink_queue_depth") > 0

    # The webhook recovers: every record the store of record holds reaches it, none twice.
    if trouble == "down":
        await webhook.up()
    webhook.mode = "ok"
    stored = await stored_usage(client)
    assert len(stored) == 36
    await wait_until(lambda: _ready(webhook.ids() >= stored), timeout=20)
    if trouble != "slow":  # a slow POST answered after the client's timeout may arrive twice (at-least-once)
        assert len(webhook.received) == len(stored)
    assert await metric(client, auth_headers, "agentspace_sink_queue_depth") == 0


async def http_and_v1_turns(
    client: TestClient, headers: dict[str, str], chat_id: str
) -> tuple[list[str], tuple[int, dict[str, Any]]]:
    """A ``POST /api/chat`` turn and a ``/v1/chat/completions`` call: the types of the stream's parts, and
    the completion's status and body without its id and time."""
    resp = await post_chat(client, headers, chat_id, user("Hi!"))
    assert resp.status == 200
    parts = [c["type"] if isinstance(c, dict) else str(c) for c in await read_all(resp)]
    assert "error" not in parts and "finish" in parts
    resp = await client.post(
        "/v1/chat/completions",
        json={"model": "anthropic/claude-sonnet-4-5", "messages": [{"role": "user", "content": "Hi"}]},
        headers=headers,
    )
    body = await resp.json()
    assert body["choices"][0]["message"]["content"] == "Fine, thanks"
    return parts, (resp.status, {k: v for k, v in body.items() if k not in ("id", "created")})


async def _ready(value: bool) -> bool:
    return value


async def _positive(value: Awaitable[float]) -> bool:
    return await value > 0


async def test_records_left_at_shutdown_drain_then_the_sink_closes(
    make_client: Any, webhook: Webhook, with_sink: WebhookSink, token: str, fake_anthropic: Any
) -> None:
    webhook.mode = "500"
    client = await start_client(make_client, WebhookPlugin(with_sink))
    for i in range(3):
        frames, _ = await ws_turn(client, token, f"turn {i}")
        assert frames[-1]["type"] == "chat.stream.end"
    webhook.mode = "ok"  # recovers while the server shuts down: the drain delivers what waits
    started = time.monotonic()
    await client.close()
    assert time.monotonic() - started < 10
    assert len(webhook.received) == 3
    assert with_sink.closed


async def test_the_drain_retries_at_once_a_sink_waiting_out_a_long_backoff(
    make_client: Any, webhook: Webhook, with_sink: WebhookSink, token: str, auth_headers: dict[str, str]
) -> None:
    """A webhook that failed a few times waits seconds before its next try; when it is back as the server
    stops, the drain delivers what waits instead of sleeping through the backoff and losing it."""
    with_sink.retry_max_seconds = 60.0
    with_sink.drain_seconds = 2.0  # type: ignore[attr-defined]
    webhook.mode = "500"
    client = await start_client(make_client, WebhookPlugin(with_sink))
    frames, _ = await ws_turn(client, token, "turn")
    assert frames[-1]["type"] == "chat.stream.end"
    # Failures at 0, 0.5, 1.5 and 3.5 s: the next try waits 8 s, longer than the 2 s drain.
    await wait_until(lambda: _at_least(metric(client, auth_headers, "agentspace_sink_failures_total"), 4))
    webhook.mode = "ok"
    await client.close()
    assert len(webhook.received) == 1 and with_sink.closed


async def _at_least(value: Awaitable[float], least: float) -> bool:
    return await value >= least


async def test_a_refused_record_is_not_retried_and_a_broken_sink_never_reaches_the_client(
    make_client: Any, token: str, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    calls: list[str] = []

    class Refusing:
        name = "refusing"

        async def record(self, record: UsageRecord) -> None:
            calls.append(record.id)
            raise DropRecord("no room for it")

    class Refused(WebhookPlugin):
        @hookimpl
        def register_usage_sinks(self, register: Callable[[Any], None], config: Config) -> None:
            register(Refusing())

    # The repro: a sink raising ConnectionRefusedError must not end the turn with STORAGE_ERROR.
    class Down:
        name = "down"
        retry_max_seconds = 0.1

        async def record(self, record: UsageRecord) -> None:
            raise ConnectionRefusedError(111, "Connection refused")

    class DownPlugin:
        @hookimpl
        def register_usage_sinks(self, register: Callable[[Any], None], config: Config) -> None:
            register(Down())

    client = await start_client(make_client, Refused(WebhookSink("")), DownPlugin())
    frames, _ = await ws_turn(client, token, "Hi")
    assert frames[-1]["type"] == "chat.stream.end", frames[-1]
    assert not [f for f in frames if f["type"] == "error"]
    await wait_until(lambda: _ready(len(calls) == 1))
    await asyncio.sleep(0.3)
    assert len(calls) == 1  # DropRecord: not retried
    assert len(await stored_usage(client)) == 1
    assert json.dumps(frames).count("STORAGE_ERROR") == 0


async def test_a_full_queue_drops_new_records_for_that_sink_only_and_counts_them(
    make_client: Any, token: str, auth_headers: dict[str, str], fake_anthropic: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``queue_size`` bounds a stuck sink's memory: past it, new records are dropped for that sink (counted
    in ``agentspace_sink_dropped_total``); the store of record keeps every one, and the chats go on."""
    monkeypatch.setenv("AGENTSPACE_LOAD_PLUGINS", "metrics")
    release = asyncio.Event()
    got: list[str] = []

    class Stuck:
        name = "webhook"
        queue_size = 2

        async def record(self, record: UsageRecord) -> None:
            await release.wait()
            got.append(record.id)

    class StuckPlugin:
        @hookimpl
        def register_usage_sinks(self, register: Callable[[Any], None], config: Config) -> None:
            register(Stuck())

    client = await start_client(make_client, StuckPlugin())
    for i in range(5):
        frames, _ = await ws_turn(client, token, f"turn {i}")
        assert frames[-1]["type"] == "chat.stream.end"
    stored = await stored_usage(client)
    assert len(stored) == 5
    # The first record is with the sink, the second waits: both count in the queue; three were dropped.
    assert await metric(client, auth_headers, "agentspace_sink_queue_depth") == 2
    assert await metric(client, auth_headers, "agentspace_sink_dropped_total") == 3
    release.set()
    await wait_until(lambda: _ready(len(got) == 2))
    assert set(got) < stored
    assert await metric(client, auth_headers, "agentspace_sink_queue_depth") == 0


async def test_a_sink_whose_record_is_not_async_gets_each_record_once(
    make_client: Any, token: str, auth_headers: dict[str, str], fake_anthropic: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain ``def record`` (cheap work, allowed by docs/plugins.md) has run when it returns: it is not
    retried as a failure, which would repeat its work for ever."""
    monkeypatch.setenv("AGENTSPACE_LOAD_PLUGINS", "metrics")
    got: list[str] = []

    class Plain:
        name = "webhook"

        def record(self, record: UsageRecord) -> None:
            got.append(record.id)

    class PlainPlugin:
        @hookimpl
        def register_usage_sinks(self, register: Callable[[Any], None], config: Config) -> None:
            register(Plain())

    client = await start_client(make_client, PlainPlugin())
    for i in range(3):
        frames, _ = await ws_turn(client, token, f"turn {i}")
        assert frames[-1]["type"] == "chat.stream.end"
    await wait_until(lambda: _ready(len(got) == 3))
    await asyncio.sleep(0.6)  # past the first retry's backoff: nothing is sent again
    assert sorted(got) == sorted(await stored_usage(client))
    assert await metric(client, auth_headers, "agentspace_sink_failures_total") == 0


async def test_the_server_stops_while_a_broken_sink_still_fails_its_records(
    make_client: Any, token: str, fake_anthropic: Any
) -> None:
    """A sink that fails every record, given as long to drain as its retry waits (0.5 s both, so the two timers
    fire together): the server stops once the drain is over. The stop could land as a failed record's retry
    began, and Python 3.11's ``wait_for`` then swallowed it: the queue retried for ever and the server hung."""
    failed = 0

    class Down:
        name = "down"
        drain_seconds = 0.5

        async def record(self, record: UsageRecord) -> None:
            nonlocal failed
            failed += 1
            raise ConnectionRefusedError(111, "Connection refused")

    class DownPlugin:
        @hookimpl
        def register_usage_sinks(self, register: Callable[[Any], None], config: Config) -> None:
            register(Down())

    for _ in range(5):  # the timers' order varies from one stop to the next: several stops
        client = await start_client(make_client, DownPlugin())
        frames, _ = await ws_turn(client, token, "Hi")
        assert frames[-1]["type"] == "chat.stream.end", frames[-1]
        await wait_until(lambda: _ready(failed > 0))
        await asyncio.wait_for(client.close(), 20)


async def test_records_that_come_after_a_sink_closed_at_shutdown_are_said_once(
    make_client: Any, token: str, fake_anthropic: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A call that outlives the shutdown's wait records after the sinks closed: the log says the sink was
    closed, once, where it said "queue full" for each record. The late records are offered as ``Recorder.record``
    offers them (no call can be made to outlive the wait in a test's time)."""
    got: list[UsageRecord] = []

    class Late:
        name = "late"

        async def record(self, record: UsageRecord) -> None:
            got.append(record)

    class LatePlugin:
        @hookimpl
        def register_usage_sinks(self, register: Callable[[Any], None], config: Config) -> None:
            register(Late())

    client = await start_client(make_client, LatePlugin())
    for i in range(2):
        frames, _ = await ws_turn(client, token, f"turn {i}")
        assert frames[-1]["type"] == "chat.stream.end", frames[-1]
    await wait_until(lambda: _ready(len(got) == 2))
    queues = client.app[state.REGISTRY].recorder.queues.values()
    await client.close()  # the server stops: the sinks drain and close
    (queue,) = [q for q in queues if q.name == "late"]
    for record in got:
        queue.offer(record)
    said = [r.getMessage() for r in caplog.records if "usage sink 'late'" in r.getMessage()]
    assert len(said) == 1 and "closed at shutdown" in said[0], said
    assert queue.dropped == 2 and len(got) == 2
