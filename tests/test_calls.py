"""One provider call (issue 24, docs/accounting.md), through the real interfaces: reservations at the most a
request as sent can cost on every transport, spend that counts what came before a budget, count_tokens
admission, refusals during shutdown, and the write-ahead ledger's recovery after a SIGKILL of a real
``agentspace serve``, against the fake upstreams."""

from __future__ import annotations

import ast
import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp.test_utils import TestClient

from agentspace.plugins import create_plugin_manager
from agentspace.storage.embedded.usage import UsageStore
from scripts.harness import GatewayProcess
from tests.fakes import anthropic_upstream as fa
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.support.ledgers import journal_entries, wait_for_notes
from tests.support.tools import slow_tool
from tests.support.ui_stream import post_chat, read_all
from tests.support.ws import of
from tests.test_clients import add_client, anthropic_sdk, bearer, cli, openai_sdk, records, spend_of, ws_chat
from tests.tool_plugins import WeatherTools

MODEL = "claude-sonnet-4-5"
CALLS = 30


async def answered_and_spend(client: TestClient, name: str) -> tuple[int, float]:
    mine = [r for r in await records(client) if r["client"] == name]
    return sum(1 for r in mine if r["answered"]), sum(r["totalCost"] for r in mine)


# --- reservations: 30 concurrent calls against a nearly spent budget ----------------------------------


async def test_thinking_turns_on_the_websocket_reserve_what_goes_upstream(
    client: TestClient, fake_anthropic: FakeAnthropic
) -> None:
    # [chat] max_tokens 4096 with a thinking budget of 8000 goes upstream as max_tokens 12096: the model may
    # use all of it, and this upstream does (about $0.18 at Sonnet's $15 per million output tokens).
    fake_anthropic.default = fa.text_response(delta_usages=[{"output_tokens": 12000}]).with_delay(0.2)
    key = add_client("alice", "--budget", "0.25")
    results = await asyncio.gather(*(ws_chat(client, key) for _ in range(CALLS)))
    assert sum(1 for frames in results if of(frames, "chat.stream.end")) == 1
    assert all(frames[-1]["code"] == "BUDGET_EXCEEDED" for frames in results if not of(frames, "chat.stream.end"))
    assert fake_anthropic.requests[0].body["max_tokens"] == 12096
    answered, spent = await answered_and_spend(client, "alice")
    assert answered == 1 and 0.18 < spent <= 0.25


