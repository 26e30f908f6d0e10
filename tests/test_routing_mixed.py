"""A group of an OpenAI-style deployment (through litellm) and a Claude one, each on its own fake upstream with
its own vault key (docs/routing.md): the litellm deployment failing in each way before its first token moves
the call, after it does not; a key rotated in the vault while serving is the next call's."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient
from click.testing import CliRunner

from agentspace.cli import main
from tests.fakes import anthropic_upstream as fa
from tests.fakes import openai_upstream as fo
from tests.scale_servers import free_port
from tests.test_routing import MODEL, deployments, fakes, records, routed, sdk  # noqa: F401

OAI = "openai/gpt-4o-mini"
OAI_KEY = "sk-oai-team-0123456789abcdef"


def mixed(oai_url: str, anthropic_url: str, **settings: Any) -> dict[str, Any]:
    deps = [
        {"model": OAI, "key": "oai", "base_url": oai_url, "weight": 1000},
        {"model": MODEL, "key": "team-1", "base_url": anthropic_url, "weight": 1},
    ]
    return {"models": {"groups": {"mixed": {"deployments": deps, **settings}}}}


def add_key(name: str, key: str) -> None:
    CliRunner().invoke(main, ["keys", "add", "openai", "--name", name], input=f"{key}\n", catch_exceptions=False)


@pytest.mark.parametrize("failure", ["429", "500", "timeout"])
async def test_the_litellm_deployment_failing_before_its_first_token_moves(
    routed: Callable[..., Awaitable[TestClient]],  # noqa: F811
    fakes: list[fa.FakeAnthropic],  # noqa: F811
    fake_openai: fo.FakeOpenAI,
    token: str,
    auth_headers: dict[str, str],
    failure: str,
) -> None:
    fake_openai.api_key = OAI_KEY
    add_key("oai", OAI_KEY)
    bad = {
        "429": fo.error_status(429, retry_after=40),
        "500": fo.error_status(500),
        "timeout": fo.text_response("late").stall(30, after=0),
    }[failure]
    fake_openai.default = bad
    client = await routed(
        mixed(fake_openai.url, fakes[0].url, cooldown_seconds=60),
        providers={"openai": {"timeout_seconds": 1.0}},
    )
    api = sdk(client, token)
    for stream in (False, True):
        if stream:
            s = await api.chat.completions.create(
                model="mixed", messages=[{"role": "user", "content": "Hi"}], stream=True
            )
            text = "".join([c.choices[0].delta.content or "" async for c in s if c.choices])
        else:
            r = await api.chat.completions.create(model="mixed", messages=[{"role": "user", "content": "Hi"}])
            text = r.choices[0].message.content or ""
        assert text == fa.DEFAULT_TEXT
    state = (await deployments(client, auth_headers))["mixed/oai"]
    assert state["state"] == "cooling"
    recs = await records(client)
    per = {d: sum(1 for r in recs if r["deployment"] == d) for d in ("mixed/oai", "mixed/team-1")}
    assert per == {"mixed/oai": len(fake_openai.requests), "mixed/team-1": len(fakes[0].requests)}
    assert len(fake_openai.requests) == 1 and len(fakes[0].requests) == 2
    await api.close()


async def test_connection_refused_moves(
    routed: Callable[..., Awaitable[TestClient]],  # noqa: F811
    fakes: list[fa.FakeAnthropic],  # noqa: F811
    token: str,
    auth_headers: dict[str, str],
) -> None:
    add_key("oai", OAI_KEY)
    client = await routed(mixed(f"http://127.0.0.1:{free_port()}/v1", fakes[0].url, cooldown_seconds=60))
    api = sdk(client, token)
    r = await api.chat.completions.create(model="mixed", messages=[{"role": "user", "content": "Hi"}])
    assert r.choices[0].message.content == fa.DEFAULT_TEXT
    assert (await deployments(client, auth_headers))["mixed/oai"]["state"] == "cooling"
    recs = await records(client)
    assert sorted((r["deployment"], r["answered"]) for r in recs) == [("mixed/oai", False), ("mixed/team-1", True)]
    await api.close()


async def test_a_key_rotated_while_serving_is_the_next_calls(
    routed: Callable[..., Awaitable[TestClient]],  # noqa: F811
    fakes: list[fa.FakeAnthropic],  # noqa: F811
    fake_openai: fo.FakeOpenAI,
    token: str,
) -> None:
    add_key("oai", OAI_KEY)
    fake_openai.api_key = OAI_KEY
    client = await routed(mixed(fake_openai.url, fakes[0].url))
    api = sdk(client, token)
    msgs: Any = [{"role": "user", "content": "Hi"}]
    await api.chat.completions.create(model="mixed", messages=msgs)
    new = "sk-oai-rotated-0123456789abcdef"
    add_key("oai", new)
    fake_openai.api_key = new
    await api.chat.completions.create(model="mixed", messages=msgs)
    s = await api.chat.completions.create(model="mixed", messages=msgs, stream=True)
    [c async for c in s]
    assert [r.headers.get("authorization") for r in fake_openai.requests] == [f"Bearer {OAI_KEY}"] + [
        f"Bearer {new}"
    ] * 2
    assert not fakes[0].requests
    await api.close()


async def test_the_litellm_deployments_retry_after_is_its_cooldown_and_it_ends(
    routed: Callable[..., Awaitable[TestClient]],  # noqa: F811
    fakes: list[fa.FakeAnthropic],  # noqa: F811
    fake_openai: fo.FakeOpenAI,
    token: str,
    auth_headers: dict[str, str],
) -> None:
    import asyncio

    add_key("oai", OAI_KEY)
    fake_openai.enqueue(fo.error_status(429, retry_after=1))
    client = await routed(mixed(fake_openai.url, fakes[0].url, cooldown_seconds=60))
    api = sdk(client, token)
    msgs: Any = [{"role": "user", "content": "Hi"}]
    r = await api.chat.completions.create(model="mixed", messages=msgs)
    assert r.choices[0].message.content == fa.DEFAULT_TEXT
    state = (await deployments(client, auth_headers))["mixed/oai"]
    assert state["state"] == "cooling" and state["coolingSeconds"] <= 1.0
    await asyncio.sleep(1.2)
    assert (await deployments(client, auth_headers))["mixed/oai"]["state"] == "active"
    r = await api.chat.completions.create(model="mixed", messages=msgs)
    assert r.choices[0].message.content != fa.DEFAULT_TEXT  # the OpenAI deployment again
    assert len(fake_openai.requests) == 2 and len(fakes[0].requests) == 1
    await api.close()


async def test_the_litellm_deployment_breaking_after_its_first_token_is_not_moved(
    routed: Callable[..., Awaitable[TestClient]],  # noqa: F811
    fakes: list[fa.FakeAnthropic],  # noqa: F811
    fake_openai: fo.FakeOpenAI,
    token: str,
) -> None:
    add_key("oai", OAI_KEY)
    fake_openai.default = fo.text_response("one two three four", chunks=4).cut_after(2)
    client = await routed(mixed(fake_openai.url, fakes[0].url))
    api = sdk(client, token)
    s = await api.chat.completions.create(model="mixed", messages=[{"role": "user", "content": "Hi"}], stream=True)
    got: list[str] = []
    with pytest.raises(openai.APIError):
        async for c in s:
            got.extend(c.choices[0].delta.content or "" for c in [c] if c.choices)
    # The first token reached the client: the break is the client's to see, the call not moved.
    assert "".join(got) == "one t" and not fakes[0].requests and len(fake_openai.requests) == 1
    recs = await records(client)
    assert [(r["deployment"], r["error"]) for r in recs] == [("mixed/oai", "LLM_ERROR")]
    await api.close()


@pytest.mark.parametrize("failure", ["timeout", "refused"])
async def test_the_litellm_deployment_failing_moves_on_the_ui_stream(
    routed: Callable[..., Awaitable[TestClient]],  # noqa: F811
    fakes: list[fa.FakeAnthropic],  # noqa: F811
    fake_openai: fo.FakeOpenAI,
    auth_headers: dict[str, str],
    failure: str,
) -> None:
    from tests.support.ui_stream import DONE, post_chat, read_all, user

    add_key("oai", OAI_KEY)
    fake_openai.default = fo.text_response("late").stall(30, after=0)
    url = fake_openai.url if failure == "timeout" else f"http://127.0.0.1:{free_port()}/v1"
    client = await routed(mixed(url, fakes[0].url, cooldown_seconds=60), providers={"openai": {"timeout_seconds": 1.0}})
    for n in range(2):
        chunks = await read_all(await post_chat(client, auth_headers, f"c{n}", user("Hi"), model="mixed"))
        text = "".join(c["delta"] for c in chunks if isinstance(c, dict) and c.get("type") == "text-delta")
        assert text == fa.DEFAULT_TEXT and chunks[-1] == DONE
    recs = await records(client)
    assert sorted((r["deployment"], r["answered"]) for r in recs) == [
        ("mixed/oai", False),
        ("mixed/team-1", True),
        ("mixed/team-1", True),
    ]


async def test_a_failover_is_not_another_request_of_the_clients(
    routed: Callable[..., Awaitable[TestClient]],  # noqa: F811
    fakes: list[fa.FakeAnthropic],  # noqa: F811
    fake_openai: fo.FakeOpenAI,
) -> None:
    """A client with --rpm 2 whose two requests each fail over to the next deployment (on /v1 and /api/chat):
    both are answered (the client made two requests, not four), and its third in the minute is refused."""
    from tests.support.ui_stream import DONE, post_chat, read_all, user

    add_key("oai", OAI_KEY)
    key = CliRunner().invoke(main, ["clients", "add", "bob", "--rpm", "2"], catch_exceptions=False).stdout.strip()
    fake_openai.default = fo.error_status(503)
    client = await routed(mixed(fake_openai.url, fakes[0].url, cooldown_seconds=0))
    api = openai.AsyncOpenAI(api_key=key, base_url=f"http://127.0.0.1:{client.port}/v1", max_retries=0)
    msgs: Any = [{"role": "user", "content": "Hi"}]
    r = await api.chat.completions.create(model="mixed", messages=msgs)
    assert r.choices[0].message.content == fa.DEFAULT_TEXT
    chunks = await read_all(
        await post_chat(client, {"Authorization": f"Bearer {key}"}, "c1", user("Hi"), model="mixed")
    )
    assert chunks[-1] == DONE
    assert len(fake_openai.requests) == 2 and len(fakes[0].requests) == 2
    with pytest.raises(openai.RateLimitError):
        await api.chat.completions.create(model="mixed", messages=msgs)
    recs = await records(client)
    assert (
        sorted((r["deployment"], r["answered"]) for r in recs)
        == [("mixed/oai", False)] * 2 + [("mixed/team-1", True)] * 2
    )
    await api.close()


async def test_a_pass_through_failover_is_not_another_request_of_the_clients(
    routed: Callable[..., Awaitable[TestClient]],  # noqa: F811
    fakes: list[fa.FakeAnthropic],  # noqa: F811
) -> None:
    """The same on /v1/messages over a group of Anthropic deployments (passed through): --rpm 1 is one request."""
    import anthropic

    from tests.test_routing import group

    key = CliRunner().invoke(main, ["clients", "add", "carol", "--rpm", "1"], catch_exceptions=False).stdout.strip()
    fakes[0].default = fa.error_status(503)
    client = await routed(group(fakes, weights=[1000, 1], cooldown_seconds=0))
    ant = anthropic.AsyncAnthropic(api_key=key, base_url=f"http://127.0.0.1:{client.port}", max_retries=0)
    msgs: Any = [{"role": "user", "content": "Hi"}]
    message = await ant.messages.create(model="claude", max_tokens=100, messages=msgs)
    assert message.content[0].text == fa.DEFAULT_TEXT  # type: ignore[union-attr]
    assert len(fakes[0].requests) == 1 and len(fakes[1].requests) == 1
    with pytest.raises(anthropic.RateLimitError):
        await ant.messages.create(model="claude", max_tokens=100, messages=msgs)
    await ant.close()


async def test_a_deployment_on_its_own_endpoint_may_serve_a_model_of_its_own_name(
    routed: Callable[..., Awaitable[TestClient]],  # noqa: F811
    fake_openai: fo.FakeOpenAI,
    token: str,
) -> None:
    """A deployment's ``base_url`` is its endpoint (docs/routing.md): a self-hosted OpenAI-compatible server
    names its models as it likes, as a ``[providers.openai] base_url`` does, so its model is no typo."""
    add_key("local", OAI_KEY)
    deps = [{"model": "openai/qwen2.5-coder", "key": "local", "base_url": fake_openai.url}]
    client = await routed({"models": {"groups": {"local": {"deployments": deps}}}})
    api = sdk(client, token)
    reply = await api.chat.completions.create(model="local", messages=[{"role": "user", "content": "Hi"}])
    assert reply.choices[0].message.content
    assert [r.body["model"] for r in fake_openai.requests] == ["qwen2.5-coder"]
    [record] = await records(client)
    assert record["answered"] and record["deployment"] == "local/local"
    await api.close()
