"""The pass-through's local count of the output it relayed (protocols/anthropic_messages.UsageScanner): what the
ledger notes as the stream goes on, so that a killed server's call is posted with the output it relayed."""

from __future__ import annotations

import json

from agentspace.protocols.anthropic_messages import UsageScanner


def deltas(start: int, n: int) -> list[tuple[str | None, str]]:
    return [
        (
            "content_block_delta",
            json.dumps({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": f"w{i} "}}),
        )
        for i in range(start, start + n)
    ]


def test_the_output_counted_as_the_stream_goes_on_follows_the_whole_count() -> None:
    scanner = UsageScanner()
    noted = []
    for start in range(0, 2000, 50):
        scanner.feed(deltas(start, 50))
        noted.append(scanner.output_tokens_so_far())
    whole = scanner.received_output_tokens()
    assert noted == sorted(noted) and noted[0] > 0
    # Counted piecemeal, a token may split where two counts meet: never below the whole count, barely above.
    assert whole <= noted[-1] <= whole * 1.02, (noted[-1], whole)
    assert scanner.output_tokens_so_far() == noted[-1]  # nothing new: the same count


def test_a_delta_that_is_not_json_counts_nothing_and_stops_nothing() -> None:
    scanner = UsageScanner()
    scanner.feed([("content_block_delta", "{not json")])
    scanner.feed(deltas(0, 3))
    assert scanner.output_tokens_so_far() == scanner.received_output_tokens() > 0
