"""Issue 26 (every client unchanged) tried from outside once more: the real Codex CLI and the official SDKs
against a running ``agentspace serve`` and the fake upstreams (docs: README "Use it from your tools")."""

from __future__ import annotations

from pathlib import Path

import openai

from scripts.harness import GatewayProcess
from tests.fakes import openai_upstream as fo
from tests.test_real_clients import TOOL_OUTPUT, agent_messages, codex, records, server  # noqa: F401


async def test_codex_on_a_responses_only_openai_model(
    server: GatewayProcess,  # noqa: F811
    fake_openai: fo.FakeOpenAI,
    tmp_path: Path,
) -> None:
    """OpenAI's Codex models (gpt-5.3-codex, ...) answer on the Responses API only. Codex named by its bare id
    got a 404 'does not exist' (bare ids were looked up among Chat Completions models), /v1/models did not list
    the model and models.retrieve answered 404, though ``openai/gpt-5.3-codex`` was served."""
    fake_openai.enqueue(
        fo.tool_calls_response(
            fo.tool_call("call_x1", "exec_command", {"cmd": f"echo {TOOL_OUTPUT}"}), usage=fo.usage(800, 40, cached=500)
        ),
        fo.text_response("Ran it.", usage=fo.usage(900, 7)),
    )
    events = await codex(server, tmp_path, "Run an echo", "gpt-5.3-codex")
    assert agent_messages(events)[-1] == "Ran it."
    assert [(r.path, r.body["model"]) for r in fake_openai.requests] == [("/v1/responses", "gpt-5.3-codex")] * 2
    got = [
        (r["endpoint"], r["model"], r["inputTokens"], r["cacheReadTokens"], r["outputTokens"]) for r in records(server)
    ]
    assert got == [
        ("responses", "openai/gpt-5.3-codex", 300, 500, 40),
        ("responses", "openai/gpt-5.3-codex", 900, 0, 7),
    ]

    sdk = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=server.token, max_retries=0)
    try:
        listed = [m.id async for m in sdk.models.list()]
        assert "openai/gpt-5.3-codex" in listed
        assert (await sdk.models.retrieve("gpt-5.3-codex")).id == "gpt-5.3-codex"
        reply = await sdk.chat.completions.create(model="gpt-5.3-codex", messages=[{"role": "user", "content": "Hi"}])
        assert reply.choices[0].message.content == fo.DEFAULT_TEXT
    finally:
        await sdk.close()
    assert server.log_problems() == []
