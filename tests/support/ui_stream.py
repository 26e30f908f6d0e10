"""A client of ``POST /api/chat``: the AI SDK UI message stream read chunk by chunk, and its protocol check."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

# The fields uiMessageChunkSchema (ai 6, tests/js) defines for each chunk type we send; nothing else may appear.
CHUNK_FIELDS = {
    "start": {"messageId", "messageMetadata"},
    "start-step": set(),
    "text-start": {"id"},
    "text-delta": {"id", "delta"},
    "text-end": {"id"},
    "reasoning-start": {"id"},
    "reasoning-delta": {"id", "delta"},
    "reasoning-end": {"id"},
    "source-url": {"sourceId", "url", "title"},
    "tool-input-available": {"toolCallId", "toolName", "input"},
    "tool-output-available": {"toolCallId", "output"},
    "tool-output-error": {"toolCallId", "errorText"},
    "finish-step": set(),
    "abort": {"reason"},
    "finish": {"finishReason", "messageMetadata"},
    "error": {"errorText"},
}
DONE = "[DONE]"


def user(text: str, id: str = "u1") -> dict[str, Any]:
    return {"id": id, "role": "user", "parts": [{"type": "text", "text": text}]}


def assistant(text: str, id: str = "a1") -> dict[str, Any]:
    return {
        "id": id,
        "role": "assistant",
        "parts": [{"type": "step-start"}, {"type": "text", "text": text, "state": "done"}],
    }


async def post_chat(
    client: TestClient, headers: dict[str, str], chat_id: str = "chat1", *messages: dict[str, Any], **extra: Any
) -> ClientResponse:
    body = {"id": chat_id, "messages": list(messages) or [user("Hi!")], "trigger": "submit-message", **extra}
    return await client.post("/api/chat", json=body, headers=headers)


async def next_chunk(resp: ClientResponse) -> Any:
    """The next SSE data frame: a chunk dict, or DONE."""
    while True:
        line = await asyncio.wait_for(resp.content.readline(), 10)
        assert line, "stream ended without [DONE]"
        text = line.decode().rstrip("\n")
        if text.startswith("data: "):
            data = text[len("data: ") :]
            assert await resp.content.readline() == b"\n"  # frames are data: <json>\n\n
            return DONE if data == DONE else json.loads(data)
        assert text == "", f"unexpected SSE line {text!r}"


async def read_all(resp: ClientResponse) -> list[Any]:
    chunks = []
    while not chunks or chunks[-1] != DONE:
        chunks.append(await next_chunk(resp))
    assert await resp.content.read() == b""  # nothing after [DONE]
    return chunks


def check_protocol(chunks: list[Any]) -> None:
    """Only schema fields; parts started before their deltas and ended after them, at most one open."""
    assert chunks[-1] == DONE and DONE not in chunks[:-1]
    open_part: str | None = None
    seen: set[str] = set()
    for c in chunks[:-1]:
        assert set(c) - {"type"} <= CHUNK_FIELDS[c["type"]], c
        kind = c["type"].rsplit("-", 1)
        if kind[0] in ("text", "reasoning"):
            if kind[1] == "start":
                assert open_part is None and c["id"] not in seen
                open_part = c["id"]
                seen.add(c["id"])
            else:
                assert c["id"] == open_part, c
                if kind[1] == "end":
                    open_part = None
        elif c["type"] in ("tool-input-available", "finish-step", "finish", "error"):
            assert open_part is None, c


def types(chunks: list[Any]) -> list[str]:
    return [c if c == DONE else c["type"] for c in chunks]


def of(chunks: list[Any], kind: str) -> list[dict[str, Any]]:
    return [c for c in chunks if c != DONE and c["type"] == kind]
