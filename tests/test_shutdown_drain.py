"""Shutdown seen from outside: a real ``agentspace serve`` gets SIGTERM while a ``/v1/messages`` stream is in
flight. Until that stream has finished (and been recorded), every new call -- on a new connection, through
the stock SDKs -- is refused with SERVICE_UNAVAILABLE in its own API's shape, and ``/healthz`` says the
replica is draining; then the listener closes and the process exits."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import anthropic
import openai
import pytest

from agentspace.storage.embedded.usage import UsageStore
from scripts import harness
from scripts.harness import GatewayProcess
from tests.conftest import wait_until
from tests.fakes import anthropic_upstream as fa
from tests.fakes import openai_upstream as fo
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.openai_upstream import FakeOpenAI

MODEL = "claude-sonnet-4-5"
LONG = "slow " * 60  # 60 deltas, 0.1 s apart: the stream in flight while the server drains


async def test_new_calls_are_refused_in_each_apis_shape_while_a_v1_stream_finishes(
    tmp_path: Path, fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.enqueue(fa.text_response(LONG, chunks=60, delta_usages=[{"output_tokens": 60}]).with_delay(0.1))
    server = GatewayProcess(tmp_path / "data", fake_anthropic.url, server={"shutdown_grace_seconds": 30.0})
    try:
        await server.start()
        token = server.token
        claude = anthropic.AsyncAnthropic(api_key=token, base_url=server.url, max_retries=0)
        gpt = openai.AsyncOpenAI(api_key=token, base_url=server.url + "/v1", max_retries=0)
        messages = [{"role": "user", "content": "Hi"}]
        async with claude.messages.stream(model=MODEL, max_tokens=256, messages=messages) as running:  # type: ignore[arg-type]
            stream = aiter(running.text_stream)
            assert await anext(stream) == "slow "
            assert server.process is not None
            server.process.send_signal(signal.SIGTERM)
            await server.wait_for_log("running stream(s)")  # draining

            anthropic_calls = {
                "messages": claude.messages.create(model=MODEL, max_tokens=16, messages=messages),  # type: ignore[arg-type]
                "count_tokens": claude.messages.count_tokens(model=MODEL, messages=messages),  # type: ignore[arg-type]
            }
            for name, call in anthropic_calls.items():
                with pytest.raises(anthropic.InternalServerError) as refused:
                    await call
                assert refused.value.status_code == 503, name
                assert refused.value.body["error"]["type"] == "overloaded_error", name  # type: ignore[index]
                assert "shutting down" in refused.value.message, name
            openai_calls = {
                "chat": gpt.chat.completions.create(model="anthropic/" + MODEL, messages=messages),  # type: ignore[arg-type]
                "responses": gpt.responses.create(model="anthropic/" + MODEL, input="Hi"),
                "embeddings": gpt.embeddings.create(model="openai/text-embedding-3-small", input="Hi"),
            }
            for name, call in openai_calls.items():
                with pytest.raises(openai.InternalServerError) as failed:
                    await call
                assert failed.value.status_code == 503, name
                assert failed.value.type == "server_error" and "shutting down" in failed.value.message, name

            headers = {"Authorization": f"Bearer {token}"}
            async with aiohttp.ClientSession() as http:
                async with http.get(server.url + "/healthz") as health:
                    assert (health.status, await health.json()) == (503, {"status": "shutting down"})
                chat = {
                    "id": "late",
                    "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}],
                }
                async with http.post(server.url + "/api/chat", json=chat, headers=headers) as late:
                    body = await late.json()
                    assert late.status == 503 and body["error"]["code"] == "SERVICE_UNAVAILABLE", body
                ws = await http.ws_connect(server.ws_url, headers=headers)
                await ws.send_json({"type": "chat.send", "id": "late", "content": "too late"})
                frame = await ws.receive_json(timeout=30)
                assert (frame["type"], frame["code"]) == ("error", "SERVICE_UNAVAILABLE"), frame
                await ws.close()

            rest = [delta async for delta in stream]  # the stream in flight goes on to its end
            final = await running.get_final_message()
        assert "slow " + "".join(rest) == LONG and final.stop_reason == "end_turn"
        assert await asyncio.wait_for(server.process.wait(), 60) == 0
    finally:
        await server.aclose()
    assert server.log_problems() == []
    assert len(fake_anthropic.requests) == 1 and fake_anthropic.count_requests == []  # nothing else went upstream
    (record,) = UsageStore(server.data_dir).records_sync()
    assert (record["endpoint"], record["finishReason"], record["outputTokens"]) == ("anthropic", "stop", 60)


async def test_v1_streams_stopped_by_the_shutdown_end_as_their_api_ends_a_failed_stream(
    tmp_path: Path, fake_anthropic: FakeAnthropic
) -> None:
    """A /v1 stream still running when the grace ends is stopped, and its client still reads the end its API
    gives a failed stream (Chat Completions' error chunk, Responses' response.failed, Messages' error event),
    not a body that breaks off."""
    slow = "slow " * 400  # 40 s: far past the grace
    for _ in range(3):
        fake_anthropic.enqueue(fa.text_response(slow, chunks=400).with_delay(0.1))
    server = GatewayProcess(tmp_path / "data", fake_anthropic.url, server={"shutdown_grace_seconds": 1.0})
    try:
        await server.start()
        claude = anthropic.AsyncAnthropic(api_key=server.token, base_url=server.url, max_retries=0)
        gpt = openai.AsyncOpenAI(api_key=server.token, base_url=server.url + "/v1", max_retries=0)
        messages = [{"role": "user", "content": "Hi"}]
        chat = aiter(
            await gpt.chat.completions.create(model="anthropic/" + MODEL, messages=messages, stream=True)  # type: ignore[arg-type]
        )
        responses = aiter(await gpt.responses.create(model="anthropic/" + MODEL, input="Hi", stream=True))
        relayed = aiter(await claude.messages.create(model=MODEL, max_tokens=4096, messages=messages, stream=True))  # type: ignore[arg-type]
        # each has begun streaming text
        while not (await anext(chat)).choices[0].delta.content:
            pass
        while (await anext(responses)).type != "response.output_text.delta":
            pass
        while (await anext(relayed)).type != "content_block_delta":
            pass
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)

        with pytest.raises(openai.APIError) as chat_error:
            async for _ in chat:
                pass
        assert "shutting down" in chat_error.value.message
        events = [event async for event in responses]
        assert events[-1].type == "response.failed", events[-3:]
        assert "shutting down" in events[-1].response.error.message  # type: ignore[union-attr]
        with pytest.raises(anthropic.APIStatusError) as relayed_error:
            async for _ in relayed:
                pass
        assert relayed_error.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
        assert "shutting down" in relayed_error.value.message
        assert await asyncio.wait_for(server.process.wait(), 60) == 0
    finally:
        await server.aclose()
    assert server.log_problems() == []
    records = list(UsageStore(server.data_dir).records_sync())
    assert sorted(r["endpoint"] for r in records) == ["anthropic", "openai", "responses"]
    assert {r["finishReason"] for r in records} == {"aborted"}, records


async def test_a_whole_embeddings_call_stopped_by_the_shutdown_is_answered_as_a_whole_chat_call_is(
    tmp_path: Path, fake_anthropic: FakeAnthropic, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A non-streamed /v1/embeddings call still running when the grace ends is stopped, recorded once (the
    upstream has it and bills its input), and its client gets the 503 a non-streamed chat call gets then, in
    OpenAI's shape: its connection dropped."""
    child_env = harness.child_env
    monkeypatch.setattr(harness, "child_env", lambda *a: {**child_env(*a), "OPENAI_API_KEY": "sk-openai-test-0123"})
    fake_anthropic.enqueue(fa.text_response("late").silent_for(60))
    fake_openai.enqueue(fo.text_response().with_delay(60))
    sections = {"providers.openai": {"base_url": fake_openai.url}, "server": {"shutdown_grace_seconds": 1.0}}
    server = GatewayProcess(tmp_path / "data", fake_anthropic.url, **sections)
    try:
        await server.start()
        gpt = openai.AsyncOpenAI(api_key=server.token, base_url=server.url + "/v1", max_retries=0)
        messages = [{"role": "user", "content": "Hi"}]
        chat = asyncio.ensure_future(gpt.chat.completions.create(model="anthropic/" + MODEL, messages=messages))  # type: ignore[arg-type]
        embedding = asyncio.ensure_future(gpt.embeddings.create(model="openai/text-embedding-3-small", input="x y z"))

        async def both_sent() -> bool:
            return bool(fake_anthropic.requests and fake_openai.requests)

        await wait_until(both_sent, timeout=30)
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        answers = {}
        for name, call in {"chat": chat, "embeddings": embedding}.items():
            with pytest.raises(openai.InternalServerError) as stopped:
                await call
            response = stopped.value.response
            answers[name] = (response.status_code, response.headers.get("retry-after"), response.json()["error"])
        assert answers["embeddings"] == answers["chat"], answers
        status, _, error = answers["embeddings"]
        assert status == 503 and "shutting down" in error["message"]
        assert await server.process.wait() == 0
    finally:
        await server.aclose()
    records = UsageStore(server.data_dir).records_sync()
    (record,) = [r for r in records if r["endpoint"] == "embeddings"]
    assert record["inputTokens"] > 0 and record["answered"] is True and record["recovered"] is not True, record
