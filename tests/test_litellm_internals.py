"""What ``agentspace.providers.litellm_internals`` reads from litellm beyond its public API, checked against
the installed litellm streaming from the fake OpenAI upstream over real HTTP. A failure here means a litellm
upgrade renamed or changed one of those internals: adapt ``litellm_internals.py`` (the only module reading
them) before upgrading."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest

from agentspace.providers.litellm_internals import (
    CLEAN_EOF,
    provider_finished,
    provider_sent_usage,
    response_headers,
    unwrap_stream_failure,
)
from tests.fakes.openai_upstream import FakeOpenAI, error_status, text_response

KEY = "sk-test-0123456789abcdef"


async def _stream(fake: FakeOpenAI) -> Any:
    litellm = importlib.import_module("litellm")
    return await litellm.acompletion(
        model="openai/gpt-4o-mini",
        messages=[{"role": "user", "content": "Hi"}],
        api_base=fake.url,
        api_key=KEY,
        stream=True,
        stream_options={"include_usage": True},
        num_retries=0,
        max_retries=0,
    )


async def _drain(response: Any) -> None:
    async for _ in response:
        pass


async def test_stream_wrapper_keeps_finish_reason_and_raw_chunks(fake_openai: FakeOpenAI) -> None:
    fake_openai.enqueue(text_response("Hello there"))
    response = await _stream(fake_openai)
    await _drain(response)
    # The attributes provider_finished and provider_sent_usage read (they fall back to True without them).
    assert response.received_finish_reason == "stop"
    assert hasattr(response, "intermittent_finish_reason")
    assert isinstance(response.chunks, list) and any(getattr(c, "usage", None) is not None for c in response.chunks)
    assert provider_finished(response) and provider_sent_usage(response)


async def test_raw_chunks_show_a_stream_without_usage(fake_openai: FakeOpenAI) -> None:
    fake_openai.enqueue(text_response("Hello there").without_usage())
    response = await _stream(fake_openai)
    await _drain(response)
    assert isinstance(response.chunks, list)
    assert not provider_sent_usage(response)


async def test_clean_end_without_finish_reason_says_so(fake_openai: FakeOpenAI) -> None:
    fake_openai.enqueue(text_response("Hello there").cut_after(3, abort=False))
    response = await _stream(fake_openai)
    with pytest.raises(Exception) as caught:
        await _drain(response)
    error, _ = unwrap_stream_failure(caught.value)
    assert CLEAN_EOF in str(error)
    source = Path(importlib.import_module("litellm").__file__ or "").parent
    assert any(
        CLEAN_EOF in p.read_text(encoding="utf-8", errors="replace") for p in source.rglob("streaming_handler.py")
    )


async def test_broken_stream_arrives_wrapped(fake_openai: FakeOpenAI) -> None:
    from litellm.exceptions import MidStreamFallbackError

    fake_openai.enqueue(text_response("Hello there, friend", chunks=3).cut_after(3))
    response = await _stream(fake_openai)
    with pytest.raises(MidStreamFallbackError) as caught:
        await _drain(response)
    assert caught.value.original_exception is not None and caught.value.is_pre_first_chunk is False
    error, broke_off = unwrap_stream_failure(caught.value)
    assert error is caught.value.original_exception and broke_off


async def test_error_keeps_the_upstream_headers(fake_openai: FakeOpenAI) -> None:
    fake_openai.enqueue(error_status(429, retry_after=7))
    with pytest.raises(Exception) as caught:
        await _stream(fake_openai)
    assert caught.value.litellm_response_headers["retry-after"] == "7"  # type: ignore[attr-defined]
    headers = response_headers(caught.value)
    assert headers is not None and headers["retry-after"] == "7"
