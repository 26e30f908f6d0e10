"""The ``/v1`` endpoints on a real ``agentspace serve`` process: the README's "Use it from your tools"
snippets run as written (only the port differs), and a client that disconnects mid-stream stops the
upstream request on a server that does not cancel its handlers (as ``agentspace serve`` runs aiohttp)."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agentspace.storage.embedded.usage import UsageStore
from scripts.harness import TEST_KEY, GatewayProcess, child_env
from tests.conftest import wait_until
from tests.fakes import anthropic_upstream as fa
from tests.fakes import openai_upstream as fo

README = Path(__file__).resolve().parent.parent / "README.md"
README_URL = "http://127.0.0.1:3271"


def snippets() -> dict[str, tuple[str, str]]:
    """name -> (language, code) of every ``<!-- snippet: NAME -->`` block of the README."""
    found = re.findall(r"<!-- snippet: ([\w-]+) -->\n```(\w+)\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    return {name: (lang, code) for name, lang, code in found}


@pytest.fixture
async def server(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic, fake_openai: fo.FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[GatewayProcess]:
    monkeypatch.setenv("AGENTSPACE_TEST_OPENAI_KEY", "sk-openai-test-0123456789")
    process = GatewayProcess(
        tmp_path / "data",
        fake_anthropic.url,
        **{"providers.openai": {"base_url": fake_openai.url, "api_key_env": "AGENTSPACE_TEST_OPENAI_KEY"}},
    )
    await process.start()
    try:
        yield process
    finally:
        await process.aclose()


async def run(server: GatewayProcess, lang: str, code: str) -> str:
    code = code.replace(README_URL, server.url)
    env = child_env(server.data_dir)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # the `agentspace` command
    argv = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
    process = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()
    return out.decode()


def records(server: GatewayProcess) -> list[dict[str, Any]]:
    return list(UsageStore(server.data_dir).records_sync())


async def test_readme_snippets_work_as_written(
    server: GatewayProcess, fake_anthropic: fa.FakeAnthropic, fake_openai: fo.FakeOpenAI
) -> None:
    blocks = snippets()
    assert {"openai-sdk", "anthropic-sdk", "claude-code", "curl"} <= set(blocks)  # the others: test_real_clients

    fake_openai.enqueue(fo.text_response("Hello from OpenAI"))
    assert (await run(server, *blocks["openai-sdk"])).strip() == "Hello from OpenAI"

    fake_anthropic.enqueue(fa.text_response("Hello from Claude"))
    assert await run(server, *blocks["anthropic-sdk"]) == "Hello from Claude"

    # Claude Code reads ANTHROPIC_BASE_URL and ANTHROPIC_AUTH_TOKEN (sent as a bearer token), like the SDK it
    # is built on: the exports as written, then a request shaped like Claude Code's instead of `claude`.
    lang, code = blocks["claude-code"]
    assert code.strip().endswith("\nclaude")
    claude = (
        'python -c \'import anthropic; c = anthropic.Anthropic(default_headers={"anthropic-beta": "claude-code-20250219", '
        '"X-Claude-Code-Session-Id": "cc-readme"}); '
        'print(c.messages.create(model="claude-sonnet-4-5", max_tokens=100, messages=[{"role": "user", "content": "hi"}]).content[0].text)\''
    )
    fake_anthropic.enqueue(fa.text_response("Hello, Claude Code"))
    assert (await run(server, lang, code.strip()[: -len("claude")] + claude)).strip() == "Hello, Claude Code"
    assert fake_anthropic.requests[-1].headers["anthropic-beta"] == "claude-code-20250219"
    assert fake_anthropic.requests[-1].api_key == TEST_KEY

    fake_openai.enqueue(fo.text_response("curl to OpenAI"))
    fake_anthropic.enqueue(fa.text_response("curl to Claude"))
    out = await run(server, *blocks["curl"])
    assert "curl to OpenAI" in out and "curl to Claude" in out and '"object":"list"' in out.replace(" ", "")

    endpoints = sorted((r["endpoint"], r["sessionId"] or "") for r in records(server))
    assert endpoints == [
        ("anthropic", ""),
        ("anthropic", ""),
        ("anthropic", "cc-readme"),
        ("openai", ""),
        ("openai", ""),
    ]
    assert server.log_problems() == []


@pytest.mark.parametrize("endpoint", ["anthropic", "openai"])
async def test_disconnect_stops_the_upstream_on_a_served_gateway(
    server: GatewayProcess, fake_anthropic: fa.FakeAnthropic, fake_openai: fo.FakeOpenAI, endpoint: str
) -> None:
    if endpoint == "anthropic":
        fake_anthropic.enqueue(
            fa.text_response("word " * 300, chunks=300, usage={"input_tokens": 55}).stall(30, after=8)
        )
        path, body = (
            "/v1/messages",
            {
                "model": "claude-sonnet-4-5",
                "max_tokens": 1000,
                "stream": True,
                "messages": [{"role": "user", "content": "Hi"}],
            },
        )
        upstream: Any = fake_anthropic
    else:
        fake_openai.enqueue(fo.text_response("word " * 300, chunks=300).stall(30, after=8))
        path, body = (
            "/v1/chat/completions",
            {"model": "openai/gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "Hi"}]},
        )
        upstream = fake_openai
    headers = {"Authorization": f"Bearer {server.token}", "anthropic-version": "2023-06-01"}
    async with aiohttp.ClientSession() as http:
        async with http.post(server.url + path, json=body, headers=headers) as resp:
            assert resp.status == 200
            received = b""
            while received.count(b"word") < 5:
                received += await resp.content.readany()
            resp.connection.transport.close()  # type: ignore[union-attr]  # hang up while the upstream is silent

    async def upstream_closed() -> bool:
        return bool(upstream.requests and upstream.requests[0].disconnected)

    async def recorded() -> bool:
        return bool(records(server))

    # The upstream is stalled (it writes nothing for 30 s): it sees the close only if the gateway closes it.
    await wait_until(upstream_closed, timeout=10)
    await wait_until(recorded, timeout=10)
    (record,) = records(server)
    assert record["finishReason"] == "aborted" and record["endpoint"] == endpoint
    assert 0 < record["outputTokens"] < 100
    if endpoint == "anthropic":
        assert record["inputTokens"] == 55 and record["estimatedFields"] == ["outputTokens"]
    await asyncio.sleep(0.5)
    assert server.log_problems() == []


async def test_litellm_is_imported_at_start_only_where_a_litellm_model_is_usable(
    tmp_path: Path, fake_anthropic: fa.FakeAnthropic, fake_openai: fo.FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With an OpenAI provider configured, the import starts with the server (no caller waits for it); an
    Anthropic-only gateway never imports litellm."""
    from agentspace.config import parse_config
    from agentspace.providers.litellm import litellm_usable

    anthropic_only = parse_config(
        {"storage": {"data_dir": str(tmp_path / "a")}, "models": {"default": "anthropic/claude-sonnet-4-5"}}
    )
    assert not litellm_usable(anthropic_only)
    with_table = parse_config(
        {"storage": {"data_dir": str(tmp_path / "b")}, "providers": {"ollama": {"base_url": "http://127.0.0.1:1"}}}
    )
    assert litellm_usable(with_table)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")
    assert litellm_usable(anthropic_only)  # a key in the environment is enough
    monkeypatch.delenv("OPENAI_API_KEY")

    plain = GatewayProcess(tmp_path / "plain", fake_anthropic.url)
    await plain.start()
    try:
        async with aiohttp.ClientSession() as http:  # a chat through the Anthropic pass-through works without it
            async with http.post(
                plain.url + "/v1/messages",
                headers={"x-api-key": plain.token},
                json={"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}]},
            ) as resp:
                assert resp.status == 200
        assert "litellm imported" not in plain.log()
    finally:
        await plain.aclose()

    monkeypatch.setenv("AGENTSPACE_TEST_OPENAI_KEY", "sk-openai-test-0123456789")
    served = GatewayProcess(
        tmp_path / "served",
        fake_anthropic.url,
        **{"providers.openai": {"base_url": fake_openai.url, "api_key_env": "AGENTSPACE_TEST_OPENAI_KEY"}},
    )
    await served.start()
    try:
        await served.wait_for_log("litellm imported in the background", timeout=60)
    finally:
        await served.aclose()
