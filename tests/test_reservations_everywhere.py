"""Reservations on every way in (docs/accounting.md), from outside: concurrent calls against a nearly spent budget
spend at most the budget when each call reserves the most it can cost -- prompt-cache writes priced at their
dearer rate, and a call that may fall back to a dearer model reserved at that model's prices."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import zlib
from typing import Any

import anthropic
import openai
import pytest
from aiohttp.test_utils import TestClient

from tests.fakes import anthropic_upstream as fa
from tests.fakes import openai_upstream as fo
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.openai_upstream import FakeOpenAI
from tests.support.ws import chat, of
from tests.test_clients import add_client, anthropic_sdk, bearer, cli, openai_sdk, records, ws_chat

MODEL = "claude-sonnet-4-5"
CALLS = 30
PROMPT = "word " * 50_000  # about 50k tokens
# What the upstream reports for it when the whole prompt is written to a 1-hour cache (Sonnet: $6 per million,
# twice the $3 of plain input).
HOUR_WRITE = {
    "input_tokens": 10,
    "cache_creation_input_tokens": 50_000,
    "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 50_000},
}


async def spend(client: TestClient, name: str) -> tuple[int, float]:
    mine = [r for r in await records(client) if r["client"] == name]
    return sum(1 for r in mine if r["answered"]), sum(r["totalCost"] for r in mine)


async def test_prompt_cache_writes_are_reserved_at_their_price_on_the_relay_and_the_websocket(
    make_client: Any, fake_anthropic: FakeAnthropic
) -> None:
    """A prompt marked for the 1-hour cache is billed at twice the input rate as it is written: the pass-through
    (the client's own ``cache_control``) and a chat turn (the gateway's breakpoints at ``[chat] prompt_cache_ttl``)
    reserve its input at that rate, so 30 calls at once stay within the budget."""
    client = await make_client(chat={"prompt_cache_ttl": "1h"})
    fake_anthropic.default = fa.text_response(usage=HOUR_WRITE, delta_usages=[{"output_tokens": 10}]).with_delay(0.2)
    key = add_client("alice", "--budget", "1")
    system = [{"type": "text", "text": PROMPT, "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    api = anthropic_sdk(client, key)
    results = await asyncio.gather(
        *(
            api.messages.create(
                model=MODEL,
                max_tokens=64,
                system=system,  # type: ignore[arg-type]
                messages=[{"role": "user", "content": "Summarize."}],
            )
            for _ in range(CALLS)
        ),
        return_exceptions=True,
    )
    assert all(isinstance(r, anthropic.RateLimitError) for r in results if isinstance(r, BaseException)), results
    answered, spent = await spend(client, "alice")
    assert answered == 3 and 0.9 < spent <= 1.0, (answered, spent)

    # A chat turn: 12096 output tokens (thinking) and the prompt written to the 1-hour cache, about $0.48.
    fake_anthropic.default = fa.text_response(usage=HOUR_WRITE, delta_usages=[{"output_tokens": 12_000}]).with_delay(
        0.2
    )
    key = add_client("bob", "--budget", "1")
    frames = await asyncio.gather(*(ws_chat(client, key, PROMPT) for _ in range(CALLS // 3)))
    assert all(f[-1]["code"] == "BUDGET_EXCEEDED" for f in frames if not of(f, "chat.stream.end"))
    turn = fake_anthropic.requests[-1].body
    assert turn["messages"][-1]["content"][-1]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    answered, spent = await spend(client, "bob")
    assert answered == 2 and 0.9 < spent <= 1.0, (answered, spent)


async def test_a_fallback_to_a_dearer_model_is_reserved_at_its_prices(
    make_client: Any, fake_anthropic: FakeAnthropic
) -> None:
    """Haiku overloaded, its turns and /v1 calls go on to Opus 4.5 (five times the price): a chat turn and a /v1
    call fall back along ``[models] fallbacks``, a model group along its ``fallbacks``. Each call reserves at the dearest
    model it may end up on, so 30 of them at once stay within the budget."""
    haiku, opus = "anthropic/claude-haiku-4-5", "anthropic/claude-opus-4-5"
    client = await make_client(
        models={
            "default": haiku,
            "fallbacks": {haiku: [opus]},
            "groups": {"cheap": {"deployments": [{"model": haiku}], "fallbacks": [opus]}},
        },
        thinking={"enabled": False},
        chat={"max_retries": 0},
    )
    overloaded = fa.error_status(529, "Overloaded")
    answer = fa.text_response(usage={"input_tokens": 20}, delta_usages=[{"output_tokens": 4000}]).with_delay(0.2)

    def next_response() -> fa.FakeResponse:  # Opus answers with 4000 tokens ($0.10); Haiku is overloaded
        return overloaded if fake_anthropic.requests[-1].body["model"].startswith("claude-haiku") else answer

    fake_anthropic.next_response = next_response  # type: ignore[method-assign]
    key = add_client("alice", "--budget", "0.35")
    frames = await asyncio.gather(*(ws_chat(client, key, "Hi") for _ in range(CALLS // 2)))
    assert all(f[-1]["code"] == "BUDGET_EXCEEDED" for f in frames if not of(f, "chat.stream.end"))
    answered, spent = await spend(client, "alice")
    assert answered == 3 and 0.3 < spent <= 0.35, (answered, spent)

    key = add_client("bob", "--budget", "0.35")
    api = openai_sdk(client, key)
    results = await asyncio.gather(
        *(
            api.chat.completions.create(model="cheap", max_tokens=4096, messages=[{"role": "user", "content": "Hi"}])
            for _ in range(CALLS // 2)
        ),
        return_exceptions=True,
    )
    assert all(isinstance(r, openai.RateLimitError) for r in results if isinstance(r, BaseException)), results
    answered, spent = await spend(client, "bob")
    assert answered == 3 and 0.3 < spent <= 0.35, (answered, spent)

    # /v1 on Haiku itself goes along its ``[models] fallbacks`` too: reserved at Opus's prices alike.
    key = add_client("dave", "--budget", "0.35")
    api = openai_sdk(client, key)
    results = await asyncio.gather(
        *(
            api.chat.completions.create(model=haiku, max_tokens=4096, messages=[{"role": "user", "content": "Hi"}])
            for _ in range(CALLS // 2)
        ),
        return_exceptions=True,
    )
    assert all(isinstance(r, openai.RateLimitError) for r in results if isinstance(r, BaseException)), results
    answered, spent = await spend(client, "dave")
    assert answered == 3 and 0.3 < spent <= 0.35, (answered, spent)

    # A client that may use Haiku only never falls back to Opus: its calls are reserved at Haiku's prices.
    key = add_client("carol", "--budget", "0.03", "--models", haiku)
    sent = len(fake_anthropic.requests)
    frames = await ws_chat(client, key, "Hi")
    assert frames[-1]["code"] == "LLM_ERROR", frames[-1]  # Haiku was tried (and overloaded), not refused
    assert [r.body["model"] for r in fake_anthropic.requests[sent:]] == ["claude-haiku-4-5"]


async def test_an_openai_reasoning_model_reserves_the_max_tokens_it_is_sent(
    make_client: Any, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A litellm model (OpenAI's gpt-5, against the fake OpenAI upstream): ``reasoning_effort: "high"`` with
    ``max_completion_tokens: 1000`` goes upstream as it is -- the reasoning is part of those 1000 tokens -- so it
    reserves 1000 output tokens ($0.01), not Anthropic's 16000-token thinking budget on top ($0.17): 4 calls of
    30 fit $0.05, and they spend at most that."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")
    client = await make_client(providers={"openai": {"base_url": fake_openai.url}})
    fake_openai.default = fo.text_response("42", usage=fo.usage(20, 1000, reasoning=900)).with_delay(0.2)
    key = add_client("alice", "--budget", "0.05")
    api = openai_sdk(client, key)
    messages: Any = [{"role": "user", "content": "Think hard."}]
    results = await asyncio.gather(
        *(
            api.chat.completions.create(
                model="openai/gpt-5", messages=messages, max_completion_tokens=1000, reasoning_effort="high"
            )
            for _ in range(CALLS // 2)
        ),
        *(
            api.responses.create(
                model="openai/gpt-5", input="Think hard.", max_output_tokens=1000, reasoning={"effort": "high"}
            )
            for _ in range(CALLS // 2)
        ),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(r, openai.RateLimitError) for r in refused), refused
    assert {(r.body["max_completion_tokens"], r.body["reasoning_effort"]) for r in fake_openai.requests} == {
        (1000, "high")
    }
    answered, spent = await spend(client, "alice")
    assert answered == 4 and 0.04 < spent <= 0.05, (answered, spent)
    assert "may cost up to $0.01" in str(refused[-1]), refused[-1]


async def test_a_call_asking_for_the_priority_tier_reserves_at_its_rates(
    make_client: Any, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``service_tier: "priority"`` is billed at OpenAI's priority rates (gpt-5: $20 per million output tokens,
    twice the standard $10), and the record is priced so: the reservation is too, so 30 concurrent calls against
    $0.05 spend at most one call's reservation more."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")
    client = await make_client(providers={"openai": {"base_url": fake_openai.url}})
    fake_openai.default = fo.text_response("42", usage=fo.usage(20, 1000)).with_delay(0.2)
    key = add_client("alice", "--budget", "0.05")
    api = openai_sdk(client, key)
    messages: Any = [{"role": "user", "content": "Quick."}]
    results = await asyncio.gather(
        *(
            api.chat.completions.create(
                model="openai/gpt-5", messages=messages, max_completion_tokens=1000, service_tier="priority"
            )
            for _ in range(CALLS)
        ),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, BaseException)]
    assert refused and all(isinstance(r, openai.RateLimitError) for r in refused), refused
    answered, spent = await spend(client, "alice")
    assert answered == len(fake_openai.requests) and spent <= 0.05 + 1e-9, (answered, spent)


def compressed_pdf(pages: int) -> bytes:
    """A PDF as pdfTeX and most producers write them now: its catalog, page tree and pages inside one
    Flate-compressed object stream, so no ``/Type /Page`` is in its bytes as they are."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [] /Count %d >>" % pages]
    objects += [b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>"] * pages
    offsets, body = [], b""
    for obj in objects:
        offsets.append(len(body))
        body += obj + b"\n"
    header = b" ".join(b"%d %d" % (i + 1, offset) for i, offset in enumerate(offsets)) + b"\n"
    packed = zlib.compress(header + body)
    stream = b"<< /Type /ObjStm /N %d /First %d /Filter /FlateDecode /Length %d >>" % (
        len(objects),
        len(header),
        len(packed),
    )
    return (
        b"%PDF-1.5\n%\xe2\xe3\xcf\xd3\n"
        + b"%d 0 obj\n" % (len(objects) + 1)
        + stream
        + b"\nstream\n"
        + packed
        + (b"\nendstream\nendobj\n%%EOF\n")
    )


async def test_a_pdf_with_its_pages_in_object_streams_is_reserved_for_every_page(
    client: TestClient, fake_anthropic: FakeAnthropic
) -> None:
    """A base64 PDF of 20 pages whose page objects are compressed (PDF 1.5 object streams) is reserved at 4600
    tokens a page on the pass-through, not as one page: the upstream bills about 4000 a page ($0.24 here)."""
    fake_anthropic.default = fa.text_response(usage={"input_tokens": 80_000}).with_delay(0.2)
    key = add_client("alice", "--budget", "0.5")
    document = {
        "type": "document",
        "source": {
            "type": "base64",
            "media_type": "application/pdf",
            "data": base64.b64encode(compressed_pdf(20)).decode(),
        },
    }
    messages: Any = [{"role": "user", "content": [document, {"type": "text", "text": "Summarize."}]}]
    api = anthropic_sdk(client, key)
    results = await asyncio.gather(
        *(api.messages.create(model=MODEL, max_tokens=64, messages=messages) for _ in range(CALLS)),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(r, anthropic.RateLimitError) for r in refused), refused
    answered, spent = await spend(client, "alice")
    assert answered == 1 and spent <= 0.5, (answered, spent)
    assert "may cost up to $0.27" in str(refused[-1]), refused[-1]  # 92,000 tokens of input and 64 of output


async def test_web_fetches_reserve_the_content_they_may_bring_in(
    client: TestClient, fake_anthropic: FakeAnthropic
) -> None:
    """A web fetch's content is billed as input tokens: a request with ``web_fetch`` (``max_uses: 2``,
    ``max_content_tokens: 20000``) reserves 40,000 tokens of input for it, so 30 such calls against $0.2 let
    one through, whose upstream fetched two long pages ($0.12 of input)."""
    fake_anthropic.default = fa.text_response(
        usage={"input_tokens": 40_000},
        delta_usages=[{"output_tokens": 50, "server_tool_use": {"web_fetch_requests": 2}}],
    ).with_delay(0.2)
    key = add_client("alice", "--budget", "0.2")
    tools: Any = [{"type": "web_fetch_20250910", "name": "web_fetch", "max_uses": 2, "max_content_tokens": 20_000}]
    api = anthropic_sdk(client, key)
    results = await asyncio.gather(
        *(
            api.messages.create(
                model=MODEL, max_tokens=64, tools=tools, messages=[{"role": "user", "content": "Read both pages."}]
            )
            for _ in range(CALLS)
        ),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(r, anthropic.RateLimitError) for r in refused), refused
    answered, spent = await spend(client, "alice")
    assert answered == 1 and 0.12 < spent <= 0.2, (answered, spent)


async def test_web_searches_reserve_the_results_they_may_bring_in(
    make_client: Any, fake_anthropic: FakeAnthropic
) -> None:
    """A web search's results are billed as input tokens, as a web fetch's content is, and nothing here can
    count them: a request with ``web_search`` reserves the ceiling of an uncountable input for them
    (``[limits] uncountable_input_tokens``, 50,000 here), so 30 such calls against $0.2 let one through, whose
    search brought in 40,000 tokens of results ($0.12 of input, and the $0.01 search)."""
    client = await make_client(limits={"uncountable_input_tokens": 50_000})
    searched = [fa.text_block("Let me search.", chunks=1), fa.server_tool_use_block("news")]
    searched += [fa.web_search_result_block([("https://example.com/a", "A")]), fa.text_block("Found it.")]
    final = {"input_tokens": 40_000, "output_tokens": 50, "server_tool_use": {"web_search_requests": 1}}
    fake_anthropic.default = fa.message_response(
        *searched, usage={"input_tokens": 40_000}, delta_usages=[final]
    ).with_delay(0.1)
    key = add_client("alice", "--budget", "0.2")
    tools: Any = [{"type": "web_search_20250305", "name": "web_search", "max_uses": 1}]
    api = anthropic_sdk(client, key)
    results = await asyncio.gather(
        *(
            api.messages.create(
                model=MODEL, max_tokens=64, tools=tools, messages=[{"role": "user", "content": "Any news?"}]
            )
            for _ in range(CALLS)
        ),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(r, anthropic.RateLimitError) for r in refused), refused
    answered, spent = await spend(client, "alice")
    assert answered == 1 and 0.13 < spent <= 0.2, (answered, spent)


async def test_web_search_options_reserve_the_searches_they_may_run(
    make_client: Any, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``web_search_options`` on ``/v1/chat/completions`` lets OpenAI's search models search, each search billed
    at the cost map's $0.025 (and recorded so): the request sets no bound, so it reserves ``[limits]
    server_tool_max_uses`` searches (1 here), and 30 calls at once against $0.05 spend at most that."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")
    client = await make_client(providers={"openai": {"base_url": fake_openai.url}}, limits={"server_tool_max_uses": 1})
    usage = {**fo.usage(200, 20), "server_tool_use": {"web_search_requests": 1}}
    fake_openai.default = fo.text_response("Found it.", usage=usage).with_delay(0.2)
    key = add_client("alice", "--budget", "0.05")
    api = openai_sdk(client, key)
    messages: Any = [{"role": "user", "content": "Any news?"}]
    results = await asyncio.gather(
        *(
            api.chat.completions.create(
                model="openai/gpt-4o-mini-search-preview", messages=messages, max_tokens=20, web_search_options={}
            )
            for _ in range(CALLS)
        ),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, BaseException)]
    assert refused and all(isinstance(r, openai.RateLimitError) for r in refused), refused
    answered, spent = await spend(client, "alice")
    assert answered == 1 and 0.025 < spent <= 0.05, (answered, spent)


