"""benchmarks/vs_litellm.py's own checks, without LiteLLM: its wire-format clients accept only a whole answer
(a truncated stream is a failed chat, never a fast one), and a side with failed chats fails the goals."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fakes import anthropic_upstream, openai_upstream

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench  # noqa: E402
import vs_litellm  # noqa: E402

ANSWER = bench.EXPECTED_TEXT  # "tok " fifty times, as the benchmark's fake upstream answers


async def test_messages_client_counts_the_deltas_and_refuses_a_truncated_stream() -> None:
    whole = anthropic_upstream.text_response(ANSWER, chunks=bench.DELTAS)
    async with anthropic_upstream.started_fake_anthropic(whole) as fake, aiohttp.ClientSession() as http:
        url = f"{fake.url}/v1/messages"
        sample = await vs_litellm.messages_chat(http, url, bench.DIRECT_HEADERS, vs_litellm.PROXY_MODEL)
        assert sample.deltas == bench.DELTAS and 0 < sample.ttft <= sample.total
        fake.enqueue(whole.cut_after(20, abort=False))  # the body ends cleanly, without message_stop
        with pytest.raises(bench.ChatFailed, match="incomplete answer"):
            await vs_litellm.messages_chat(http, url, bench.DIRECT_HEADERS, vs_litellm.PROXY_MODEL)
        fake.enqueue(anthropic_upstream.text_response(ANSWER[:-4], chunks=bench.DELTAS - 1))  # one delta short
        with pytest.raises(bench.ChatFailed, match="incomplete answer"):
            await vs_litellm.messages_chat(http, url, bench.DIRECT_HEADERS, vs_litellm.PROXY_MODEL)
        fake.enqueue(anthropic_upstream.error_status(529, "Overloaded"))
        with pytest.raises(bench.ChatFailed, match="HTTP 529"):
            await vs_litellm.messages_chat(http, url, bench.DIRECT_HEADERS, vs_litellm.PROXY_MODEL)


async def test_completions_client_counts_the_deltas_and_refuses_a_truncated_stream() -> None:
    whole = openai_upstream.text_response(ANSWER, chunks=bench.DELTAS)
    async with openai_upstream.started_fake_openai(whole) as fake, aiohttp.ClientSession() as http:
        url = f"{fake.url}/chat/completions"
        headers = {"Authorization": "Bearer sk-bench"}
        sample = await vs_litellm.completions_chat(http, url, headers, "gpt-4o")
        assert sample.deltas == bench.DELTAS
        fake.enqueue(whole.cut_after(10, abort=False))  # no [DONE]
        with pytest.raises(bench.ChatFailed, match="incomplete answer"):
            await vs_litellm.completions_chat(http, url, headers, "gpt-4o")


async def test_responses_client_reads_the_gateway_stream_and_refuses_a_failed_one(
    make_client: Any, fake_anthropic: anthropic_upstream.FakeAnthropic, token: str
) -> None:
    whole = anthropic_upstream.text_response(ANSWER, chunks=bench.DELTAS)
    fake_anthropic.enqueue(whole, whole.cut_after(20, abort=False))
    client = await make_client()
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{client.port}/v1/responses"
        headers = {"Authorization": f"Bearer {token}"}
        sample = await vs_litellm.responses_chat(http, url, headers, bench.MODEL)
        assert sample.deltas == bench.DELTAS and 0 < sample.ttft <= sample.total
        with pytest.raises(bench.ChatFailed, match="response.failed"):
            await vs_litellm.responses_chat(http, url, headers, bench.MODEL)


def _side(
    name: str, server: str, ttft: float, cpu_ms: float, errors: int = 0, versus: str | None = None
) -> vs_litellm.Side:
    async def unused() -> vs_litellm.Chat:
        raise AssertionError

    side = vs_litellm.Side(name, server, unused, versus=versus)
    side.samples = [bench.Sample(ttft, ttft + 0.01, bench.DELTAS)] * 10
    side.cpu_seconds = cpu_ms * 10 / 1000
    side.wall_seconds = 10 * (ttft + 0.01)  # one client: the chats one after the other
    side.errors = errors
    return side


@pytest.mark.parametrize("litellm_errors", [0, 1])
def test_ratios_and_goals(litellm_errors: int) -> None:
    sides = [
        _side("direct", "upstream", 0.001, 0),
        _side("litellm /v1/chat/completions", "litellm", 0.021, 40, errors=litellm_errors),
        _side("agentspace ws", "agentspace", 0.003, 5, versus="litellm /v1/chat/completions"),
    ]
    results: dict[str, object] = {}
    vs_litellm.summarize(sides, results)
    [comparison] = results["comparisons"]  # type: ignore[misc]
    assert comparison["ratios"]["addedTtftP50"] == pytest.approx(10.0)  # (21 - 1) / (3 - 1) ms
    assert comparison["ratios"]["cpuMsPerChat"] == pytest.approx(8.0)
    assert comparison["ratios"]["chatsPerSecond"] == pytest.approx(0.031 / 0.013)  # ours over theirs
    assert results["sides"][2]["chatsPerSecond"] == pytest.approx(1 / 0.013)  # type: ignore[index]
    met = not litellm_errors  # a side with failed chats fails the goals, however fast its chats were
    assert (comparison["ttftGoalMet"], comparison["cpuGoalMet"], comparison["failedChats"]) == (met, met, not met)
