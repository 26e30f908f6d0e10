"""Issue 30 (model groups) tried from outside once more: the official SDKs against a running gateway, fake
upstreams answering as providers do under load (docs/routing.md)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anthropic
import openai
import pytest
from aiohttp.test_utils import TestClient
from click.testing import CliRunner

from agentspace.cli import main
from agentspace.config import load_config
from agentspace.providers.litellm import litellm_usable
from agentspace.redis_routing import RedisRouteState
from agentspace.routing import LocalRouteState, Router, RouteState, parse_groups
from scripts.harness import GatewayProcess
from tests.conftest import wait_until
from tests.fakes import anthropic_upstream as fa
from tests.fakes import openai_upstream as fo
from tests.support.ws import receive
from tests.test_routing import KEYS, MODEL, deployments, fakes, group, records, routed, sdk  # noqa: F401
from tests.test_routing_mixed import OAI_KEY, add_key, mixed


@pytest.mark.parametrize("status", [503, 529])
async def test_a_server_error_with_retry_after_cools_the_deployment_for_it(
    routed: Callable[..., Awaitable[TestClient]],  # noqa: F811
    fakes: list[fa.FakeAnthropic],  # noqa: F811
    fake_openai: fo.FakeOpenAI,
    token: str,
    auth_headers: dict[str, str],
    status: int,
) -> None:
    """docs/routing.md: past allowed_fails a deployment cools down "for the upstream's Retry-After (when it sent
    one) or cooldown_seconds", for a 529 or a 5xx as for a 429. The translated path took it from 429s only."""
    fake_openai.api_key = OAI_KEY
    add_key("oai", OAI_KEY)
    fake_openai.default = fo.error_status(503, retry_after=40)  # the litellm deployment
    kind = "overloaded_error" if status == 529 else "api_error"
    fakes[0].default = fa.error_status(status, type=kind, retry_after=40)  # the Anthropic one
    client = await routed(mixed(fake_openai.url, fakes[0].url, cooldown_seconds=1))
    api = sdk(client, token)
    with pytest.raises(openai.APIStatusError):
        await api.chat.completions.create(model="mixed", messages=[{"role": "user", "content": "Hi"}])
    assert len(fake_openai.requests) == 1 and len(fakes[0].requests) == 1
    state = await deployments(client, auth_headers)
    for dep in ("mixed/oai", "mixed/team-1"):
        assert state[dep]["state"] == "cooling"
        assert state[dep]["coolingSeconds"] > 30, (dep, state[dep])  # the upstream's 40 s, not the group's 1 s
    await api.close()


async def test_the_sdks_retrieve_a_group_that_v1_models_lists(
    routed: Callable[..., Awaitable[TestClient]],  # noqa: F811
    fakes: list[fa.FakeAnthropic],  # noqa: F811
    token: str,
) -> None:
    """/v1/models lists the group; models.retrieve of that id answered 404 model_not_found in both SDKs (the id
    was read as a bare model id, which "claude" is not)."""
    client = await routed(group(fakes))
    api = sdk(client, token)
    assert [m.id for m in (await api.models.list()).data if m.owned_by == "group"] == ["claude"]
    got = await api.models.retrieve("claude")
    assert (got.id, got.owned_by) == ("claude", "group")
    await api.close()
    claude = anthropic.AsyncAnthropic(api_key=token, base_url=f"http://127.0.0.1:{client.port}", max_retries=0)
    info = await claude.models.retrieve("claude")
    assert (info.id, info.max_input_tokens) == ("claude", 200_000)
    await claude.close()


@pytest.mark.parametrize("where", ["process", "redis"])
async def test_lowest_latency_measures_again_a_deployment_one_slow_call_put_last(
    request: pytest.FixtureRequest, where: str
) -> None:
    """lowest-latency tries the fastest average first, so a deployment whose first call was slow (a cold
    connection, a moment of load) was never chosen again while the other answered, and its average never
    mended: every call went to one deployment for the life of the process (a day in Redis). An average not
    measured for the lapse is forgotten: the deployment goes first again, and its next call is its measure."""
    groups = parse_groups(
        "<test>",
        {
            "g": {
                "strategy": "lowest-latency",
                "deployments": [{"model": MODEL, "key": "a"}, {"model": MODEL, "key": "b"}],
            }
        },
    )
    client = None
    if where == "redis":
        import redis.asyncio as aioredis

        client = aioredis.from_url(request.getfixturevalue("redis_srv").url)
        await client.flushall()
        route_state: RouteState = RedisRouteState(client, latency_ttl=1.0)
    else:
        route_state = LocalRouteState(latency_ttl=1.0)
    router = Router(groups, route_state)
    group = groups["g"]
    for id, ttft in (("g/a", 900.0), ("g/b", 30.0)):  # a's first call was slow
        assert await route_state.take(id, None)
        await route_state.done(id, 100, ttft)
    deadline = time.monotonic() + 30
    while True:
        order, _ = await router.order(group)
        if order[0].id == "g/a":
            break
        assert time.monotonic() < deadline, "the slow first measurement kept g/a last for good"
        assert await route_state.take("g/b", None)  # b keeps answering fast meanwhile
        await route_state.done("g/b", 100, 30.0)
        await asyncio.sleep(0.2)
    assert await route_state.take("g/a", None)
    await route_state.done("g/a", 100, 20.0)  # now it is the faster one: its measure, not 900's average
    order, _ = await router.order(group)
    assert [d.id for d in order] == ["g/a", "g/b"]
    if client is not None:
        await client.aclose()


