"""Model groups tried from outside (audit30t): what a tester coming from LiteLLM's router writes and sees,
through the real CLI and the real HTTP interface against fake upstreams on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from click.testing import CliRunner

from agentspace.cli import main
from tests.conftest import wait_until
from tests.fakes import anthropic_upstream as fa
from tests.fakes import openai_upstream as fo
from tests.test_config import fake_server  # noqa: F401
from tests.test_routing import MODEL, deployments, fakes, group, records, routed  # noqa: F401

GROUP = """
[models.groups."claude"]
deployments = [
  { model = "anthropic/claude-sonnet-4-5", key = "team-1" },
  { model = "anthropic/claude-sonnet-4-5", key = "team-2" },
]
"""


def test_models_fallbacks_keyed_by_a_group_stop_the_start(
    tmp_path: Path,
    fake_server: list[dict[str, Any]],  # noqa: F811
) -> None:
    """LiteLLM's router takes a group's fallbacks as ``fallbacks: [{"claude": [...]}]``; the same here,
    ``[models] fallbacks = { "claude" = [...] }``, was accepted and never tried (a group goes to its own
    ``fallbacks``): the call failed when every deployment did. serve now stops and says where they go."""
    path = tmp_path / "agentspace.toml"
    path.write_text('[models]\nfallbacks = { "claude" = ["anthropic/claude-haiku-4-5"] }\n' + GROUP)
    result = CliRunner().invoke(main, ["--config", str(path), "serve"])
    assert result.exit_code != 0
    assert f'{path}: models.fallbacks."claude":' in result.output
    assert 'models.groups."claude".fallbacks' in result.output
    assert "Traceback" not in result.output
    assert fake_server == []


async def first_deployment_breaking_off(
    routed: Callable[..., Awaitable[TestClient]],  # noqa: F811
    fakes: list[fa.FakeAnthropic],  # noqa: F811
    fake_openai: fo.FakeOpenAI,
    config: dict[str, Any],
    path: str,
) -> tuple[TestClient, dict[str, Any]]:
    """The group's first deployment (weighted to be chosen) breaks off after its first token; ``path`` ending in
    "translated" adds an OpenAI deployment, which makes /v1/messages translate. The client and the body for
    ``path``'s API."""
    fakes[0].default = fa.error_event(text="partial")
    if path == "/v1/messages translated":  # a group with another provider's deployment is translated on /v1/messages
        config["models"]["groups"]["claude"]["deployments"].append({"model": "openai/gpt-4o-mini", "weight": 0.001})
        config["providers"] = {"openai": {"base_url": fake_openai.url}}
    client = await routed(config)
    body = {
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}]},
        "/v1/responses": {"input": "Hi"},
        "/v1/messages": {"max_tokens": 50, "messages": [{"role": "user", "content": "Hi"}]},
    }[path.split()[0]]
    return client, body


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses", "/v1/messages", "/v1/messages translated"])
async def test_a_deployment_breaking_its_streams_midway_is_cooled_on_v1(
    routed: Callable[..., Awaitable[TestClient]],  # noqa: F811
    fakes: list[fa.FakeAnthropic],  # noqa: F811
    fake_openai: fo.FakeOpenAI,
    auth_headers: dict[str, str],
    path: str,
) -> None:
    """A deployment whose streams break after their first token (Anthropic's mid-stream ``overloaded_error``)
    fails those calls; the client sees the error, as documented, and the failure is counted against the
    deployment, as a chat turn counts it: past ``allowed_fails`` it cools down and the next calls go to the
    other one. On /v1 it was counted as an answered call: never cooled, no recent error on the Deployments
    page, and every later stream drawn to it broke the same way."""
    config = group(fakes, weights=[1000, 1], cooldown_seconds=60)
    client, body = await first_deployment_breaking_off(routed, fakes, fake_openai, config, path)
    headers = {**auth_headers, "anthropic-version": "2023-06-01"}
    resp = await client.post(path.split()[0], json={"model": "claude", "stream": True, **body}, headers=headers)
    assert resp.status == 200
    assert "Overloaded" in await resp.text()  # after the first token: the error reaches the client

    async def counted() -> bool:  # the deployment's state is told as the stream's handler ends
        return bool((await deployments(client, auth_headers))["claude/team-1"]["recentErrors"])

    await wait_until(counted)
    state = (await deployments(client, auth_headers))["claude/team-1"]
    assert [e["code"] for e in state["recentErrors"]] == ["LLM_ERROR"]
    assert state["state"] == "cooling" and state["inFlight"] == 0
    resp = await client.post(path.split()[0], json={"model": "claude", "stream": True, **body}, headers=headers)
    assert "Overloaded" not in await resp.text()  # the next call went to team-2
    assert len(fakes[0].requests) == 1 and len(fakes[1].requests) == 1


