"""A client of the WebSocket at ``/gateway``: connect, send a frame, read frames up to a chat's end."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient


async def connect(client: TestClient, token: str) -> web.WebSocketResponse:
    return await client.ws_connect("/gateway", headers={"Authorization": f"Bearer {token}"})


async def receive(ws: Any, timeout: float = 30.0) -> dict[str, Any]:
    msg = await ws.receive(timeout=timeout)
    assert msg.type == WSMsgType.TEXT, msg
    return json.loads(msg.data)


async def chat(ws: Any, content: str, request_id: str = "r1", **extra: Any) -> list[dict[str, Any]]:
    """Send chat.send and collect frames up to chat.stream.end or an error."""
    await ws.send_json({"type": "chat.send", "id": request_id, "content": content, **extra})
    frames = []
    while True:
        frame = await receive(ws)
        frames.append(frame)
        if frame["type"] in ("chat.stream.end", "error"):
            return frames


def of(frames: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [f for f in frames if f["type"] == kind]


async def receive_after(ws: Any, frame: dict[str, Any]) -> dict[str, Any]:
    await ws.send_json(frame)
    return await receive(ws)