def png(width: int, height: int) -> bytes:
    """A PNG's signature and header chunk (what gives its size), then an empty image data chunk and its end."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


async def test_an_image_sent_to_gpt_4o_mini_reserves_what_openai_bills_for_it(
    make_client: Any, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gpt-4o-mini bills a high-detail image at 2833 tokens plus 5667 a tile (up to 8 tiles: 48,169 tokens),
    thirty times Anthropic's ceiling: 30 calls with a 2048 x 768 image against $0.02 let 2 through."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")
    client = await make_client(providers={"openai": {"base_url": fake_openai.url}})
    fake_openai.default = fo.text_response("A chart.", usage=fo.usage(48_200, 10)).with_delay(0.2)
    key = add_client("alice", "--budget", "0.02")
    image = "data:image/png;base64," + base64.b64encode(png(2048, 768)).decode()
    messages: Any = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image, "detail": "high"}},
                {"type": "text", "text": "What is this?"},
            ],
        }
    ]
    api = openai_sdk(client, key)
    results = await asyncio.gather(
        *(
            api.chat.completions.create(model="openai/gpt-4o-mini", messages=messages, max_tokens=100)
            for _ in range(CALLS)
        ),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(r, openai.RateLimitError) for r in refused), refused
    answered, spent = await spend(client, "alice")
    assert answered == 2 and 0.014 < spent <= 0.02, (answered, spent)


@pytest.mark.parametrize("way", ["messages", "chat_completions"])
async def test_an_image_sent_to_opus_4_7_reserves_its_high_resolution(
    client: TestClient, fake_anthropic: FakeAnthropic, way: str
) -> None:
    """Claude Opus 4.7 reads images at up to 3.75 megapixels (2576 px on the long edge), about 5000 tokens each
    by Anthropic's (width x height) / 750, three times the 1600 of earlier models: 30 calls with a 2576 x 1456
    image against $0.05 let one through, passed through or translated, not five."""
    fake_anthropic.default = fa.text_response(
        usage={"input_tokens": 5_000}, delta_usages=[{"output_tokens": 10}]
    ).with_delay(0.2)
    key = add_client("alice", "--budget", "0.05")
    data = base64.b64encode(png(2576, 1456)).decode()
    if way == "messages":
        content: Any = [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}},
            {"type": "text", "text": "What is this?"},
        ]
        api = anthropic_sdk(client, key)
        calls = [
            api.messages.create(model="claude-opus-4-7", max_tokens=64, messages=[{"role": "user", "content": content}])
            for _ in range(CALLS)
        ]
    else:
        parts: Any = [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + data}},
            {"type": "text", "text": "What is this?"},
        ]
        gpt = openai_sdk(client, key)
        calls = [
            gpt.chat.completions.create(
                model="anthropic/claude-opus-4-7", max_tokens=64, messages=[{"role": "user", "content": parts}]
            )
            for _ in range(CALLS)
        ]
    results = await asyncio.gather(*calls, return_exceptions=True)
    refused = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(r, (anthropic.RateLimitError, openai.RateLimitError)) for r in refused), refused
    answered, spent = await spend(client, "alice")
    assert answered == 1 and 0.02 < spent <= 0.05, (answered, spent)


async def test_a_call_run_in_the_us_only_is_priced_and_reserved_at_its_surcharge(
    client: TestClient, fake_anthropic: FakeAnthropic
) -> None:
    """``inference_geo: "us"`` runs Claude Opus 4.6 in the US only, at 1.1 times its prices (the cost map's
    ``provider_specific_entry``), and the usage says where it ran: the record is priced so, and the request
    that asks for it reserves so -- 30 calls of about $0.0825 against $0.16 let one through, not two."""
    us = {"inference_geo": "us"}
    fake_anthropic.default = fa.text_response(
        usage={"input_tokens": 10_000, **us}, delta_usages=[{"output_tokens": 1000, **us}]
    ).with_delay(0.2)
    key = add_client("alice", "--budget", "0.16")
    api = anthropic_sdk(client, key)
    results = await asyncio.gather(
        *(
            api.messages.create(
                model="claude-opus-4-6",
                max_tokens=1000,
                messages=[{"role": "user", "content": "word " * 9_990}],
                extra_body=us,
            )
            for _ in range(CALLS)
        ),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(r, anthropic.RateLimitError) for r in refused), refused
    assert all(r.body["inference_geo"] == "us" for r in fake_anthropic.requests)
    (record,) = [r for r in await records(client) if r["answered"]]
    assert record["totalCost"] == pytest.approx((10_000 * 5 + 1000 * 25) / 1e6 * 1.1)
    answered, spent = await spend(client, "alice")
    assert answered == 1 and spent <= 0.16, (answered, spent)


async def test_a_retried_attempt_the_upstream_answered_is_its_own_reserved_and_recorded_call(
    make_client: Any, fake_anthropic: FakeAnthropic
) -> None:
    """The first request of each of these chat turns reports its 50k input tokens in ``message_start`` and then fails
    (overloaded); the turn retries. The upstream bills the failed attempt's input too, so each attempt is a
    call of its own: admitted and reserved anew, and recorded with what it reported. 15 turns at once against
    $1: every upstream request has its record, and they spend at most the budget."""
    client = await make_client(
        thinking={"enabled": False}, chat={"max_retries": 2, "max_tokens": 100, "prompt_cache": "off"}
    )
    started = dict(fa.text_response().events[0][1]["message"], usage={"input_tokens": 50_000, "output_tokens": 1})
    failed = fa.FakeResponse(
        (("message_start", {"type": "message_start", "message": started}), *fa.error_event().events[1:])
    ).with_delay(0.1)
    answer = fa.text_response(usage={"input_tokens": 50_000}, delta_usages=[{"output_tokens": 10}]).with_delay(0.1)

    def next_response() -> fa.FakeResponse:  # a turn's first attempt fails, its retry answers
        asked = [json.dumps(r.body["messages"]) for r in fake_anthropic.requests]
        return answer if asked.count(asked[-1]) > 1 else failed

    fake_anthropic.next_response = next_response  # type: ignore[method-assign]
    key = add_client("alice", "--budget", "1")
    frames = await asyncio.gather(*(ws_chat(client, key, f"{PROMPT} {i}") for i in range(CALLS // 2)))
    assert all(f[-1]["code"] == "BUDGET_EXCEEDED" for f in frames if not of(f, "chat.stream.end")), frames
    mine = [r for r in await records(client) if r["client"] == "alice"]
    assert len(mine) == len(fake_anthropic.requests) >= 6  # one record per upstream request, failed ones too
    assert all(r["inputTokens"] == 50_000 for r in mine)
    assert sum(r["totalCost"] for r in mine) <= 1.0


async def test_anthropic_s_own_tools_reserve_the_tokens_they_are_billed(
    client: TestClient, fake_anthropic: FakeAnthropic
) -> None:
    """Anthropic's computer, bash and text editor tools are named in a few bytes but billed as 1234, 245 and 700
    input tokens, and any request with tools gets a 346-token system prompt: 30 such calls against $0.02 let 2
    through, not all of them."""
    fake_anthropic.default = fa.text_response(
        usage={"input_tokens": 2_550}, delta_usages=[{"output_tokens": 10}]
    ).with_delay(0.2)
    key = add_client("alice", "--budget", "0.02")
    tools: Any = [
        {"type": "computer_20250124", "name": "computer", "display_width_px": 1024, "display_height_px": 768},
        {"type": "bash_20250124", "name": "bash"},
        {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"},
    ]
    api = anthropic_sdk(client, key)
    results = await asyncio.gather(
        *(
            api.messages.create(
                model=MODEL, max_tokens=16, tools=tools, messages=[{"role": "user", "content": "Open the file."}]
            )
            for _ in range(CALLS)
        ),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(r, anthropic.RateLimitError) for r in refused), refused
    answered, spent = await spend(client, "alice")
    assert answered == 2 and spent <= 0.02, (answered, spent)


async def test_text_beyond_ascii_is_reserved_at_what_an_older_tokenizer_bills_for_it(
    make_client: Any, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chinese text costs gpt-4-turbo (cl100k_base) almost twice the tokens o200k_base counts: 30 calls with
    20,000 characters of it against $0.6 let 2 through, each billed 29,000 input tokens ($0.29)."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")
    client = await make_client(providers={"openai": {"base_url": fake_openai.url}})
    fake_openai.default = fo.text_response("好", usage=fo.usage(29_010, 10)).with_delay(0.2)
    key = add_client("alice", "--budget", "0.6")
    text = "這是一個測試句子，用來比較不同的分詞器。" * 1000
    api = openai_sdk(client, key)
    results = await asyncio.gather(
        *(
            api.chat.completions.create(
                model="openai/gpt-4-turbo", messages=[{"role": "user", "content": text}], max_tokens=16
            )
            for _ in range(CALLS)
        ),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(r, openai.RateLimitError) for r in refused), refused
    answered, spent = await spend(client, "alice")
    assert answered == 2 and spent <= 0.6, (answered, spent)


async def test_a_compaction_of_text_beyond_ascii_reserves_what_an_older_tokenizer_bills_for_it(
    make_client: Any, fake_anthropic: FakeAnthropic
) -> None:
    """A session's compaction sends its conversation upstream: Greek text counted at 36,000 tokens by
    ``o200k_base`` and 81,000 by ``cl100k_base`` reserves the larger count, as every other call does, so four
    compactions at once against $0.3 left let one through, which the upstream bills at the larger count."""
    client = await make_client(thinking={"enabled": False}, chat={"prompt_cache": "off"})
    greek = "γειά σου κόσμε, τι κάνεις σήμερα; " * 3000
    fake_anthropic.default = fa.text_response(usage={"input_tokens": 100}, delta_usages=[{"output_tokens": 10}])
    key = add_client("alice", "--period", "total")
    sessions = []
    for _ in range(4):  # two turns each: a compaction summarises every turn but the latest
        ws = await client.ws_connect("/gateway", headers=bearer(key))
        frames = await chat(ws, greek)
        sessions.append(of(frames, "chat.stream.start")[0]["sessionId"])
        await chat(ws, "and more", sessionId=sessions[-1])
        await ws.close()
    before = sum(r["totalCost"] for r in await records(client))
    cli("clients", "set", "alice", "--budget", f"{before + 0.3:.6f}")
    fake_anthropic.default = fa.text_response(
        usage={"input_tokens": 81_000}, delta_usages=[{"output_tokens": 1024}]
    ).with_delay(0.2)

    async def compact(session: str) -> dict[str, Any]:
        ws = await client.ws_connect("/gateway", headers=bearer(key))
        try:
            await ws.send_json({"type": "session.compact", "id": "c1", "sessionId": session})
            while True:
                frame: dict[str, Any] = await ws.receive_json(timeout=30)
                if frame["type"] in ("session.compacted", "error"):
                    return frame
        finally:
            await ws.close()

    frames = await asyncio.gather(*(compact(s) for s in sessions))
    assert all(f["type"] == "session.compacted" or f["code"] == "BUDGET_EXCEEDED" for f in frames), frames
    compactions = [r for r in await records(client) if r["purpose"] == "compact" and r["answered"]]
    spent = sum(r["totalCost"] for r in await records(client)) - before
    assert len(compactions) == 1 and 0.25 < spent <= 0.3, (len(compactions), spent)