async def test_thinking_turns_on_api_chat_reserve_what_goes_upstream(
    client: TestClient, fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.default = fa.text_response(delta_usages=[{"output_tokens": 12000}]).with_delay(0.2)
    key = add_client("alice", "--budget", "0.25")

    async def one(i: int) -> int:
        resp = await post_chat(client, bearer(key), f"chat{i}")
        if resp.status != 200:
            return resp.status
        chunks = await read_all(resp)
        return 200 if not any(isinstance(c, dict) and c.get("type") == "error" for c in chunks) else 429

    statuses = await asyncio.gather(*(one(i) for i in range(CALLS)))
    assert statuses.count(200) == 1 and statuses.count(429) == CALLS - 1
    answered, spent = await answered_and_spend(client, "alice")
    assert answered == 1 and spent <= 0.25


async def test_tool_loops_on_the_websocket_and_api_chat_reserve_each_step(
    make_client: Any, fake_anthropic: FakeAnthropic
) -> None:
    """Each step of a tool loop is admitted and reserved on its own, at the moment of its call: 30 tool-using
    turns (WebSocket and /api/chat) against $0.60 spend at most the budget, whatever step they are at."""
    pm = create_plugin_manager()
    pm.register(WeatherTools())
    client = await make_client(pm=pm)
    tool_step = fa.tool_use_response("get_weather", {"city": "Oslo"}).with_delay(0.1)
    answer_step = fa.text_response(delta_usages=[{"output_tokens": 12000}]).with_delay(0.1)  # about $0.18

    def next_response() -> fa.FakeResponse:  # the step after a tool result answers; the first calls the tool
        last = fake_anthropic.requests[-1].body["messages"][-1]["content"]
        ran = isinstance(last, list) and any(b.get("type") == "tool_result" for b in last)
        return answer_step if ran else tool_step

    fake_anthropic.next_response = next_response  # type: ignore[method-assign]
    key = add_client("alice", "--budget", "0.6")

    async def over_http(i: int) -> str:
        resp = await post_chat(client, bearer(key), f"chat{i}")
        if resp.status != 200:
            return str((await resp.json())["error"]["code"])
        chunks = [c for c in await read_all(resp) if isinstance(c, dict)]
        errors = [c for c in chunks if c.get("type") == "error"]
        if not errors:
            return "ok"
        # A step refused mid-turn: the AI SDK's error chunk carries the message only (docs/protocol.md).
        return "BUDGET_EXCEEDED" if "budget" in errors[0]["errorText"] else errors[0]["errorText"]

    async def over_ws() -> str:
        frames = await ws_chat(client, key, "Weather?")
        return "ok" if of(frames, "chat.stream.end") else str(frames[-1].get("code"))

    outcomes = await asyncio.gather(*(over_ws() for _ in range(CALLS // 2)), *(over_http(i) for i in range(CALLS // 2)))
    assert set(outcomes) <= {"ok", "BUDGET_EXCEEDED"}, outcomes
    assert outcomes.count("ok") >= 2  # loops ran side by side
    mine = [r for r in await records(client) if r["client"] == "alice"]
    assert len(mine) == len(fake_anthropic.requests)  # one record per call that went upstream
    assert sum(r["totalCost"] for r in mine) <= 0.6
    assert any(r["outputTokens"] == 12000 for r in mine)  # a loop reached its costly last step


async def test_reasoning_effort_on_chat_completions_reserves_the_thinking_budget(
    client: TestClient, fake_anthropic: FakeAnthropic
) -> None:
    # max_tokens 1000 with reasoning_effort "high" goes upstream as max_tokens 17000 (16000 of thinking).
    fake_anthropic.default = fa.text_response(delta_usages=[{"output_tokens": 16500}]).with_delay(0.2)
    key = add_client("alice", "--budget", "0.35")
    api = openai_sdk(client, key)

    async def one() -> Any:
        return await api.chat.completions.create(
            model="anthropic/claude-sonnet-4-5",
            messages=[{"role": "user", "content": "Think hard."}],
            max_tokens=1000,
            reasoning_effort="high",
        )

    results = await asyncio.gather(*(one() for _ in range(CALLS)), return_exceptions=True)
    assert sum(1 for r in results if not isinstance(r, BaseException)) == 1
    assert all(isinstance(r, openai.RateLimitError) for r in results if isinstance(r, BaseException))
    assert fake_anthropic.requests[0].body["max_tokens"] == 17000
    answered, spent = await answered_and_spend(client, "alice")
    assert answered == 1 and spent <= 0.35


async def test_reasoning_effort_on_responses_reserves_the_thinking_budget(
    client: TestClient, fake_anthropic: FakeAnthropic
) -> None:
    # /v1/responses: max_output_tokens 1000 with reasoning effort "high" goes upstream as max_tokens 17000.
    fake_anthropic.default = fa.text_response(delta_usages=[{"output_tokens": 16500}]).with_delay(0.2)
    key = add_client("alice", "--budget", "0.35")
    api = openai_sdk(client, key)
    results = await asyncio.gather(
        *(
            api.responses.create(
                model="anthropic/claude-sonnet-4-5",
                input="Think hard.",
                max_output_tokens=1000,
                reasoning={"effort": "high"},
            )
            for _ in range(CALLS)
        ),
        return_exceptions=True,
    )
    assert sum(1 for r in results if not isinstance(r, BaseException)) == 1
    assert all(isinstance(r, openai.RateLimitError) for r in results if isinstance(r, BaseException))
    assert fake_anthropic.requests[0].body["max_tokens"] == 17000
    answered, spent = await answered_and_spend(client, "alice")
    assert answered == 1 and 0.24 < spent <= 0.35


async def test_a_url_document_reserves_the_configured_ceiling(make_client: Any, fake_anthropic: FakeAnthropic) -> None:
    client = await make_client(limits={"uncountable_input_tokens": 120_000})
    # The upstream fetched the PDF and billed 100k input tokens ($0.30); nothing here could count them.
    fake_anthropic.default = fa.text_response(usage={"input_tokens": 100_000}).with_delay(0.2)
    key = add_client("alice", "--budget", "0.5")
    document = {"type": "document", "source": {"type": "url", "url": "https://example.com/report.pdf"}}
    messages = [{"role": "user", "content": [document, {"type": "text", "text": "Summarize."}]}]
    api = anthropic_sdk(client, key)
    results = await asyncio.gather(
        *(api.messages.create(model=MODEL, max_tokens=64, messages=messages) for _ in range(CALLS)),  # type: ignore[arg-type]
        return_exceptions=True,
    )
    assert sum(1 for r in results if not isinstance(r, BaseException)) == 1
    refused = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(r, anthropic.RateLimitError) for r in refused)
    answered, spent = await answered_and_spend(client, "alice")
    assert answered == 1 and spent <= 0.5
    # The last refusals say why: the reservation alone does not fit what is left.
    assert any("may cost up to $0.36" in str(r) for r in refused)


async def test_a_url_document_reserves_the_configured_ceiling_when_translated(
    make_client: Any, fake_anthropic: FakeAnthropic
) -> None:
    """A PDF behind a URL sent through /v1/chat/completions (a file part) or /v1/responses (an input_file) goes
    upstream as a URL document: the upstream fetches and bills it, so it reserves the configured ceiling."""
    client = await make_client(limits={"uncountable_input_tokens": 120_000})
    fake_anthropic.default = fa.text_response(usage={"input_tokens": 100_000}).with_delay(0.2)
    key = add_client("alice", "--budget", "0.5")
    url = "https://example.com/report.pdf"
    api = openai_sdk(client, key)
    chat = [
        {
            "role": "user",
            "content": [{"type": "file", "file": {"file_data": url}}, {"type": "text", "text": "Summarize."}],
        }
    ]
    response_input = [
        {
            "role": "user",
            "content": [{"type": "input_file", "file_url": url}, {"type": "input_text", "text": "Summarize."}],
        }
    ]
    results = await asyncio.gather(
        *(
            api.chat.completions.create(model="anthropic/" + MODEL, max_tokens=64, messages=chat)  # type: ignore[arg-type]
            for _ in range(CALLS // 2)
        ),
        *(
            api.responses.create(model="anthropic/" + MODEL, max_output_tokens=64, input=response_input)  # type: ignore[arg-type]
            for _ in range(CALLS // 2)
        ),
        return_exceptions=True,
    )
    assert sum(1 for r in results if not isinstance(r, BaseException)) == 1
    assert all(isinstance(r, openai.RateLimitError) for r in results if isinstance(r, BaseException))
    sent = fake_anthropic.requests[0].body["messages"][0]["content"][0]
    assert sent["type"] == "document" and sent["source"] == {"type": "url", "url": url}
    answered, spent = await answered_and_spend(client, "alice")
    assert answered == 1 and 0.3 <= spent <= 0.5


async def test_a_long_context_tier_of_the_pricing_table_prices_the_reservation(
    make_client: Any, fake_anthropic: FakeAnthropic
) -> None:
    # [pricing] puts prompts over 1000 tokens at ten times the rates: a 1500-token prompt with max_tokens 1000
    # may cost 1500 x $30/M + 1000 x $150/M = $0.195, which is what the upstream's answer costs here.
    tier = {"above_input_tokens": 1000, "input_per_mtok": 30.0, "output_per_mtok": 150.0}
    client = await make_client(pricing={"anthropic/" + MODEL: {"long_context": [tier]}})
    fake_anthropic.default = fa.text_response(
        usage={"input_tokens": 1500}, delta_usages=[{"output_tokens": 1000}]
    ).with_delay(0.2)
    key = add_client("alice", "--budget", "0.25")
    messages = [{"role": "user", "content": "word " * 1500}]
    anthropic_api, openai_api = anthropic_sdk(client, key), openai_sdk(client, key)
    results = await asyncio.gather(
        *(anthropic_api.messages.create(model=MODEL, max_tokens=1000, messages=messages) for _ in range(CALLS // 2)),  # type: ignore[arg-type]
        *(
            openai_api.chat.completions.create(model="anthropic/" + MODEL, max_tokens=1000, messages=messages)  # type: ignore[arg-type]
            for _ in range(CALLS // 2)
        ),
        return_exceptions=True,
    )
    assert sum(1 for r in results if not isinstance(r, BaseException)) == 1
    assert all(
        isinstance(r, (anthropic.RateLimitError, openai.RateLimitError))
        for r in results
        if isinstance(r, BaseException)
    )
    answered, spent = await answered_and_spend(client, "alice")
    assert answered == 1 and spent == pytest.approx(0.195)
    with pytest.raises(anthropic.RateLimitError) as e:
        await anthropic_api.messages.create(model=MODEL, max_tokens=1000, messages=messages)  # type: ignore[arg-type]
    assert "may cost up to $0.19" in str(e.value) or "may cost up to $0.2" in str(e.value), str(e.value)


async def test_a_reservation_larger_than_what_is_left_is_refused_and_says_so(
    client: TestClient, fake_anthropic: FakeAnthropic
) -> None:
    key = add_client("alice", "--budget", "0.01")
    with pytest.raises(anthropic.RateLimitError) as e:
        await anthropic_sdk(client, key).messages.create(
            model=MODEL, max_tokens=4000, messages=[{"role": "user", "content": "Hi"}]
        )
    assert "has $0.01 left" in str(e.value) and "may cost up to $0.06" in str(e.value)
    assert fake_anthropic.requests == []


async def test_the_worked_example_of_the_accounting_doc_is_what_the_code_computes(
    client: TestClient, fake_anthropic: FakeAnthropic
) -> None:
    """docs/accounting.md's worked example: its figures are the ones the gateway's pricing gives."""
    from agentspace.calls import Ceiling, ceiling_cost, price
    from agentspace.transports import state
    from agentspace.types import TokenUsage

    doc = (Path(__file__).resolve().parent.parent / "docs" / "accounting.md").read_text(encoding="utf-8")
    example = " ".join(doc[doc.index("## A worked example") :].split())
    gw, model = client.app[state.REGISTRY], "anthropic/" + MODEL
    # A turn with [chat] max_tokens 4096 and thinking on (budget 8000) sends max_tokens 12096 upstream.
    assert of(await ws_chat(client, add_client("ci-bot")), "chat.stream.end")
    assert fake_anthropic.requests[0].body["max_tokens"] == 12096 and "`max_tokens: 12096`" in example
    reservation = ceiling_cost(gw, model, Ceiling(1200, 12096, cache_write="5m"))  # the turn marks its prompt
    posted = price(gw, model, TokenUsage(input_tokens=1180, output_tokens=2300)).total_cost
    recovered = price(gw, model, TokenUsage(input_tokens=1180, output_tokens=900)).total_cost
    assert f"**${reservation:.5f}**" in example
    assert f"$0.04 + in flight $0 + ${reservation:.5f} = ${0.04 + reservation:.5f} <= $0.25" in example
    assert f"${0.25 - 0.04 - reservation:.5f} left" in example
    assert f"Posted: $0.00354 + $0.0345 = ${posted:.5f}; spend is now ${0.04 + posted:.5f}" in example
    assert f'`recovered: true`, `estimatedFields: ["outputTokens"]`, ${recovered:.5f}' in example


# --- spend from the ledger ------------------------------------------------------------------------------


async def test_spend_before_a_budget_counts_and_every_view_agrees(
    client: TestClient, fake_anthropic: FakeAnthropic, token: str
) -> None:
    key = add_client("ci-bot2")
    admin = bearer(token)
    assert (await client.get("/api/clients", headers=admin)).status == 200  # the spend is read (and kept) here
    api = anthropic_sdk(client, key)
    for _ in range(3):
        await api.messages.create(model=MODEL, max_tokens=64, messages=[{"role": "user", "content": "Hi"}])
    spent = await spend_of(client, "ci-bot2")
    # A budget set after the spend counts it: no call that cannot fit is admitted.
    cli("clients", "set", "ci-bot2", "--budget", f"{spent * 1.5:.10f}")
    with pytest.raises(anthropic.RateLimitError):
        await api.messages.create(model=MODEL, max_tokens=64, messages=[{"role": "user", "content": "Hi"}])
    assert await spend_of(client, "ci-bot2") == pytest.approx(spent)

    server = {c["name"]: c for c in (await (await client.get("/api/clients", headers=admin)).json())["clients"]}
    listed = {c["name"]: c for c in json.loads(cli("clients", "list", "--json"))["clients"]}
    assert server["ci-bot2"]["spend"]["usd"] == pytest.approx(spent)
    assert listed["ci-bot2"]["spend"]["usd"] == pytest.approx(spent)


# --- count_tokens: admission only -----------------------------------------------------------------------


async def test_count_tokens_checks_the_client_and_sends_nothing_when_refused(
    client: TestClient, fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.count_tokens = 11
    key = add_client("ci-bot", "--models", "anthropic/claude-haiku-*", "--rpm", "1", "--budget", "0")
    api = anthropic_sdk(client, key)
    for _ in range(5):
        with pytest.raises(anthropic.PermissionDeniedError) as e:
            # a model the gateway serves (one it does not is a 404, as /v1/messages answers it)
            await api.messages.count_tokens(model="claude-sonnet-4-5", messages=[{"role": "user", "content": "Hi"}])
        assert e.value.status_code == 403
        body = e.value.response.json()
        assert body["type"] == "error" and body["error"]["type"] == "permission_error"
        assert "MODEL_NOT_ALLOWED" in body["error"]["message"]
    assert fake_anthropic.count_requests == []

    # An allowed model is counted (free: no budget needed), and within the client's requests per minute.
    counted = await api.messages.count_tokens(model="claude-haiku-4-5", messages=[{"role": "user", "content": "Hi"}])
    assert counted.input_tokens == 11
    with pytest.raises(anthropic.RateLimitError):
        await api.messages.count_tokens(model="claude-haiku-4-5", messages=[{"role": "user", "content": "Hi"}])
    assert len(fake_anthropic.count_requests) == 1
    assert await records(client) == []  # no provider call was billed


# --- the one lifecycle ----------------------------------------------------------------------------------


def test_only_calls_py_makes_usage_records() -> None:
    """No module but agentspace/calls.py constructs a UsageRecord: every provider call's one record is made
    by the one lifecycle."""
    root = Path(__file__).resolve().parent.parent / "agentspace"
    makers = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name == "UsageRecord":
                    makers.append(str(path.relative_to(root)))
    assert set(makers) == {"calls.py"}


async def test_a_key_rotated_is_refused_at_the_next_call_of_an_open_socket(
    client: TestClient, fake_anthropic: FakeAnthropic
) -> None:
    key = add_client("alice")
    ws = await client.ws_connect("/gateway", headers=bearer(key))
    try:
        from tests.support.ws import chat

        assert of(await chat(ws, "Hi"), "chat.stream.end")
        cli("clients", "rotate", "alice")
        frames = await chat(ws, "Again", request_id="r2")
        assert frames[-1]["type"] == "error" and frames[-1]["code"] == "UNAUTHORIZED"
    finally:
        await ws.close()
    assert len(fake_anthropic.requests) == 1


async def test_a_key_rotated_during_a_tool_loop_on_api_chat_refuses_its_next_step(
    make_client: Any, fake_anthropic: FakeAnthropic
) -> None:
    """/api/chat authenticates once per request, but each step of its tool loop is admitted at the moment of
    its call: a key rotated while a tool runs refuses the next step, before anything is sent."""
    entered, release = asyncio.Event(), asyncio.Event()
    client = await make_client(pm=slow_tool(entered, release))
    fake_anthropic.enqueue(fa.tool_use_response("wait", {}), fa.text_response("Never sent."))
    key = add_client("alice")
    turn = asyncio.ensure_future(post_chat(client, bearer(key), "c1"))
    await asyncio.wait_for(entered.wait(), 10)
    cli("clients", "rotate", "alice")
    release.set()
    resp = await turn
    assert resp.status == 200
    errors = [c for c in await read_all(resp) if isinstance(c, dict) and c.get("type") == "error"]
    assert errors and "rotated" in errors[0]["errorText"], errors
    assert len(fake_anthropic.requests) == 1  # the second step never left


# --- shutdown -------------------------------------------------------------------------------------------


async def test_v1_refuses_new_calls_once_shutdown_begins(tmp_path: Path, fake_anthropic: FakeAnthropic) -> None:
    """A /v1 request whose body was still arriving when SIGTERM came is refused like a new WebSocket turn, in
    its API's shape, on every /v1 way to a provider call (count_tokens included)."""
    fake_anthropic.enqueue(fa.text_response("slow " * 40, chunks=40).with_delay(0.1))  # keeps shutdown waiting
    server = GatewayProcess(tmp_path / "data", fake_anthropic.url, server={"shutdown_grace_seconds": 5.0})
    try:
        await server.start()
        headers = {"Authorization": f"Bearer {server.token}", "anthropic-version": "2023-06-01"}
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(server.ws_url, headers={"Authorization": f"Bearer {server.token}"})
            await ws.send_json({"type": "chat.send", "id": "busy", "content": "a long one"})
            while (await ws.receive_json(timeout=30))["type"] != "chat.stream.delta":
                pass
            messages = [{"role": "user", "content": "Hi"}]
            calls = {  # each /v1 way to a provider call, with the error shape of its API
                "/v1/messages": {"model": MODEL, "max_tokens": 64, "messages": messages},
                "/v1/messages/count_tokens": {"model": MODEL, "messages": messages},
                "/v1/chat/completions": {"model": "anthropic/" + MODEL, "messages": messages},
                "/v1/responses": {"model": "anthropic/" + MODEL, "input": "Hi"},
            }
            released = asyncio.Event()

            async def body(data: dict[str, Any]) -> Any:
                raw = json.dumps(data).encode()
                yield raw[:10]
                await released.wait()
                yield raw[10:]

            pending = {
                path: asyncio.ensure_future(http.post(server.url + path, data=body(data), headers=headers))
                for path, data in calls.items()
            }
            await asyncio.sleep(0.5)  # the requests are in, their bodies unfinished
            assert server.process is not None
            server.process.send_signal(signal.SIGTERM)
            await server.wait_for_log("running stream(s)")
            released.set()
            for path, call in pending.items():
                resp = await call
                error = (await resp.json())["error"]
                assert resp.status == 503 and "shutting down" in error["message"], (path, error)
                if path.startswith("/v1/messages"):  # Anthropic's shape
                    assert (await resp.json())["type"] == "error" and error["type"] == "overloaded_error", path
                else:  # OpenAI's, as its API answers "overloaded or not ready yet"
                    assert error["type"] == "server_error", (path, error)
            await ws.close()
        assert await server.process.wait() == 0
    finally:
        await server.aclose()
    assert len(fake_anthropic.requests) == 1  # only the turn that was running
    assert fake_anthropic.count_requests == []


# --- crash recovery -------------------------------------------------------------------------------------


async def test_sigkill_mid_stream_then_restart_records_each_call_as_reported(
    tmp_path: Path, fake_anthropic: FakeAnthropic
) -> None:
    """Four streams, one per transport, whose upstream reported 5000 input tokens at message_start; the server
    is killed while they stream. After a restart: one record each, with the reported input, recovered."""
    fake_anthropic.default = fa.text_response("word " * 300, chunks=300, usage={"input_tokens": 5000}).stall(
        120, after=40
    )
    data_dir = tmp_path / "data"
    server = GatewayProcess(data_dir, fake_anthropic.url)
    try:
        await server.start()
        token = server.token
        headers = {"Authorization": f"Bearer {token}", "anthropic-version": "2023-06-01"}
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(server.ws_url, headers={"Authorization": f"Bearer {token}"})
            await ws.send_json({"type": "chat.send", "id": "r1", "content": "Hi"})
            while (await ws.receive_json(timeout=30))["type"] != "chat.stream.delta":
                pass
            messages = [{"role": "user", "content": "Hi"}]
            streams = [
                await http.post(
                    server.url + "/v1/messages",
                    json={"model": MODEL, "max_tokens": 1024, "stream": True, "messages": messages},
                    headers=headers,
                ),
                await http.post(
                    server.url + "/v1/chat/completions",
                    json={"model": "anthropic/" + MODEL, "stream": True, "messages": messages},
                    headers=headers,
                ),
                await http.post(
                    server.url + "/api/chat",
                    json={
                        "id": "c1",
                        "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "Hi"}]}],
                    },
                    headers=headers,
                ),
            ]
            for resp in streams:
                assert resp.status == 200
                await resp.content.readany()  # output is flowing
            # The reported input and the output relayed reach the journal (within a second, later under load).
            await wait_for_notes(lambda: journal_entries(data_dir), 4)
            assert len(fake_anthropic.requests) == 4
            await server.kill()
    finally:
        await server.aclose()

    assert list(UsageStore(data_dir).records_sync()) == []  # nothing was posted before the kill
    restarted = GatewayProcess(data_dir, fake_anthropic.url)
    try:
        await restarted.start()
        await restarted.wait_for_log("recovered")
    finally:
        await restarted.aclose()
    found = list(UsageStore(data_dir).records_sync())
    assert sorted(r["endpoint"] for r in found) == ["anthropic", "http", "openai", "ws"]
    for record in found:
        assert record["recovered"] is True and record["inputTokens"] == 5000, record
        assert record["answered"] is True and record["outputTokens"] > 0
        assert "outputTokens" in record["estimatedFields"] and "inputTokens" not in record["estimatedFields"]
        assert record["totalCost"] > 0
    # The dead process's journal is gone once recovered; the restarted one stopped with nothing pending.
    assert list((data_dir / "ledger").glob("journal-*.jsonl")) == []


# --- server tools ---------------------------------------------------------------------------------------


async def test_server_tool_fees_are_recorded_reserved_and_counted(
    make_client: Any, fake_anthropic: FakeAnthropic, token: str
) -> None:
    # The searches' results are billed as input: reserved at the ceiling of an uncountable input, kept small here.
    client = await make_client(limits={"uncountable_input_tokens": 5_000})
    # Five web searches ($0.01 each) and a short answer: the fees are most of the call's cost.
    searches = [fa.server_tool_use_block(f"query {i}", id=f"srvtoolu_{i}") for i in range(5)]
    fake_anthropic.default = fa.message_response(*searches, fa.text_block("Found it.")).with_delay(0.05)
    key = add_client("alice", "--budget", "0.08")
    tools = [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]
    api = anthropic_sdk(client, key)
    results = await asyncio.gather(
        *(
            api.messages.create(
                model=MODEL, max_tokens=64, messages=[{"role": "user", "content": "Search"}], tools=tools
            )  # type: ignore[list-item]
            for _ in range(CALLS)
        ),
        return_exceptions=True,
    )
    assert sum(1 for r in results if not isinstance(r, BaseException)) == 1
    (record,) = [r for r in await records(client) if r["answered"]]
    assert record["serverToolUse"] == {"web_search": 5}
    assert record["serverToolCost"] == pytest.approx(0.05)
    assert record["totalCost"] == pytest.approx(record["inputCost"] + record["outputCost"] + 0.05)
    answered, spent = await answered_and_spend(client, "alice")
    assert answered == 1 and 0.05 < spent <= 0.08

    report = await (await client.get("/api/usage?by=client", headers=bearer(token))).json()
    assert report["perClient"]["alice"]["totalCost"] == pytest.approx(spent)


# --- Redis unreachable: admission fails closed ------------------------------------------------------------


async def test_admission_fails_closed_while_redis_is_unreachable(
    make_client: Any, fake_anthropic: FakeAnthropic
) -> None:
    from tests.scale_servers import Redis

    redis = Redis()
    try:
        client = await make_client(storage={"redis_url": redis.url})
        key = add_client("alice", "--budget", "5", "--rpm", "100")
        assert of(await ws_chat(client, key), "chat.stream.end")
        redis.close()  # Redis goes away: no limit or budget can be counted

        with pytest.raises(anthropic.InternalServerError) as a:
            await anthropic_sdk(client, key).messages.create(
                model=MODEL, max_tokens=64, messages=[{"role": "user", "content": "Hi"}]
            )
        assert a.value.status_code == 503 and "could not reach Redis" in str(a.value)
        with pytest.raises(openai.InternalServerError) as o:
            await openai_sdk(client, key).chat.completions.create(
                model="anthropic/" + MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=64
            )
        assert o.value.status_code == 503
        with pytest.raises(openai.InternalServerError) as r:
            await openai_sdk(client, key).responses.create(model="anthropic/" + MODEL, input="Hi")
        assert r.value.status_code == 503 and "could not reach Redis" in str(r.value)
        frames = await ws_chat(client, key)
        assert frames[-1]["type"] == "error" and frames[-1]["code"] == "SERVICE_UNAVAILABLE"
        chat = await post_chat(client, bearer(key), "redis-gone")
        assert chat.status == 503
        assert (await chat.json())["error"]["code"] == "SERVICE_UNAVAILABLE"
        assert len(fake_anthropic.requests) == 1  # nothing else went upstream
    finally:
        redis.close()


# --- the database unreachable: the local spool ------------------------------------------------------------


async def test_records_the_database_refused_survive_a_sigkill_in_the_spool(
    tmp_path: Path, fake_anthropic: FakeAnthropic
) -> None:
    """The database stops while /v1 streams run: they still end for their clients, their records synced to
    the replica's spool, and a new call is refused before anything is sent; the replica is killed before the
    database returns; the next start posts every record the clients saw end."""
    from tests.scale_servers import Postgres, pg_bindir

    if pg_bindir() is None:
        pytest.skip("PostgreSQL is not installed")
    pg = Postgres()
    data_dir = tmp_path / "data"
    storage = {"backend": "postgres", "dsn": pg.dsn}
    fake_anthropic.default = fa.text_response("tok " * 10, chunks=10).with_delay(0.3)
    try:
        server = GatewayProcess(data_dir, fake_anthropic.url, storage=storage)
        try:
            await server.start()
            headers = {"Authorization": f"Bearer {server.token}", "anthropic-version": "2023-06-01"}
            messages = [{"role": "user", "content": "Hi"}]
            async with aiohttp.ClientSession() as http:
                streams = [
                    await http.post(
                        server.url + "/v1/chat/completions",
                        json={"model": "anthropic/" + MODEL, "messages": messages, "max_tokens": 64, "stream": True},
                        headers=headers,
                    )
                    for _ in range(4)
                ]
                for resp in streams:
                    assert resp.status == 200
                    await resp.content.readany()
                pg.stop()  # the database goes away mid-stream
                for resp in streams:
                    body = await resp.read()
                    assert body.endswith(b"data: [DONE]\n\n")  # the client saw its call end successfully
                refused = await http.post(
                    server.url + "/v1/chat/completions",
                    json={"model": "anthropic/" + MODEL, "messages": messages, "max_tokens": 64},
                    headers=headers,
                )
                assert refused.status == 503  # its pending entry cannot be written: nothing is sent
            assert len(fake_anthropic.requests) == 4
            await server.kill()  # before the database returns
        finally:
            await server.aclose()
        pg.start()
        restarted = GatewayProcess(data_dir, fake_anthropic.url, storage=storage)
        try:
            await restarted.start()
            async with aiohttp.ClientSession() as http:
                report = await (
                    await http.get(restarted.url + "/api/usage", headers={"Authorization": f"Bearer {restarted.token}"})
                ).json()
        finally:
            await restarted.aclose()
        assert report["grandTotal"]["requestCount"] == 4, report
        assert report["grandTotal"]["estimatedCount"] == 0  # the spooled records as they were, not estimates
    finally:
        pg.close()
