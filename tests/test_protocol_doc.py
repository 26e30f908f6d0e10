"""docs/protocol.md names everything a client can meet: every WebSocket frame type the server handles or
sends, every UI message stream chunk, every close code, and every error code with its HTTP status."""

from __future__ import annotations

import inspect
import re
import typing
from pathlib import Path

from aiohttp import WSCloseCode

from agentspace import events as ev
from agentspace.errors import HTTP_STATUS
from agentspace.transports import ui_stream, ws
from agentspace.transports.rest import HTTP_ERROR_CODES
from agentspace.types import Cost, TokenUsage

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")


def named(name: str) -> bool:
    return f"`{name}" in DOC  # as code: `chat.send` or `chat.send {fields}`


def source_types(source: str) -> set[str]:
    """The ``type`` of every frame or chunk written out literally (in a dict or a hand-built string)."""
    return set(re.findall(r'"type"\s*:\s*"([\w.-]+)"', source))


def test_every_websocket_frame_type_is_named() -> None:
    handled = set(ws.Connection.HANDLERS)
    sent = source_types(inspect.getsource(ws))
    assert {"chat.send", "chat.abort", "auth"} <= handled
    assert {"auth.ok", "error", "chat.stream.start", "chat.stream.delta", "chat.stream.end"} <= sent
    missing = sorted(t for t in handled | sent if not named(t))
    assert not missing, f"docs/protocol.md does not name these frame types: {missing}"


def test_every_ui_message_stream_chunk_is_named() -> None:
    usage, cost = TokenUsage(input_tokens=3, output_tokens=2), Cost(input_cost=0.1, output_cost=0.2)
    turn: list[ev.StreamEvent] = [
        ev.StreamStart("s1", "m", "msg_1", True),
        ev.StepStart(1),
        ev.ReasoningDelta("thinking"),
        ev.TextDelta("text"),
        ev.SourceEvent("https://example.com", "Example"),
        ev.ToolCallEvent("tc1", "run", {}),
        ev.ToolResultEvent("tc1", "run", "ok", False),
        ev.ToolResultEvent("tc2", "run", "failed", True),
        ev.StepFinish(1, "stop", usage, cost),
        ev.StreamEnd("aborted", usage, cost, aborted=True),
        ev.StreamError("LLM_ERROR", "failed"),
    ]
    assert {type(e) for e in turn} == set(typing.get_args(ev.StreamEvent))  # every event the pipeline emits
    encoder = ui_stream.UIMessageStreamEncoder()
    chunks = {chunk["type"] for event in turn for chunk in encoder.chunks(event)}
    # The chunks written literally are among those the events made, so this covers them all.
    assert source_types(inspect.getsource(ui_stream.UIMessageStreamEncoder)) <= chunks
    assert {"text-start", "text-delta", "text-end", "reasoning-end"} <= chunks
    missing = sorted(t for t in chunks if not named(t))
    assert not missing, f"docs/protocol.md does not name these UI message stream chunks: {missing}"


def test_every_close_code_is_in_the_table() -> None:
    source = (ROOT / "agentspace" / "transports" / "ws.py").read_text(encoding="utf-8")
    codes = {int(c) for c in re.findall(r"close_code: int = (\d+)", source)} | {ws.REVOKED_CLOSE_CODE}
    codes |= {WSCloseCode[name].value for name in re.findall(r"WSCloseCode\.(\w+)", source)}
    codes |= {WSCloseCode.MESSAGE_TOO_BIG.value}  # aiohttp's, past max_msg_size and the pre-auth budget
    assert {4001, 4401, 1001} <= codes
    missing = sorted(code for code in codes if f"\n| {code} |" not in DOC)
    assert not missing, f"docs/protocol.md's close code table lacks: {missing}"


def test_every_error_code_is_in_the_table_with_its_status() -> None:
    statuses = {**HTTP_STATUS, **{code: status for status, code in HTTP_ERROR_CODES.items()}}
    missing = sorted(
        f"{code} ({status})" for code, status in statuses.items() if f"\n| `{code}` | {status} |" not in DOC
    )
    assert not missing, f"docs/protocol.md's error table lacks: {missing}"
    assert "(attachments.md)" in DOC  # the WebSocket attachments are described there
