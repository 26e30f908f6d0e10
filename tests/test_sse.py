"""The providers' SSE decoder against the event-stream format: line endings, chunking, comments, multi-line data."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agentspace.providers.sse import SSEDecoder

BODY = (
    b'event: message_start\ndata: {"type":"message_start"}\n\n'
    b": a comment line\n\n"
    b"event: multi\ndata: one\ndata:two\ndata\n\n"
    b"data: no name\n\n"
    b"event: no-data\n\n"
    b"id: 7\nretry: 100\nevent: with-id\ndata: x\n\n\n\n"
    b"event: unicode\ndata: caf\xc3\xa9 \xe2\x9c\x93\n\n"
)
EXPECTED = [
    ("message_start", '{"type":"message_start"}'),
    ("multi", "one\ntwo\n"),
    (None, "no name"),
    ("with-id", "x"),
    ("unicode", "café ✓"),
]


def decode(chunks: list[bytes]) -> list[tuple[str | None, str]]:
    decoder = SSEDecoder()
    events = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    return events + decoder.close()


def split(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(body) + 1) for c in cuts})
    return [body[a:b] for a, b in zip([0, *points], [*points, len(body)])]


def test_one_chunk() -> None:
    assert decode([BODY]) == EXPECTED


def test_byte_by_byte() -> None:
    assert decode([BODY[i : i + 1] for i in range(len(BODY))]) == EXPECTED


@given(st.sampled_from([b"\n", b"\r\n", b"\r"]), st.lists(st.integers(min_value=0), max_size=40))
def test_any_line_ending_and_any_chunking(newline: bytes, cuts: list[int]) -> None:
    body = BODY.replace(b"\n", newline)
    assert decode(split(body, cuts)) == EXPECTED


def test_an_unterminated_event_is_dropped_at_the_end() -> None:
    assert decode([b"event: a\ndata: 1\n\nevent: b\ndata: 2\n"]) == [("a", "1")]


def test_a_final_cr_still_ends_the_event() -> None:
    assert decode([b"event: a\rdata: 1\r", b"\r"]) == [("a", "1")]