async def test_a_group_over_named_anthropic_keys_does_not_import_litellm(
    tmp_path: Path,
    fakes: list[fa.FakeAnthropic],  # noqa: F811
) -> None:
    """The README's setup, two Anthropic keys stored as vault entries team-1 and team-2, nothing else: each
    entry's name was read as a provider prefix with a key, so the server imported litellm in the background at
    start (seconds of CPU and a few hundred MiB an Anthropic-only gateway never needs), slowing the first calls,
    whose TTFT lowest-latency then held against their deployment."""
    data = tmp_path / "data"
    for name in ("team-1", "team-2"):
        stored = CliRunner().invoke(
            main, ["--data-dir", str(data), "keys", "add", "anthropic", "--name", name], input=KEYS[name]
        )
        assert stored.exit_code == 0, stored.output
    deps = [{"model": MODEL, "key": f"team-{i + 1}", "base_url": fakes[i].url} for i in range(2)]
    gateway = GatewayProcess(
        data, fakes[0].url, **{"models": {"default": "claude"}, "models.groups.claude": {"deployments": deps}}
    )
    await gateway.start()
    try:
        api = anthropic.AsyncAnthropic(api_key=gateway.token, base_url=gateway.url, max_retries=0)
        reply = await api.messages.create(model="claude", max_tokens=10, messages=[{"role": "user", "content": "Hi"}])
        assert reply.content[0].type == "text"
        await api.close()
        api_oa = openai.AsyncOpenAI(api_key=gateway.token, base_url=gateway.url + "/v1", max_retries=0)
        answer = await api_oa.chat.completions.create(model="claude", messages=[{"role": "user", "content": "Hi"}])
        assert answer.choices[0].message.content == fa.DEFAULT_TEXT
        await api_oa.close()
    finally:
        await gateway.aclose()
    # What the server asks at start (its log says so only when the import ends, seconds later).
    assert not litellm_usable(load_config(gateway.config_path))


async def test_a_stream_the_client_left_counts_its_tokens_in_the_deployments_minute(
    routed: Callable[..., Awaitable[TestClient]],  # noqa: F811
    fakes: list[fa.FakeAnthropic],  # noqa: F811
    token: str,
    auth_headers: dict[str, str],
) -> None:
    """A stream the client stopped (a user's Esc) is billed what the upstream reported, but its tokens were left
    out of the deployment's minute: a deployment's tpm let through more than the upstream counted."""
    for fake in fakes:
        fake.default = fa.text_response(
            "one two three four five six", chunks=6, usage={"input_tokens": 500}
        ).with_delay(0.2)
    client = await routed(group(fakes, extra=[{"tpm": 100_000}, {"tpm": 100_000}]))
    api = sdk(client, token)
    stream = await api.chat.completions.create(
        model="claude", messages=[{"role": "user", "content": "Hi"}], stream=True
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break  # the client stops reading after the first words
    await stream.close()

    async def ended() -> bool:
        recs = await records(client)
        state = await deployments(client, auth_headers)
        return len(recs) == 1 and all(d["inFlight"] == 0 for d in state.values())

    await wait_until(ended, timeout=20)
    (record,) = await records(client)
    assert record["finishReason"] == "aborted" and record["inputTokens"] == 500
    state = await deployments(client, auth_headers)
    counted = state[record["deployment"]]["tokensLastMinute"]
    assert counted == record["inputTokens"] + record["outputTokens"]
    await api.close()


async def test_a_turn_stopped_mid_answer_counts_its_tokens_in_the_deployments_minute(
    routed: Callable[..., Awaitable[TestClient]],  # noqa: F811
    fakes: list[fa.FakeAnthropic],  # noqa: F811
    auth_headers: dict[str, str],
) -> None:
    """The same for a WebSocket turn the user stopped (chat.abort): billed, and counted in its deployment's minute."""
    for fake in fakes:
        fake.default = fa.text_response(
            "one two three four five six", chunks=6, usage={"input_tokens": 500}
        ).with_delay(0.2)
    client = await routed(group(fakes, extra=[{"tpm": 100_000}, {"tpm": 100_000}]))
    ws = await client.ws_connect("/gateway", headers=auth_headers)
    await ws.send_json({"type": "chat.send", "id": "r1", "content": "Hi", "model": "claude"})
    while (await receive(ws))["type"] != "chat.stream.delta":
        pass
    await ws.send_json({"type": "chat.abort", "id": "a1", "requestId": "r1"})

    async def ended() -> bool:
        recs = await records(client)
        state = await deployments(client, auth_headers)
        return len(recs) == 1 and all(d["inFlight"] == 0 for d in state.values())

    await wait_until(ended, timeout=20)
    await ws.close()
    (record,) = await records(client)
    assert record["finishReason"] == "aborted" and record["inputTokens"] == 500
    state = await deployments(client, auth_headers)
    counted = state[record["deployment"]]["tokensLastMinute"]
    assert counted == record["inputTokens"] + record["outputTokens"]
