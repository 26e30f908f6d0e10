"""Model groups over several deployments (agentspace/routing.py, docs/routing.md), through the real
interface: the openai SDK against /v1, POST /api/chat, the WebSocket; two or three fake Anthropic upstreams
on 127.0.0.1, each a deployment with its own key from the vault."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp.test_utils import TestClient
from click.testing import CliRunner

from agentspace.cli import main
from agentspace.config import ConfigError, parse_config
from agentspace.transports import state
from agentspace.vault import KeyVault
from tests.fakes import anthropic_upstream as fa
from tests.fakes import openai_upstream as fo
from tests.support.openai_sdk import text_until_error
from tests.support.ui_stream import DONE, post_chat, read_all, user

MODEL = "anthropic/claude-sonnet-4-5"
KEYS = {"team-1": "sk-ant-team1-0123456789abcdef", "team-2": "sk-ant-team2-0123456789abcdef"}
KEYS["team-3"] = "sk-ant-team3-0123456789abcdef"


@pytest.fixture
async def fakes() -> AsyncIterator[list[fa.FakeAnthropic]]:
    """Three fake Anthropic upstreams; the one at index i accepts only key team-(i+1)."""
    started = []
    for i in range(3):
        started.append(await fa.FakeAnthropic(api_key=KEYS[f"team-{i + 1}"]).start())
    try:
        yield started
    finally:
        for fake in started:
            await fake.close()


def group(fakes: list[fa.FakeAnthropic], n: int = 2, **settings: Any) -> dict[str, Any]:
    weights = settings.pop("weights", [1] * n)
    deployments = [
        {"model": MODEL, "key": f"team-{i + 1}", "base_url": fakes[i].url, "weight": weights[i]} for i in range(n)
    ]
    for i, extra in enumerate(settings.pop("extra", [])):
        deployments[i].update(extra)
    return {"models": {"groups": {"claude": {"deployments": deployments, **settings}}}}


@pytest.fixture
async def routed(
    make_client: Callable[..., Awaitable[TestClient]], isolated_env: Path
) -> Callable[..., Awaitable[TestClient]]:
    vault = KeyVault(isolated_env)
    for name, key in KEYS.items():
        vault.set(name, key)
    return make_client


def sdk(client: TestClient, token: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=token, base_url=f"http://127.0.0.1:{client.port}/v1", max_retries=0)


def registry(client: TestClient) -> Any:
    return client.server.app[state.REGISTRY]


async def records(client: TestClient) -> list[dict[str, Any]]:
    return await registry(client).usage.records()


async def test_weights_three_to_one_over_400_calls(
    routed: Callable[..., Awaitable[TestClient]], fakes: list[fa.FakeAnthropic], token: str
) -> None:
    client = await routed(group(fakes, weights=[3, 1]))
    api = sdk(client, token)
    # The shuffle is random: unseeded, 400 draws leave the 3:1 split by more than 5 points about once in 50
    # runs. A fixed seed makes the check repeatable; the split is still the weighted shuffle's own.
    random.seed(20261206)

    async def one() -> None:
        reply = await api.chat.completions.create(model="claude", messages=[{"role": "user", "content": "Hi"}])
        assert reply.choices[0].message.content

    for _ in range(20):
        await asyncio.gather(*(one() for _ in range(20)))
    first, second = len(fakes[0].requests), len(fakes[1].requests)
    assert first + second == 400
    assert abs(first / 400 - 0.75) <= 0.05, (first, second)
    # Each deployment's key went to its own upstream (the fakes refuse any other with a 401).
    assert {r.api_key for r in fakes[0].requests} == {KEYS["team-1"]}
    assert {r.api_key for r in fakes[1].requests} == {KEYS["team-2"]}
    recs = await records(client)
    assert len(recs) == 400 and all(r["answered"] for r in recs)
    by = {d: sum(1 for r in recs if r["deployment"] == d) for d in ("claude/team-1", "claude/team-2")}
    assert by == {"claude/team-1": first, "claude/team-2": second}
    assert {r["model"] for r in recs} == {MODEL}  # priced as the deployment's model
    await api.close()


async def test_429_with_retry_after_cools_the_deployment(
    routed: Callable[..., Awaitable[TestClient]],
    fakes: list[fa.FakeAnthropic],
    auth_headers: dict[str, str],
) -> None:
    fakes[1].default = fa.error_status(429, retry_after=30)
    client = await routed(group(fakes, allowed_fails=0))
    for i in range(100):
        resp = await post_chat(client, auth_headers, f"chat{i}", user("Hi"), model="claude")
        chunks = await read_all(resp)
        assert chunks[-1] == DONE
        assert not [c for c in chunks if isinstance(c, dict) and c.get("type") == "error"], chunks
    # Whatever the draws, the 429 deployment got one call at most: the first one sent to it cooled it for 30s.
    assert len(fakes[1].requests) <= 1
    assert len(fakes[0].requests) == 100
    recs = await records(client)
    answered = [r for r in recs if r["answered"]]
    failed = [r for r in recs if not r["answered"]]
    assert len(answered) == 100 and all(r["deployment"] == "claude/team-1" for r in answered)
    assert len(failed) == len(fakes[1].requests)
    for r in failed:  # the failed attempt: its own record, nothing billed
        assert r["deployment"] == "claude/team-2" and r["error"] == "RATE_LIMITED" and r["totalCost"] == 0
    # Reports per deployment: /api/usage?by=deployment and `agentspace usage --by-deployment`.
    resp = await client.get("/api/usage?by=deployment", headers=auth_headers)
    per = (await resp.json())["perDeployment"]
    assert per["claude/team-1"]["requestCount"] == 100
    result = CliRunner().invoke(main, ["usage", "--by-deployment", "--json"], catch_exceptions=False)
    assert json.loads(result.output)["perDeployment"]["claude/team-1"]["requestCount"] == 100
    table = CliRunner().invoke(main, ["usage", "--by-deployment"]).output
    assert "claude/team-1" in table and "deployment" in table
    state = await deployments(client, auth_headers)
    assert state["claude/team-1"]["state"] == "active" and state["claude/team-1"]["inFlight"] == 0
    if fakes[1].requests:
        cooled = state["claude/team-2"]
        assert cooled["state"] == "cooling" and 0 < cooled["coolingSeconds"] <= 30
        assert cooled["recentErrors"][0]["code"] == "RATE_LIMITED"


async def test_429_every_time_it_is_chosen(
    routed: Callable[..., Awaitable[TestClient]], fakes: list[fa.FakeAnthropic], token: str
) -> None:
    """The 429 deployment weighs 1000 times the other: it is chosen first, and cooled after its first 429."""
    fakes[0].default = fa.error_status(429, retry_after=30)
    client = await routed(group(fakes, weights=[1000, 1], allowed_fails=0))
    api = sdk(client, token)
    for _ in range(100):
        reply = await api.chat.completions.create(model="claude", messages=[{"role": "user", "content": "Hi"}])
        assert reply.choices[0].message.content == fa.DEFAULT_TEXT
    assert len(fakes[0].requests) == 1 and len(fakes[1].requests) == 100
    recs = await records(client)
    assert sum(1 for r in recs if not r["answered"]) == 1 and sum(1 for r in recs if r["answered"]) == 100
    await api.close()


@pytest.mark.parametrize("status", [404, 401])
async def test_a_deployment_without_the_model_or_the_key_moves_on(
    routed: Callable[..., Awaitable[TestClient]], fakes: list[fa.FakeAnthropic], token: str, status: int
) -> None:
    """404 (the deployment's account or region has not its model) and 401 are the deployment's failures, not the
    request's: moved on, on the SDK path and the pass-through, and the deployment cooled."""
    import anthropic

    fakes[0].default = fa.error_status(status)
    client = await routed(group(fakes, weights=[1000, 1], allowed_fails=1))
    api = sdk(client, token)
    reply = await api.chat.completions.create(model="claude", messages=[{"role": "user", "content": "Hi"}])
    assert reply.choices[0].message.content == fa.DEFAULT_TEXT
    ant = anthropic.AsyncAnthropic(api_key=token, base_url=f"http://127.0.0.1:{client.port}", max_retries=0)
    again = await ant.messages.create(model="claude", max_tokens=100, messages=[{"role": "user", "content": "Hi"}])
    assert again.content[0].text == fa.DEFAULT_TEXT  # type: ignore[union-attr]
    await api.chat.completions.create(model="claude", messages=[{"role": "user", "content": "Hi"}])
    assert len(fakes[0].requests) == 2 and len(fakes[1].requests) == 3  # cooled after its second failure
    await api.close()
    await ant.close()


async def test_allowed_fails_counts_before_the_cooldown(
    routed: Callable[..., Awaitable[TestClient]], fakes: list[fa.FakeAnthropic], token: str
) -> None:
    fakes[0].default = fa.error_status(529)
    client = await routed(group(fakes, weights=[1000, 1], allowed_fails=2, cooldown_seconds=60))
    api = sdk(client, token)
    for _ in range(10):
        await api.chat.completions.create(model="claude", messages=[{"role": "user", "content": "Hi"}])
    assert len(fakes[0].requests) == 3  # two failures allowed in a minute; the third cools it down
    await api.close()


async def test_stream_failing_before_its_first_byte_moves(
    routed: Callable[..., Awaitable[TestClient]], fakes: list[fa.FakeAnthropic], token: str
) -> None:
    fakes[0].default = fa.error_status(529)
    client = await routed(group(fakes, weights=[1000, 1], cooldown_seconds=0))
    api = sdk(client, token)
    stream = await api.chat.completions.create(
        model="claude", messages=[{"role": "user", "content": "Hi"}], stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == fa.DEFAULT_TEXT  # one clean answer
    assert len(fakes[0].requests) == 1 and len(fakes[1].requests) == 1
    recs = sorted(await records(client), key=lambda r: r["answered"])
    assert [(r["deployment"], r["answered"], r["error"]) for r in recs] == [
        ("claude/team-1", False, "LLM_ERROR"),
        ("claude/team-2", True, None),
    ]
    await api.close()


async def test_pipeline_stream_cut_after_message_start_moves(
    routed: Callable[..., Awaitable[TestClient]], fakes: list[fa.FakeAnthropic], auth_headers: dict[str, str]
) -> None:
    """The upstream answered (message_start: its input is billed) but no token reached the client: moved."""
    fakes[0].default = fa.text_response("lost").cut_after(1)
    client = await routed(group(fakes, weights=[1000, 1], cooldown_seconds=0))
    chunks = await read_all(await post_chat(client, auth_headers, "c1", user("Hi"), model="claude"))
    text = "".join(c["delta"] for c in chunks if isinstance(c, dict) and c.get("type") == "text-delta")
    assert text == fa.DEFAULT_TEXT and not [c for c in chunks if isinstance(c, dict) and c.get("type") == "error"]
    recs = await records(client)
    assert sorted((r["deployment"], r["error"] is None) for r in recs) == [
        ("claude/team-1", False),
        ("claude/team-2", True),
    ]
    failed = next(r for r in recs if r["deployment"] == "claude/team-1")
    assert failed["answered"] and failed["inputTokens"] > 0  # what the upstream reported is kept


async def test_stream_failing_after_its_first_byte_is_not_moved(
    routed: Callable[..., Awaitable[TestClient]], fakes: list[fa.FakeAnthropic], token: str, auth_headers: Any
) -> None:
    chunks = ["alpha ", "beta ", "gamma ", "delta "]
    fakes[0].default = fa.text_response("".join(chunks), chunks=chunks).cut_after(5)
    client = await routed(group(fakes, weights=[1000, 1], cooldown_seconds=0))
    api = sdk(client, token)
    stream = await api.chat.completions.create(
        model="claude", messages=[{"role": "user", "content": "Hi"}], stream=True
    )
    assert await text_until_error(stream) == "alpha beta "
    # The pipeline (/api/chat) alike: the partial answer and an error, no second deployment.
    resp = await post_chat(client, auth_headers, "c1", user("Hi"), model="claude")
    frames = await read_all(resp)
    assert [c["errorText"] for c in frames if isinstance(c, dict) and c.get("type") == "error"]
    assert len(fakes[0].requests) == 2 and not fakes[1].requests
    recs = await records(client)
    assert len(recs) == 2 and {r["deployment"] for r in recs} == {"claude/team-1"}
    assert all(r["answered"] and r["error"] for r in recs)
    await api.close()


async def test_least_busy_under_40_concurrent_slow_streams(
    routed: Callable[..., Awaitable[TestClient]], fakes: list[fa.FakeAnthropic], token: str
) -> None:
    slow = fa.text_response("one two three four five six", chunks=6).with_delay(0.05)
    for fake in fakes[:2]:
        fake.default = slow
    client = await routed(group(fakes, strategy="least-busy"))
    router = registry(client).router
    api = sdk(client, token)
    spread: list[int] = []

    async def one() -> str:
        stream = await api.chat.completions.create(
            model="claude", messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def watch() -> None:
        while True:
            loads = await router.state.loads(["claude/team-1", "claude/team-2"])
            if loads[0].in_flight + loads[1].in_flight == 40:  # all of them streaming (not the last ones ending)
                spread.append(abs(loads[0].in_flight - loads[1].in_flight))
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    answers = await asyncio.gather(*(one() for _ in range(40)))
    watcher.cancel()
    assert set(answers) == {"one two three four five six"}
    assert len(fakes[0].requests) == len(fakes[1].requests) == 20
    assert spread and max(spread) <= 1, max(spread)
    await api.close()


async def test_rpm_of_a_deployment_is_honoured(
    routed: Callable[..., Awaitable[TestClient]], fakes: list[fa.FakeAnthropic], token: str
) -> None:
    client = await routed(group(fakes, weights=[1000, 1], extra=[{"rpm": 5}]))
    api = sdk(client, token)
    for _ in range(12):
        await api.chat.completions.create(model="claude", messages=[{"role": "user", "content": "Hi"}])
    assert len(fakes[0].requests) == 5 and len(fakes[1].requests) == 7
    await api.close()


async def test_tpm_of_a_deployment_is_honoured(
    routed: Callable[..., Awaitable[TestClient]], fakes: list[fa.FakeAnthropic], token: str
) -> None:
    fakes[0].default = fa.text_response("counted", usage={"input_tokens": 60, "output_tokens": 40})
    client = await routed(group(fakes, weights=[1000, 1], extra=[{"tpm": 250}]))
    api = sdk(client, token)
    for _ in range(6):
        await api.chat.completions.create(model="claude", messages=[{"role": "user", "content": "Hi"}])
    # Calls go to team-1 until its minute holds 250 tokens (as the upstream reported them), then to team-2.
    recs = [r for r in await records(client) if r["deployment"] == "claude/team-1"]
    per_call = recs[0]["inputTokens"] + recs[0]["outputTokens"]
    assert per_call >= 60 and len(fakes[0].requests) == -(-250 // per_call)
    assert len(fakes[0].requests) + len(fakes[1].requests) == 6 and fakes[1].requests
    await api.close()


async def test_lowest_latency_prefers_the_faster_deployment(
    routed: Callable[..., Awaitable[TestClient]], fakes: list[fa.FakeAnthropic], token: str
) -> None:
    # A second before its first event: slower than the other's first call on a loaded machine.
    fakes[0].default = fa.text_response("slow").stall(1.0, after=0)
    config = group(fakes, strategy="lowest-latency")
    config["models"]["groups"]["warm"] = {"deployments": [{"model": MODEL, "key": "team-3", "base_url": fakes[2].url}]}
    client = await routed(config)
    api = sdk(client, token)
    # The gateway's first call imports the Anthropic SDK (seconds on a loaded machine): not in either's measure.
    await api.chat.completions.create(model="warm", messages=[{"role": "user", "content": "Hi"}])
    for _ in range(20):
        stream = await api.chat.completions.create(
            model="claude", messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        [c async for c in stream]
    # Each is measured once (unmeasured deployments go first), then the faster one takes the rest.
    assert len(fakes[0].requests) == 1 and len(fakes[1].requests) == 19
    await api.close()


async def test_fallbacks_after_every_deployment_and_models_list(
    routed: Callable[..., Awaitable[TestClient]],
    fakes: list[fa.FakeAnthropic],
    token: str,
    fake_anthropic: fa.FakeAnthropic,
    auth_headers: dict[str, str],
) -> None:
    for fake in fakes[:2]:
        fake.default = fa.error_status(500)
    fake_anthropic.default = fa.text_response("from the fallback")
    client = await routed(group(fakes, fallbacks=["anthropic/claude-haiku-4-5"]))
    api = sdk(client, token)
    reply = await api.chat.completions.create(model="claude", messages=[{"role": "user", "content": "Hi"}])
    assert reply.choices[0].message.content == "from the fallback"
    recs = await records(client)
    assert sorted((r["deployment"] or "-", r["answered"]) for r in recs) == [
        ("-", True),
        ("claude/team-1", False),
        ("claude/team-2", False),
    ]
    # Now both are cooling down: the fallback straight away, no upstream of the group asked.
    await api.chat.completions.create(model="claude", messages=[{"role": "user", "content": "Hi"}])
    assert len(fakes[0].requests) == len(fakes[1].requests) == 1
    ids = [m.id for m in (await api.models.list()).data]
    assert "claude" in ids
    resp = await client.get("/api/models", headers=auth_headers)
    listed = {m["id"]: m for m in (await resp.json())["models"]}
    assert listed["claude"]["deployments"] == ["claude/team-1", "claude/team-2"]
    await api.close()


async def test_a_turn_tries_no_further_fallback_after_a_400(
    routed: Callable[..., Awaitable[TestClient]],
    fakes: list[fa.FakeAnthropic],
    fake_anthropic: fa.FakeAnthropic,
    auth_headers: dict[str, str],
) -> None:
    """A group's fallback answering 400 ends a chat turn, as on /v1: the request's own fault fails anywhere."""
    fakes[0].default = fa.error_status(500)
    fake_anthropic.enqueue(fa.error_status(400, "messages: bad request"), fa.text_response("not asked"))
    client = await routed(group(fakes, n=1, fallbacks=["anthropic/claude-haiku-4-5", "anthropic/claude-sonnet-4-6"]))
    chunks = await read_all(await post_chat(client, auth_headers, "chat-400", user("Hi"), model="claude"))
    assert chunks[-2]["type"] == "error" and "bad request" in chunks[-2]["errorText"]
    assert len(fakes[0].requests) == 1 and len(fake_anthropic.requests) == 1


async def test_every_deployment_cooling_without_fallbacks(
    routed: Callable[..., Awaitable[TestClient]], fakes: list[fa.FakeAnthropic], token: str
) -> None:
    for fake in fakes[:2]:
        fake.default = fa.error_status(429, retry_after=30)
    client = await routed(group(fakes, n=2))
    api = sdk(client, token)
    for _ in range(2):
        with pytest.raises(openai.RateLimitError) as e:
            await api.chat.completions.create(model="claude", messages=[{"role": "user", "content": "Hi"}])
    # The second call reached neither cooling deployment (a group's only one is spared: test_left_alone3b_outside.py).
    assert len(fakes[0].requests) == len(fakes[1].requests) == 1
    # Whole seconds (RFC 9110's delay-seconds), rounded up: the cooldown's end, not earlier.
    assert e.value.response.headers["retry-after"] in ("29", "30")
    await api.close()


async def test_every_deployment_at_its_rpm_says_so_and_when_one_frees_up(
    routed: Callable[..., Awaitable[TestClient]], fakes: list[fa.FakeAnthropic], token: str
) -> None:
    client = await routed(group(fakes, extra=[{"rpm": 1}, {"rpm": 1}]))
    api = sdk(client, token)
    for _ in range(2):
        await api.chat.completions.create(model="claude", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.RateLimitError) as e:
        await api.chat.completions.create(model="claude", messages=[{"role": "user", "content": "Hi"}])
    assert "at its rate limit" in e.value.message and "cooling" not in e.value.message, e.value.message
    # when the first deployment's minute lets a request go: about a minute after the first call
    assert 1 < int(e.value.response.headers["retry-after"]) <= 60
    claude = anthropic.AsyncAnthropic(api_key=token, base_url=f"http://127.0.0.1:{client.port}", max_retries=0)
    with pytest.raises(anthropic.RateLimitError) as refused:
        await claude.messages.create(model="claude", max_tokens=16, messages=[{"role": "user", "content": "Hi"}])
    assert "at its rate limit" in refused.value.message, refused.value.message
    assert 1 < int(refused.value.response.headers["retry-after"]) <= 60
    assert len(fakes[0].requests) + len(fakes[1].requests) == 2
    await api.close()
    await claude.close()


async def test_websocket_turn_on_a_group(
    routed: Callable[..., Awaitable[TestClient]], fakes: list[fa.FakeAnthropic], token: str
) -> None:
    client = await routed(group(fakes))
    ws = await client.ws_connect("/gateway", headers={"Authorization": f"Bearer {token}"})
    await ws.send_json({"type": "chat.send", "id": "1", "content": "Hi", "model": "claude"})
    frames = []
    while not frames or frames[-1]["type"] not in ("chat.stream.end", "error"):
        frames.append(json.loads((await ws.receive()).data))
    assert frames[-1]["type"] == "chat.stream.end"
    assert "".join(f["delta"] for f in frames if f["type"] == "chat.stream.delta") == fa.DEFAULT_TEXT
    await ws.close()


def test_group_config_is_validated(tmp_path: Path) -> None:
    def bad(groups: dict[str, Any]) -> str:
        with pytest.raises(ConfigError) as e:
            parse_config({"models": {"groups": groups}}, "<test>")
        return str(e.value.message)

    assert "deployments" in bad({"g": {"strategy": "weighted"}})
    assert "strategy" in bad({"g": {"deployments": [{"model": MODEL}], "strategy": "random"}})
    assert "provider/model" in bad({"g": {"deployments": [{"model": "claude"}]}})
    assert "weight" in bad({"g": {"deployments": [{"model": MODEL, "weight": 0}]}})
    assert "unknown key" in bad({"g": {"deployments": [{"model": MODEL, "keys": "x"}]}})
    assert "itself" in bad({"g": {"deployments": [{"model": MODEL}], "fallbacks": ["g"]}})
    # Named as a model a deployment calls (here or in another group): that id would stand for the group.
    assert "name of its own" in bad({MODEL: {"deployments": [{"model": MODEL, "key": "a"}]}})
    assert "name of its own" in bad(
        {MODEL: {"deployments": [{"model": "x/y"}]}, "g": {"deployments": [{"model": MODEL}]}}
    )
    with pytest.raises(ConfigError, match="no price of its own"):
        parse_config({"models": {"groups": {"g": {"deployments": [{"model": MODEL}]}}}, "pricing": {"g": {}}})
    config = parse_config(
        {"models": {"groups": {"g": {"deployments": [{"model": MODEL, "key": "a"}, {"model": MODEL, "key": "a"}]}}}}
    )
    assert [d.id for d in config.groups["g"].deployments] == ["g/a", "g/a-2"]


async def test_deployments_route_is_the_gateway_tokens(
    routed: Callable[..., Awaitable[TestClient]], fakes: list[fa.FakeAnthropic]
) -> None:
    key = CliRunner().invoke(main, ["clients", "add", "alice"], catch_exceptions=False).stdout.strip()
    client = await routed(group(fakes))
    assert (await client.get("/api/deployments")).status == 401
    resp = await client.get("/api/deployments", headers={"Authorization": f"Bearer {key}"})
    assert resp.status == 403


async def deployments(client: TestClient, headers: dict[str, str]) -> dict[str, Any]:
    resp = await client.get("/api/deployments", headers=headers)
    assert resp.status == 200
    return {d["id"]: d for d in (await resp.json())["deployments"]}


async def test_a_429_cools_the_deployment_on_every_replica(
    tmp_path: Path,
    fakes: list[fa.FakeAnthropic],
    fake_anthropic: fa.FakeAnthropic,
    pg_dsn: str,
    redis_srv: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two `agentspace serve` replicas on one PostgreSQL and one Redis: the deployment that answered 429 with
    Retry-After: 30 to one of them gets no call from either during the cooldown; a deployment's rpm is its own,
    not each replica's; the per-deployment report (PostgreSQL's) has the tokens the upstreams reported."""
    from scripts.harness import GatewayProcess
    from tests.scale_servers import TOKEN, flush_redis

    monkeypatch.setenv("AGENTSPACE_GATEWAY_TOKEN", TOKEN)
    await flush_redis(redis_srv)
    fakes[0].default = fa.text_response(usage={"input_tokens": 12}, delta_usages=[{"output_tokens": 5}])
    fakes[1].default = fa.error_status(429, retry_after=30)
    deployments_ = [{"model": MODEL, "key": f"team-{i + 1}", "base_url": fakes[i].url, "weight": 1} for i in range(2)]
    limited = [
        {"model": MODEL, "key": "team-3", "base_url": fakes[2].url, "weight": 1000, "rpm": 5},
        {"model": MODEL, "key": "team-1", "base_url": fakes[0].url, "weight": 1},
    ]
    storage = {"backend": "postgres", "dsn": pg_dsn, "redis_url": redis_srv.url}
    servers = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir(mode=0o700)
        vault = KeyVault(tmp_path / name)
        for key_name, key in KEYS.items():
            vault.set(key_name, key)
        servers.append(
            GatewayProcess(
                tmp_path / name,
                fake_anthropic.url,
                storage=storage,
                **{
                    'models.groups."claude"': {"deployments": deployments_, "allowed_fails": 0},
                    'models.groups."limited"': {"deployments": limited},
                },
            )
        )
    try:
        await asyncio.gather(*(s.start() for s in servers))
        apis = [openai.AsyncOpenAI(api_key=TOKEN, base_url=f"{s.url}/v1", max_retries=0) for s in servers]

        async def one(n: int) -> str:
            reply = await apis[n % 2].chat.completions.create(
                model="claude", messages=[{"role": "user", "content": "Hi"}]
            )
            return reply.choices[0].message.content or ""

        answers = [await one(n) for n in range(100)]
        assert answers == [fa.DEFAULT_TEXT] * 100
        assert len(fakes[1].requests) == 1 and len(fakes[0].requests) == 100
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            async with http.get(f"{servers[1].url}/api/usage?by=deployment") as resp:
                per = (await resp.json())["perDeployment"]
        assert {
            k: (v["requestCount"], v["errorCount"], v["inputTokens"], v["outputTokens"]) for k, v in per.items()
        } == {
            "claude/team-1": (100, 0, 1200, 500),
            "claude/team-2": (0, 1, 0, 0),  # the failed attempt: an error, not a request
        }
        args = ["--config", str(servers[0].config_path), "usage", "--by-deployment", "--json"]
        cli = await asyncio.to_thread(CliRunner().invoke, main, args, catch_exceptions=False)  # it runs its own loop
        assert json.loads(cli.output)["perDeployment"] == per
        # rpm 5 on the deployment both replicas prefer: 5 calls in the minute across both, the rest elsewhere.
        for n in range(12):
            reply = await apis[n % 2].chat.completions.create(
                model="limited", messages=[{"role": "user", "content": "Hi"}]
            )
            assert reply.choices[0].message.content == fa.DEFAULT_TEXT
        assert len(fakes[2].requests) == 5 and len(fakes[0].requests) == 107
        for api in apis:
            await api.close()
    finally:
        for server in servers:
            if server.process is not None and server.process.returncode is None:
                await server.terminate()


async def test_metrics_count_calls_per_deployment(
    routed: Callable[..., Awaitable[TestClient]],
    fakes: list[fa.FakeAnthropic],
    token: str,
    auth_headers: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from agentspace.plugins import create_plugin_manager
    from tests.test_metrics import delta, scrape

    monkeypatch.setenv("AGENTSPACE_LOAD_PLUGINS", "metrics")
    fakes[0].default = fa.error_status(529)
    client = await routed(group(fakes, weights=[1000, 1], cooldown_seconds=0), pm=create_plugin_manager())
    before = await scrape(client, auth_headers)
    api = sdk(client, token)
    for _ in range(3):
        await api.chat.completions.create(model="claude", messages=[{"role": "user", "content": "Hi"}])
    after = await scrape(client, auth_headers)
    calls = delta(after, before, "agentspace_deployment_calls_total")
    assert calls == {
        (("deployment", "claude/team-1"), ("outcome", "LLM_ERROR")): 3,
        (("deployment", "claude/team-2"), ("outcome", "answered")): 3,
    }
    assert not delta(after, before, "agentspace_fallbacks_total")  # a group's deployment is no fallback
    await api.close()


def test_keys_add_with_a_name_stores_a_named_entry(isolated_env: Path) -> None:
    result = CliRunner().invoke(main, ["keys", "add", "anthropic", "--name", "team-2"], input="sk-ant-second\n")
    assert result.exit_code == 0, result.output
    assert KeyVault(isolated_env).get("team-2") == "sk-ant-second"
    assert KeyVault(isolated_env).get("anthropic") is None
    bad = CliRunner().invoke(main, ["keys", "add", "anthropic", "--name", "no spaces"], input="x\n")
    assert bad.exit_code != 0 and "--name" in bad.output


async def test_anthropic_pass_through_over_a_group(
    routed: Callable[..., Awaitable[TestClient]], fakes: list[fa.FakeAnthropic], token: str
) -> None:
    """/v1/messages with a group of Anthropic deployments: passed through with each deployment's key, moved
    on a 429 before anything was written, one clean stream for the client (the anthropic SDK)."""
    import anthropic

    fakes[0].default = fa.error_status(429, retry_after=30)
    client = await routed(group(fakes, weights=[1000, 1], allowed_fails=0))
    sdk_ = anthropic.AsyncAnthropic(api_key=token, base_url=f"http://127.0.0.1:{client.port}", max_retries=0)
    async with sdk_.messages.stream(
        model="claude", max_tokens=100, messages=[{"role": "user", "content": "Hi"}]
    ) as stream:
        text = "".join([t async for t in stream.text_stream])
    assert text == fa.DEFAULT_TEXT
    assert [r.api_key for r in fakes[0].requests] == [KEYS["team-1"]]
    assert [r.api_key for r in fakes[1].requests] == [KEYS["team-2"]]
    assert fakes[1].requests[0].body["model"] == "claude-sonnet-4-5"  # the deployment's model, upstream's id
    again = await sdk_.messages.create(model="claude", max_tokens=100, messages=[{"role": "user", "content": "Hi"}])
    assert again.content[0].text == fa.DEFAULT_TEXT  # type: ignore[union-attr]
    assert len(fakes[0].requests) == 1  # cooling down: not asked again
    recs = await records(client)
    assert sorted((r["deployment"], r["answered"]) for r in recs) == [
        ("claude/team-1", False),
        ("claude/team-2", True),
        ("claude/team-2", True),
    ]
    await sdk_.close()


async def test_a_clients_budget_sees_every_attempt_settled(
    routed: Callable[..., Awaitable[TestClient]], fakes: list[fa.FakeAnthropic], auth_headers: dict[str, str]
) -> None:
    """A client key on a group: the failed attempt bills nothing and holds nothing; the spend is the answer's."""
    key = CliRunner().invoke(main, ["clients", "add", "alice", "--budget", "5"], catch_exceptions=False)
    key_ = key.stdout.strip()
    fakes[0].default = fa.error_status(503)
    client = await routed(group(fakes, weights=[1000, 1], cooldown_seconds=0))
    chunks = await read_all(
        await post_chat(client, {"Authorization": f"Bearer {key_}"}, "c1", user("Hi"), model="claude")
    )
    assert chunks[-1] == DONE
    recs = await records(client)
    assert sorted((r["deployment"], r["answered"], r["client"]) for r in recs) == [
        ("claude/team-1", False, "alice"),
        ("claude/team-2", True, "alice"),
    ]
    resp = await client.get("/api/clients/alice", headers=auth_headers)
    spend = (await resp.json())["client"]["spend"]["usd"]
    assert spend == pytest.approx(sum(r["totalCost"] for r in recs)) and spend > 0
    assert len(registry(client).ledger) == 0  # each attempt's entry settled by its own record


async def test_a_bad_request_does_not_cool_a_deployment(
    routed: Callable[..., Awaitable[TestClient]], fakes: list[fa.FakeAnthropic], token: str, auth_headers: Any
) -> None:
    """A 400 is the request's fault: answered as it is, not moved, and not counted against the deployment."""
    fakes[0].enqueue(fa.error_status(400), fa.error_status(400))
    client = await routed(group(fakes, weights=[1000, 1], allowed_fails=0))
    api = sdk(client, token)
    with pytest.raises(openai.BadRequestError):
        await api.chat.completions.create(model="claude", messages=[{"role": "user", "content": "Hi"}])
    frames = await read_all(await post_chat(client, auth_headers, "c1", user("Hi"), model="claude"))
    assert [c for c in frames if isinstance(c, dict) and c.get("type") == "error"]
    assert not fakes[1].requests  # not moved
    state = await deployments(client, auth_headers)
    assert state["claude/team-1"]["state"] == "active" and state["claude/team-1"]["inFlight"] == 0
    reply = await api.chat.completions.create(model="claude", messages=[{"role": "user", "content": "Hi"}])
    assert reply.choices[0].message.content == fa.DEFAULT_TEXT and len(fakes[0].requests) == 3
    await api.close()


async def test_a_deployment_whose_key_is_not_in_the_vault_sends_no_other_key(
    routed: Callable[..., Awaitable[TestClient]],
    fakes: list[fa.FakeAnthropic],
    token: str,
    auth_headers: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A deployment naming a vault entry that is missing fails (NO_API_KEY, recorded, moved on): its upstream
    never gets the provider's own key (here ANTHROPIC_API_KEY is set), which would bill another account."""
    import anthropic

    fakes[0].api_key = None  # it would take any key: none must reach it
    client = await routed(group(fakes, weights=[1000, 1], cooldown_seconds=0, extra=[{"key": "team-9"}]))
    # Said at start, with the fix.
    assert "agentspace keys add anthropic --name team-9" in caplog.text
    api = sdk(client, token)
    reply = await api.chat.completions.create(model="claude", messages=[{"role": "user", "content": "Hi"}])
    assert reply.choices[0].message.content == fa.DEFAULT_TEXT
    sdk_ = anthropic.AsyncAnthropic(api_key=token, base_url=f"http://127.0.0.1:{client.port}", max_retries=0)
    again = await sdk_.messages.create(model="claude", max_tokens=100, messages=[{"role": "user", "content": "Hi"}])
    assert again.content[0].text == fa.DEFAULT_TEXT  # type: ignore[union-attr]
    chunks = await read_all(await post_chat(client, auth_headers, "c1", user("Hi"), model="claude"))
    assert chunks[-1] == DONE
    assert not fakes[0].requests
    recs = await records(client)
    assert sorted((r["deployment"], r["answered"], r["error"]) for r in recs) == [
        ("claude/team-2", True, None),
        ("claude/team-2", True, None),
        ("claude/team-2", True, None),
        ("claude/team-9", False, "NO_API_KEY"),
        ("claude/team-9", False, "NO_API_KEY"),
        ("claude/team-9", False, "NO_API_KEY"),
    ]
    assert len(registry(client).ledger) == 0
    await api.close()
    await sdk_.close()


async def test_count_tokens_on_a_group_asks_a_deployments_upstream(
    routed: Callable[..., Awaitable[TestClient]], fakes: list[fa.FakeAnthropic], token: str
) -> None:
    """/v1/messages/count_tokens with a group's name: the count of a deployment's upstream, with its key and
    model, as for a plain model (the anthropic SDK); an upstream without the endpoint passes to the next."""
    import anthropic

    fakes[0].count_tokens, fakes[1].count_tokens = 17, 33
    client = await routed(group(fakes, weights=[1000, 1]))
    sdk_ = anthropic.AsyncAnthropic(api_key=token, base_url=f"http://127.0.0.1:{client.port}", max_retries=0)
    messages: Any = [{"role": "user", "content": "Hi"}]
    assert (await sdk_.messages.count_tokens(model="claude", messages=messages)).input_tokens == 17
    assert [(r.api_key, r.body["model"]) for r in fakes[0].count_requests] == [(KEYS["team-1"], "claude-sonnet-4-5")]
    fakes[0].count_tokens = None  # this one answers 404: the next deployment's count
    raw = await sdk_.messages.with_raw_response.count_tokens(model="claude", messages=messages)
    assert (await raw.parse()).input_tokens == 33 and raw.headers.get("x-agentspace-estimated") is None
    assert [r.api_key for r in fakes[1].count_requests] == [KEYS["team-2"]]
    assert not await records(client)  # a count is no call
    await sdk_.close()


async def test_a_mixed_group_on_every_transport_and_endpoint(
    routed: Callable[..., Awaitable[TestClient]],
    fakes: list[fa.FakeAnthropic],
    fake_openai: fo.FakeOpenAI,
    token: str,
    auth_headers: dict[str, str],
) -> None:
    """A group of an Anthropic deployment and an OpenAI one (through litellm), each with its own vault key,
    asked by name on the WebSocket, /api/chat, /v1/chat/completions, /v1/responses and /v1/messages (the
    translated path: not every deployment is Anthropic's), streamed and not. Every call is one record naming
    the deployment that answered, with the tokens that deployment's upstream reported, priced at its model's
    price."""
    import anthropic

    oai_key = "sk-oai-team-0123456789abcdef"
    fake_openai.api_key = oai_key
    CliRunner().invoke(main, ["keys", "add", "openai", "--name", "oai"], input=f"{oai_key}\n", catch_exceptions=False)
    fakes[0].default = fa.text_response(
        "from anthropic", usage={"input_tokens": 31}, delta_usages=[{"output_tokens": 7}]
    )
    fake_openai.default = fo.text_response("from openai", usage=fo.usage(41, 9))
    prices = {MODEL: (3.0, 15.0), "openai/gpt-4o-mini": (0.5, 2.0)}
    config = {
        "models": {
            "groups": {
                "mixed": {
                    "deployments": [
                        {"model": MODEL, "key": "team-1", "base_url": fakes[0].url},
                        {"model": "openai/gpt-4o-mini", "key": "oai", "base_url": fake_openai.url},
                    ]
                }
            }
        },
        "pricing": {m: {"input_per_mtok": i, "output_per_mtok": o} for m, (i, o) in prices.items()},
    }
    client = await routed(config)
    api = sdk(client, token)
    ant = anthropic.AsyncAnthropic(api_key=token, base_url=f"http://127.0.0.1:{client.port}", max_retries=0)
    answers = {"from anthropic", "from openai"}
    msgs: Any = [{"role": "user", "content": "Hi"}]
    calls = 0
    for _ in range(3):
        reply = await api.chat.completions.create(model="mixed", messages=msgs)
        assert reply.choices[0].message.content in answers and reply.model == "mixed"
        stream = await api.chat.completions.create(model="mixed", messages=msgs, stream=True)
        assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) in answers
        response = await api.responses.create(model="mixed", input="Hi")
        assert response.output_text in answers
        events = await api.responses.create(model="mixed", input="Hi", stream=True)
        assert "".join([e.delta async for e in events if e.type == "response.output_text.delta"]) in answers
        message = await ant.messages.create(model="mixed", max_tokens=100, messages=msgs)
        assert message.content[0].text in answers  # type: ignore[union-attr]
        async with ant.messages.stream(model="mixed", max_tokens=100, messages=msgs) as s:
            assert "".join([t async for t in s.text_stream]) in answers
        chunks = await read_all(await post_chat(client, auth_headers, f"c{calls}", user("Hi"), model="mixed"))
        text = "".join(c["delta"] for c in chunks if isinstance(c, dict) and c.get("type") == "text-delta")
        assert text in answers and chunks[-1] == DONE
        ws = await client.ws_connect("/gateway", headers={"Authorization": f"Bearer {token}"})
        await ws.send_json({"type": "chat.send", "id": "1", "content": "Hi", "model": "mixed"})
        frames: list[dict[str, Any]] = []
        while not frames or frames[-1]["type"] not in ("chat.stream.end", "error"):
            frames.append(json.loads((await ws.receive()).data))
        assert frames[-1]["type"] == "chat.stream.end"
        assert "".join(f["delta"] for f in frames if f["type"] == "chat.stream.delta") in answers
        await ws.close()
        calls += 8
    assert [r.api_key for r in fakes[0].requests] == [KEYS["team-1"]] * len(fakes[0].requests)
    assert {r.headers.get("authorization") for r in fake_openai.requests} == {f"Bearer {oai_key}"}
    assert len(fakes[0].requests) + len(fake_openai.requests) == calls
    assert fakes[0].requests and fake_openai.requests  # 24 draws at 1:1: both were chosen
    recs = await records(client)
    assert len(recs) == calls and all(r["answered"] and not r["error"] for r in recs)
    reported = {"mixed/team-1": (MODEL, 31, 7), "mixed/oai": ("openai/gpt-4o-mini", 41, 9)}
    for r in recs:
        model, inp, out = reported[r["deployment"]]
        assert (r["model"], r["inputTokens"], r["outputTokens"]) == (model, inp, out)
        assert r["totalCost"] == pytest.approx((inp * prices[model][0] + out * prices[model][1]) / 1e6)
    per = {d: sum(1 for r in recs if r["deployment"] == d) for d in reported}
    assert per == {"mixed/team-1": len(fakes[0].requests), "mixed/oai": len(fake_openai.requests)}
    await api.close()
    await ant.close()


async def test_a_deployment_that_times_out_is_cooled_and_the_call_moves(
    routed: Callable[..., Awaitable[TestClient]], fakes: list[fa.FakeAnthropic], token: str, auth_headers: Any
) -> None:
    """An upstream that answers nothing ([providers.anthropic] timeout_seconds passes) fails the attempt like a
    5xx: recorded with answered false, counted against the deployment (cooled past ``allowed_fails``), the call
    answered by the next one: on the pass-through, the SDK path (/v1/chat/completions), and /api/chat."""
    import anthropic

    fakes[0].default = fa.text_response("too late").silent_for(30)
    client = await routed(
        group(fakes, weights=[1000, 1], allowed_fails=1, cooldown_seconds=60),
        providers={"anthropic": {"timeout_seconds": 1.0}},
    )
    ant = anthropic.AsyncAnthropic(api_key=token, base_url=f"http://127.0.0.1:{client.port}", max_retries=0)
    async with ant.messages.stream(model="claude", max_tokens=100, messages=[{"role": "user", "content": "Hi"}]) as s:
        assert "".join([t async for t in s.text_stream]) == fa.DEFAULT_TEXT
    assert (await deployments(client, auth_headers))["claude/team-1"]["state"] == "active"  # one failure allowed
    api = sdk(client, token)
    reply = await api.chat.completions.create(model="claude", messages=[{"role": "user", "content": "Hi"}])
    assert reply.choices[0].message.content == fa.DEFAULT_TEXT
    state = (await deployments(client, auth_headers))["claude/team-1"]
    assert state["state"] == "cooling" and state["coolingSeconds"] > 50
    # Cooling: the next call goes to team-2 straight away.
    assert (await read_all(await post_chat(client, auth_headers, "c1", user("Hi"), model="claude")))[-1] == DONE
    assert len(fakes[0].requests) == 2 and len(fakes[1].requests) == 3
    recs = await records(client)
    assert (
        sorted((r["deployment"], r["answered"]) for r in recs)
        == [("claude/team-1", False)] * 2 + [("claude/team-2", True)] * 3
    )
    assert len(registry(client).ledger) == 0  # every attempt's entry settled by its record
    await api.close()
    await ant.close()


async def test_embeddings_on_a_group_of_embedding_deployments(
    routed: Callable[..., Awaitable[TestClient]], fakes: list[fa.FakeAnthropic], token: str, isolated_env: Path
) -> None:
    """/v1/embeddings with a group's name: each attempt on a deployment with its own key, a 5xx moved on and
    cooled, one record per attempt with the tokens the upstream reported; a group with a deployment that has no
    embeddings is a 400."""
    keys = {"emb-1": "sk-emb-one-0123456789", "emb-2": "sk-emb-two-0123456789"}
    ups = [await fo.FakeOpenAI(api_key=k).start() for k in keys.values()]
    try:
        for name, key in keys.items():
            KeyVault(isolated_env).set(name, key)
        ups[0].default = fo.error_status(503)
        ups[1].embedding_tokens = 17
        embed = "openai/text-embedding-3-small"
        deps = [{"model": embed, "key": k, "base_url": u.url, "weight": w} for k, u, w in zip(keys, ups, (1000, 1))]
        claude = group(fakes)["models"]["groups"]["claude"]
        config = {"models": {"groups": {"vectors": {"deployments": deps, "allowed_fails": 0}, "claude": claude}}}
        client = await routed(config)
        api = sdk(client, token)
        for _ in range(2):
            result = await api.embeddings.create(model="vectors", input=["one two", "three"])
            assert len(result.data) == 2 and result.usage.prompt_tokens == 17 and result.model == "vectors"
        assert len(ups[0].requests) == 1 and len(ups[1].requests) == 2  # cooled after its 503
        assert ups[1].requests[0].headers["authorization"] == f"Bearer {keys['emb-2']}"
        recs = await records(client)
        assert sorted((r["deployment"], r["answered"], r["inputTokens"], r["endpoint"]) for r in recs) == [
            ("vectors/emb-1", False, 0, "embeddings"),
            ("vectors/emb-2", True, 17, "embeddings"),
            ("vectors/emb-2", True, 17, "embeddings"),
        ]
        assert len(registry(client).ledger) == 0
        with pytest.raises(openai.BadRequestError, match="no embeddings"):
            await api.embeddings.create(model="claude", input="one")
        await api.close()
    finally:
        for up in ups:
            await up.close()


async def test_allowlists_match_the_name_asked_for(
    routed: Callable[..., Awaitable[TestClient]], fakes: list[fa.FakeAnthropic]
) -> None:
    """A client allowed only the group uses it (whatever its deployments) but not a deployment's model by its
    id; a client allowed only that model may not use the group; /v1/models lists what each may use."""
    import anthropic

    def add(name: str, models: str) -> str:
        out = CliRunner().invoke(main, ["clients", "add", name, "--models", models], catch_exceptions=False)
        return out.stdout.strip()

    only_group, only_model = add("group-only", "claude"), add("model-only", MODEL)
    client = await routed(group(fakes))
    msgs: Any = [{"role": "user", "content": "Hi"}]
    api = sdk(client, only_group)
    assert (await api.chat.completions.create(model="claude", messages=msgs)).choices[0].message.content
    with pytest.raises(openai.PermissionDeniedError, match="MODEL_NOT_ALLOWED"):
        await api.chat.completions.create(model=MODEL, messages=msgs)
    assert [m.id for m in (await api.models.list()).data] == ["claude"]
    other = sdk(client, only_model)
    with pytest.raises(openai.PermissionDeniedError, match="MODEL_NOT_ALLOWED"):
        await other.chat.completions.create(model="claude", messages=msgs)
    ant = anthropic.AsyncAnthropic(api_key=only_model, base_url=f"http://127.0.0.1:{client.port}", max_retries=0)
    with pytest.raises(anthropic.PermissionDeniedError):
        await ant.messages.create(model="claude", max_tokens=10, messages=msgs)  # the pass-through alike
    resp = await post_chat(client, {"Authorization": f"Bearer {only_model}"}, "c1", user("Hi"), model="claude")
    assert resp.status == 403 and (await resp.json())["error"]["code"] == "MODEL_NOT_ALLOWED"
    assert "claude" not in [m.id for m in (await other.models.list()).data]
    recs = await records(client)
    assert [(r["client"], r["deployment"]) for r in recs if r["answered"]] == [
        ("group-only", recs[0]["deployment"])
    ] and len(recs) == 1
    await api.close()
    await other.close()
    await ant.close()


def test_agentspace_models_lists_the_groups(tmp_path: Path, isolated_env: Path) -> None:
    from scripts.harness import write_config

    for name, key in KEYS.items():
        KeyVault(isolated_env).set(name, key)
    deps = [{"model": MODEL, "key": "team-1"}, {"model": "anthropic/claude-haiku-4-5", "key": "team-2"}]
    write_config(
        tmp_path / "a.toml",
        {"storage": {"data_dir": str(isolated_env)}, 'models.groups."claude"': {"deployments": deps}},
    )
    listed = CliRunner().invoke(
        main, ["--config", str(tmp_path / "a.toml"), "models", "--json"], catch_exceptions=False
    )
    claude = next(m for m in json.loads(listed.stdout) if m["id"] == "claude")
    assert claude["provider"] == "group" and claude["deployments"] == ["claude/team-1", "claude/team-2"]
    table = CliRunner().invoke(main, ["--config", str(tmp_path / "a.toml"), "models"], catch_exceptions=False).stdout
    assert any(line.split()[:2] == ["claude", "group"] for line in table.splitlines())


async def test_v1_stream_cut_after_message_start_moves(
    routed: Callable[..., Awaitable[TestClient]], fakes: list[fa.FakeAnthropic], token: str
) -> None:
    """On /v1 too: an upstream that answered (message_start) but broke before its first token has relayed
    nothing to the client yet: the call moves, and the client sees one clean stream."""
    fakes[0].default = fa.text_response("lost").cut_after(1)
    client = await routed(group(fakes, weights=[1000, 1], cooldown_seconds=0))
    api = sdk(client, token)
    stream = await api.chat.completions.create(
        model="claude", messages=[{"role": "user", "content": "Hi"}], stream=True
    )
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == fa.DEFAULT_TEXT
    events = await api.responses.create(model="claude", input="Hi", stream=True)
    assert "".join([e.delta async for e in events if e.type == "response.output_text.delta"]) == fa.DEFAULT_TEXT
    assert len(fakes[0].requests) == 2 and len(fakes[1].requests) == 2
    recs = await records(client)
    assert sorted((r["deployment"], r["error"] is None) for r in recs) == [
        ("claude/team-1", False),
        ("claude/team-1", False),
        ("claude/team-2", True),
        ("claude/team-2", True),
    ]
    assert len(registry(client).ledger) == 0
    await api.close()


async def test_a_refused_deployment_key_names_its_vault_entry(
    routed: Callable[..., Awaitable[TestClient]],
    fakes: list[fa.FakeAnthropic],
    token: str,
    auth_headers: Any,
    isolated_env: Path,
) -> None:
    """Every deployment's key refused: the answer says which vault entry to fix (`keys add anthropic --name
    team-1`), not the provider's own key, which the deployment does not use; on /v1, the pass-through and
    /api/chat."""
    import anthropic

    KeyVault(isolated_env).set("team-1", "sk-ant-wrong-0123456789abcdef")
    client = await routed(group(fakes, n=1, cooldown_seconds=0))
    fix = "agentspace keys add anthropic --name team-1"
    with pytest.raises(openai.APIError, match=fix):
        await sdk(client, token).chat.completions.create(model="claude", messages=[{"role": "user", "content": "Hi"}])
    ant = anthropic.AsyncAnthropic(api_key=token, base_url=f"http://127.0.0.1:{client.port}", max_retries=0)
    with pytest.raises(anthropic.APIStatusError, match=fix):
        await ant.messages.create(model="claude", max_tokens=10, messages=[{"role": "user", "content": "Hi"}])
    frames = await read_all(await post_chat(client, auth_headers, "c1", user("Hi"), model="claude"))
    assert [c["errorText"] for c in frames if isinstance(c, dict) and c.get("type") == "error"][0].endswith(fix)
    assert len(fakes[0].requests) == 3
    await ant.close()


async def test_pass_through_group_falls_back(
    routed: Callable[..., Awaitable[TestClient]],
    fakes: list[fa.FakeAnthropic],
    fake_anthropic: fa.FakeAnthropic,
    fake_openai: fo.FakeOpenAI,
    token: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """/v1/messages on a group of Anthropic deployments (the pass-through): once every deployment failed before
    anything was written, the group's fallbacks in order, an Anthropic one passed through and another provider's
    translated; each attempt one record."""
    import anthropic

    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")
    for fake in fakes[:2]:
        fake.default = fa.error_status(529)
    fake_anthropic.default = fa.error_status(500)
    fake_openai.default = fo.text_response("from the second fallback")
    config = group(fakes, fallbacks=["anthropic/claude-haiku-4-5", "openai/gpt-4o-mini"])
    client = await routed(config, providers={"openai": {"base_url": fake_openai.url}})
    ant = anthropic.AsyncAnthropic(api_key=token, base_url=f"http://127.0.0.1:{client.port}", max_retries=0)
    async with ant.messages.stream(model="claude", max_tokens=100, messages=[{"role": "user", "content": "Hi"}]) as s:
        assert "".join([t async for t in s.text_stream]) == "from the second fallback"
    assert len(fakes[0].requests) == len(fakes[1].requests) == len(fake_anthropic.requests) == 1
    recs = await records(client)
    assert sorted((r["model"], r["deployment"] or "-", r["answered"]) for r in recs) == [
        ("anthropic/claude-haiku-4-5", "-", False),
        (MODEL, "claude/team-1", False),
        (MODEL, "claude/team-2", False),
        ("openai/gpt-4o-mini", "-", True),
    ]
    assert len(registry(client).ledger) == 0
    await ant.close()


async def test_a_plain_models_fallback_may_be_a_group(
    routed: Callable[..., Awaitable[TestClient]],
    fakes: list[fa.FakeAnthropic],
    fake_anthropic: fa.FakeAnthropic,
    auth_headers: dict[str, str],
) -> None:
    """``[models] fallbacks`` naming a group (a group name works wherever a model id does): the turn goes on to
    the group's deployments, each with its own key, and is not sent upstream as a model called "claude"."""
    fake_anthropic.default = fa.error_status(500)
    settings = group(fakes)
    settings["models"]["fallbacks"] = {"anthropic/claude-haiku-4-5": ["claude"]}
    client = await routed(settings, chat={"max_retries": 0})
    chunks = await read_all(await post_chat(client, auth_headers, "c1", user("Hi"), model="anthropic/claude-haiku-4-5"))
    assert chunks[-1] == DONE
    assert not [c for c in chunks if isinstance(c, dict) and c.get("type") == "error"], chunks
    text = "".join(c["delta"] for c in chunks if isinstance(c, dict) and c.get("type") == "text-delta")
    assert text == fa.DEFAULT_TEXT
    assert len(fakes[0].requests) + len(fakes[1].requests) == 1
    recs = await records(client)
    assert sorted((r["model"], r["deployment"] or "-", r["answered"]) for r in recs) == [
        ("anthropic/claude-haiku-4-5", "-", False),
        (MODEL, next(r["deployment"] for r in recs if r["answered"]), True),
    ]
    assert {r["deployment"] for r in recs if r["answered"]} <= {"claude/team-1", "claude/team-2"}


async def test_a_groups_context_window_is_its_smallest_deployments(
    routed: Callable[..., Awaitable[TestClient]], fakes: list[fa.FakeAnthropic], auth_headers: dict[str, str]
) -> None:
    """A context is fitted to the window of every deployment it may go to (the one `/api/models` lists for the
    group), not the dearest deployment's: else a call drawn to the smaller one is sent over its window."""
    small = "anthropic/claude-haiku-4-5"
    settings = group(fakes, extra=[{}, {"model": small}])
    settings["chat"] = {"context_policy": "refuse"}
    settings["pricing"] = {small: {"context_window": 8_000, "max_output_tokens": 1_000}}
    client = await routed(settings)
    listed = {m["id"]: m for m in (await (await client.get("/api/models", headers=auth_headers)).json())["models"]}
    assert listed["claude"]["contextWindow"] == 8_000
    assert listed["claude"]["maxOutputTokens"] == 1_000  # what every deployment can give, as a model lists it
    # Past the smaller window less its 1,000 output tokens, far within the other's.
    message = {"id": "m1", "role": "user", "parts": [{"type": "text", "text": "word " * 7_500}]}
    resp = await client.post(
        "/api/chat", json={"id": "big", "messages": [message], "model": "claude"}, headers=auth_headers
    )
    text = await resp.text()
    assert resp.status == 413, text[-300:]
    assert json.loads(text)["error"]["code"] == "CONTEXT_TOO_LONG"
    assert not fakes[0].requests and not fakes[1].requests  # nothing sent to either deployment


async def test_a_fallback_group_the_client_may_not_use_is_skipped_on_every_endpoint(
    routed: Callable[..., Awaitable[TestClient]], fakes: list[fa.FakeAnthropic]
) -> None:
    """Each fallback is checked on its own (docs/routing.md), a group among them too: a client allowed only
    `claude` does not get its fallback group `premium` on /v1 any more than on /api/chat."""
    out = CliRunner().invoke(main, ["clients", "add", "alice", "--models", "claude"], catch_exceptions=False)
    key = out.stdout.strip()
    fakes[0].default = fa.error_status(500)
    fakes[1].default = fa.text_response("from premium")
    settings = group(fakes, n=1, fallbacks=["premium"], cooldown_seconds=0)
    premium = [{"model": MODEL, "key": "team-2", "base_url": fakes[1].url}]
    settings["models"]["groups"]["premium"] = {"deployments": premium}
    client = await routed(settings)
    chunks = await read_all(
        await post_chat(client, {"Authorization": f"Bearer {key}"}, "c1", user("Hi"), model="claude")
    )
    assert [c for c in chunks if isinstance(c, dict) and c.get("type") == "error"], chunks
    api = sdk(client, key)
    with pytest.raises(openai.InternalServerError):
        await api.chat.completions.create(model="claude", messages=[{"role": "user", "content": "Hi"}])
    assert not fakes[1].requests  # premium was never called for alice
    assert all(r["deployment"] != "premium/team-2" for r in await records(client))
    await api.close()


async def test_groups_falling_back_to_each_other_without_any_key(
    routed: Callable[..., Awaitable[TestClient]], fakes: list[fa.FakeAnthropic], auth_headers: dict[str, str]
) -> None:
    """Two groups each the other's fallback, no deployment's vault entry there: the turn is answered
    NO_API_KEY naming an entry, as for one group (the key check before a turn follows each fallback once)."""
    deps = [{"model": MODEL, "key": "missing-1", "base_url": fakes[0].url}]
    others = [{"model": MODEL, "key": "missing-2", "base_url": fakes[1].url}]
    client = await routed(
        {
            "models": {
                "groups": {
                    "claude": {"deployments": deps, "fallbacks": ["other"]},
                    "other": {"deployments": others, "fallbacks": ["claude"]},
                }
            }
        }
    )
    resp = await post_chat(client, auth_headers, "c1", user("Hi"), model="claude")
    text = await resp.text()
    assert "NO_API_KEY" in text or "keys add anthropic --name missing-" in text, (resp.status, text[-500:])
    assert not fakes[0].requests and not fakes[1].requests
