"""What a client without the token can hold (issue 15 item 7), against a real ``agentspace serve`` with raw
sockets: slow headers, connection floods, pings and oversized frames before auth, and failed-auth floods
from all over 127/8 that must neither lock the owner out nor escape the limit."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import WSMsgType

from scripts.harness import GatewayProcess


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, upstream: Any, **server: Any) -> AsyncIterator[GatewayProcess]:
    """A served gateway with these [server] keys; its log must show no unhandled problem."""
    gateway = GatewayProcess(tmp_path / "data", upstream.url, server=server)
    await gateway.start()
    try:
        yield gateway
    finally:
        try:
            assert await gateway.terminate() == 0
        finally:
            await gateway.aclose()
    assert gateway.log_problems() == []


def host_port(server: GatewayProcess) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the server sends until it closes the connection; fails if it is still open after ``seconds``."""
    received = b""
    deadline = time.monotonic() + seconds
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), max(0.01, deadline - time.monotonic())):
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the connection was still open after {seconds} s (received {received[:80]!r})") from None
    return received


async def websocket_upgrade(server: GatewayProcess) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw socket upgraded to a WebSocket on /gateway, without authentication."""
    host, port = host_port(server)
    reader, writer = await asyncio.open_connection(host, port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /gateway HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def test_slow_headers_are_closed_at_the_header_deadline(tmp_path: Path, fake_anthropic: Any) -> None:
    server = GatewayProcess(tmp_path / "data", fake_anthropic.url, server={"header_timeout_seconds": 1.0})
    await server.start()
    try:
        reader, writer = await asyncio.open_connection(*host_port(server))
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")

        async def drip() -> None:  # a header line now and then: never a complete request
            for i in range(100):
                await asyncio.sleep(0.2)
                writer.write(f"X-Slow-{i}: x\r\n".encode())

        dripping = asyncio.create_task(drip())
        started = time.monotonic()
        try:
            assert await closed_within(reader, 5) == b""
        finally:
            dripping.cancel()
            writer.close()
        assert time.monotonic() - started < 3
        async with aiohttp.ClientSession() as http, http.get(server.url + "/healthz") as resp:
            assert resp.status == 200  # a client that sends its request in time is served
    finally:
        assert await server.terminate() == 0


async def test_connections_past_the_cap_are_refused_while_a_client_is_served(
    tmp_path: Path, fake_anthropic: Any
) -> None:
    async with serving(tmp_path, fake_anthropic, max_connections=8, header_timeout_seconds=30.0) as gateway:
        headers = {"Authorization": f"Bearer {gateway.token}"}
        async with aiohttp.ClientSession() as http, http.ws_connect(gateway.ws_url, headers=headers) as ws:
            idle = [await asyncio.open_connection(*host_port(gateway)) for _ in range(7)]  # 8 open with the WebSocket
            await asyncio.sleep(0.3)
            extra = [await asyncio.open_connection(*host_port(gateway)) for _ in range(5)]
            for reader, _ in extra:
                answer = await closed_within(reader, 5)
                assert answer.startswith(b"HTTP/1.1 503") and b"UNAVAILABLE" in answer
            await ws.send_json({"type": "session.list", "id": "l"})  # the authenticated client is still served
            assert (await ws.receive_json(timeout=10))["type"] == "session.list.result"
            for _, writer in idle + extra:
                writer.close()
            await asyncio.sleep(0.3)
            async with http.get(gateway.url + "/healthz") as resp:  # room again once they are gone
                assert resp.status == 200
        await gateway.wait_for_log("max_connections")


async def test_pings_do_not_keep_an_unauthenticated_websocket_open(tmp_path: Path, fake_anthropic: Any) -> None:
    async with serving(tmp_path, fake_anthropic, auth_timeout_seconds=1.0) as gateway:
        async with aiohttp.ClientSession() as http, http.ws_connect(gateway.ws_url) as ws:
            started = time.monotonic()
            frames: list[Any] = []

            async def read() -> None:
                while (msg := await ws.receive()).type not in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR):
                    frames.append(msg.json())

            reading = asyncio.create_task(read())
            while not reading.done() and time.monotonic() - started < 6:
                await ws.ping()
                await asyncio.sleep(0.1)
            assert reading.done(), "pings kept the unauthenticated socket open"
            assert time.monotonic() - started < 3
            assert [f["code"] for f in frames] == ["UNAUTHORIZED"] and ws.close_code == 4401


async def test_a_silent_unauthenticated_websocket_is_closed_at_the_auth_deadline(
    tmp_path: Path, fake_anthropic: Any
) -> None:
    async with serving(tmp_path, fake_anthropic, auth_timeout_seconds=1.0) as gateway:
        reader, writer = await websocket_upgrade(gateway)
        started = time.monotonic()
        try:
            answer = await closed_within(reader, 5)  # it never answers, not even our close frame
        finally:
            writer.close()
        assert time.monotonic() - started < 3
        assert b"UNAUTHORIZED" in answer and answer.endswith(b"unauthorized")  # the error frame, then close 4401


async def test_large_frame_before_auth_is_refused_before_it_is_buffered(tmp_path: Path, fake_anthropic: Any) -> None:
    async with serving(tmp_path, fake_anthropic, auth_timeout_seconds=30.0) as gateway:
        reader, writer = await websocket_upgrade(gateway)
        mask = os.urandom(4)
        # A masked text frame announcing 1 MB, of which 200 KB are sent: the server must not wait for (and keep)
        # the rest until the auth deadline, but close at once with 1009.
        writer.write(struct.pack("!BBQ", 0x81, 0x80 | 127, 1 << 20) + mask + bytes(200_000))
        try:
            answer = await closed_within(reader, 5)
        finally:
            writer.close()
        assert answer in (b"", struct.pack("!BBH", 0x88, 2, 1009)), answer  # the close frame, unless a reset beat it
        await gateway.wait_for_log("bytes received before authentication")
        # An authenticated client still sends large frames.
        async with aiohttp.ClientSession() as http, http.ws_connect(gateway.ws_url) as ws:
            await ws.send_json({"type": "auth", "id": "a", "token": gateway.token})
            assert (await ws.receive_json(timeout=10))["type"] == "auth.ok"
            await ws.send_json({"type": "session.list", "id": "l", "padding": "x" * 200_000})
            assert (await ws.receive_json(timeout=10))["type"] == "session.list.result"


async def test_failed_auth_floods_from_127_8_are_limited_but_never_lock_the_owner_out(
    tmp_path: Path, fake_anthropic: Any
) -> None:
    async with serving(tmp_path, fake_anthropic) as gateway:
        url = gateway.url + "/api/sessions"
        owner = {"Authorization": f"Bearer {gateway.token}"}

        async def get(source: str, token: str) -> int:
            connector = aiohttp.TCPConnector(local_addr=(source, 0))
            async with aiohttp.ClientSession(connector=connector) as http:
                async with http.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
                    return resp.status

        # A local process fails on purpose from the owner's own address...
        assert {await get("127.0.0.1", f"guess-{i}") for i in range(20)} <= {401, 429}
        assert await get("127.0.0.1", gateway.token) == 200  # ...and the owner gets in at once.

        # 1000 guesses spread over 127.0.0.2-127.0.0.251, four from each address: all count as one source.
        statuses: list[int] = []
        for batch in range(4):
            statuses += await asyncio.gather(*(get(f"127.0.0.{2 + i}", f"guess-{batch}-{i}") for i in range(250)))
        assert len(statuses) == 1000 and statuses.count(429) >= 990
        for source in ("127.0.0.2", "127.0.0.99", "127.0.0.250", "127.1.2.3"):
            assert await get(source, "one-more-guess") == 429
        async with aiohttp.ClientSession() as http, http.get(url, headers=owner) as resp:
            assert resp.status == 200
        assert await get("127.0.0.77", gateway.token) == 200
        async with aiohttp.ClientSession() as http, http.ws_connect(gateway.ws_url) as ws:
            await ws.send_json({"type": "auth", "id": "a", "token": gateway.token})
            assert (await ws.receive_json(timeout=10))["type"] == "auth.ok"