async def test_a_group_named_as_a_bare_model_id_is_listed_once(
    routed: Callable[..., Awaitable[TestClient]],  # noqa: F811
    fakes: list[fa.FakeAnthropic],  # noqa: F811
    token: str,
) -> None:
    """LiteLLM users name a group as the model it serves (``model_name: claude-sonnet-4-5``). Every /v1
    endpoint takes that id for the group, but the Anthropic-shape /v1/models (what Claude Code and the
    Anthropic SDK read) listed it twice: the group, and Anthropic's model under its bare id."""
    import anthropic

    deps = [{"model": MODEL, "key": f"team-{i + 1}", "base_url": fakes[i].url} for i in range(2)]
    client = await routed({"models": {"groups": {"claude-sonnet-4-5": {"deployments": deps}}}})
    ant = anthropic.AsyncAnthropic(api_key=token, base_url=f"http://127.0.0.1:{client.port}", max_retries=0)
    ids = [m.id async for m in ant.models.list(limit=1000)]
    assert ids.count("claude-sonnet-4-5") == 1
    assert "claude-haiku-4-5" in ids  # the other Claude models stay listed
    assert (await ant.models.retrieve("claude-sonnet-4-5")).max_tokens is not None
    reply = await ant.messages.create(
        model="claude-sonnet-4-5", max_tokens=50, messages=[{"role": "user", "content": "Hi"}]
    )
    assert reply.content[0].text == fa.DEFAULT_TEXT  # the id is the group's: one of its deployments answered
    await ant.close()


async def test_a_deployment_silent_past_the_idle_timeout_moves_a_chat_turn(
    routed: Callable[..., Awaitable[TestClient]],  # noqa: F811
    fakes: list[fa.FakeAnthropic],  # noqa: F811
    auth_headers: dict[str, str],
) -> None:
    """A chat turn (WebSocket, /api/chat) stops a call that sent nothing for ``[chat] idle_timeout_seconds``
    (120 s), well before the provider's own timeout (600 s). On a group's deployment that hung before its
    first token, the turn ended in "idle timeout": the deployment was neither counted nor cooled, and every
    turn drawn to it hung the same way. It has timed out: it is counted (cooled past allowed_fails), its
    attempt recorded answered false, and the turn goes on to the next deployment."""
    from tests.support.ui_stream import DONE, post_chat, read_all, user

    fakes[0].default = fa.text_response("too late").silent_for(30)
    client = await routed(group(fakes, weights=[1000, 1], cooldown_seconds=60), chat={"idle_timeout_seconds": 1.0})
    chunks = await read_all(await post_chat(client, auth_headers, "c1", user("Hi"), model="claude"))
    assert chunks[-1] == DONE
    assert not [c for c in chunks if isinstance(c, dict) and c.get("type") == "error"], chunks
    assert "".join(c["delta"] for c in chunks if isinstance(c, dict) and c.get("type") == "text-delta") == (
        fa.DEFAULT_TEXT
    )
    state = (await deployments(client, auth_headers))["claude/team-1"]
    assert state["state"] == "cooling" and state["inFlight"] == 0
    assert [e["code"] for e in state["recentErrors"]] == ["LLM_ERROR"]
    recs = await records(client)
    assert sorted((r["deployment"], r["answered"]) for r in recs) == [
        ("claude/team-1", False),
        ("claude/team-2", True),
    ]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses", "/v1/messages translated"])
async def test_a_call_not_streamed_that_breaks_mid_answer_moves(
    routed: Callable[..., Awaitable[TestClient]],  # noqa: F811
    fakes: list[fa.FakeAnthropic],  # noqa: F811
    fake_openai: fo.FakeOpenAI,
    auth_headers: dict[str, str],
    path: str,
) -> None:
    """A call not streamed reaches the client in one body at its end, so nothing of it was relayed when its
    upstream broke off mid-answer: it moves to the next deployment, as docs/routing.md says for /v1 ("before
    anything was written to the client"), and as LiteLLM's router retries a failed completion. It was
    answered 503 with the broken-off deployment's error."""
    config = group(fakes, weights=[1000, 1], allowed_fails=5)
    client, body = await first_deployment_breaking_off(routed, fakes, fake_openai, config, path)
    headers = {**auth_headers, "anthropic-version": "2023-06-01"}
    resp = await client.post(path.split()[0], json={"model": "claude", **body}, headers=headers)
    assert resp.status == 200, await resp.text()
    assert fa.DEFAULT_TEXT in await resp.text()
    assert len(fakes[0].requests) == 1 and len(fakes[1].requests) == 1
    recs = await records(client)
    assert sorted((r["deployment"], r["error"]) for r in recs) == [
        ("claude/team-1", "LLM_ERROR"),
        ("claude/team-2", None),
    ]
    state = (await deployments(client, auth_headers))["claude/team-1"]
    assert [e["code"] for e in state["recentErrors"]] == ["LLM_ERROR"] and state["inFlight"] == 0
    assert (await deployments(client, auth_headers))["claude/team-2"]["inFlight"] == 0
