"""The real coding agents when something goes wrong mid-session, against a real ``agentspace serve`` and the
fake upstreams: a client key revoked between two calls of one turn reaches Claude Code as an error it shows at
once (not minutes of retries that look like a hang), on a Claude model and on an OpenAI model. The usage
records are the calls that were made, each once.

Skipped with a message naming the missing tool when the pinned clients are not installed (./scripts/test).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from scripts.harness import GatewayProcess
from tests import test_real_clients
from tests.fakes import anthropic_upstream as fa
from tests.fakes import openai_upstream as fo
from tests.test_real_clients import base_env, client_binary, records

server = test_real_clients.server  # a served gateway with both fake upstreams (a fixture)


async def admin(server: GatewayProcess, method: str, path: str, **kwargs: Any) -> Any:
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": f"Bearer {server.token}"}
        async with session.request(method, server.url + path, headers=headers, **kwargs) as resp:
            return await resp.json() if resp.status != 204 else None


@pytest.mark.parametrize("model", ["claude-sonnet-4-6", "openai/gpt-4o-mini"])
async def test_claude_code_shows_a_key_revoked_mid_turn_at_once(
    server: GatewayProcess, fake_anthropic: fa.FakeAnthropic, fake_openai: fo.FakeOpenAI, tmp_path: Path, model: str
) -> None:
    key = (await admin(server, "POST", "/api/clients", json={"name": "laptop"}))["key"]
    if model.startswith("claude-"):
        fake: fa.FakeAnthropic | fo.FakeOpenAI = fake_anthropic
        first: Any = fa.tool_use_response("Bash", {"command": "echo hi"}, id="toolu_rv", usage={"input_tokens": 900})
    else:
        fake = fake_openai
        first = fo.tool_calls_response(fo.tool_call("call_rv", "Bash", {"command": "echo hi"}), usage=fo.usage(900, 9))
    fake.enqueue(first.with_delay(0.2))  # slow enough for the key to go while the first call streams

    async def revoke_once_called() -> None:
        while not fake.requests:
            await asyncio.sleep(0.02)
        await admin(server, "DELETE", "/api/clients/laptop")

    revoking = asyncio.create_task(revoke_once_called())
    binary = client_binary("claude", "@anthropic-ai/claude-code")
    work = tmp_path / "project"
    work.mkdir()
    env = {**base_env(tmp_path), "ANTHROPIC_BASE_URL": server.url, "ANTHROPIC_AUTH_TOKEN": key}
    argv = [binary, "-p", "Run echo", "--output-format", "json", "--model", model, "--allowedTools", "Bash(echo:*)"]
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        *argv, env=env, cwd=work, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    took = time.monotonic() - started
    await revoking

    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["is_error"] is True and result["api_error_status"] == 401, result
    assert result["result"]  # its own words for a 401 ("Not logged in · Please run /login")
    assert took < 30, f"Claude Code took {took:.0f} s to give up on a revoked key"
    (record,) = records(server)  # the first call; the refused one never reached the upstream
    assert (record["client"], record["inputTokens"], record["error"]) == ("laptop", 900, None)
    assert len(fake.requests) == 1
