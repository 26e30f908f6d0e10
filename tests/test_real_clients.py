"""The real coding agents, unchanged, against a real ``agentspace serve`` and the fake upstreams: Codex CLI
(``codex exec``, a custom provider with ``wire_api = "responses"``) and Claude Code (``claude -p``) on a
Claude model and on an OpenAI model, each with a plain answer and a tool round trip. Each checks the usage
records: the tokens the fake reported, the endpoint, and the session the client named.

The pinned clients are installed into tests/clients/node_modules by ./scripts/test (``npm ci``); without npm
the tests are skipped with a message naming the missing tool.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agentspace.storage.embedded.usage import UsageStore
from scripts.harness import GatewayProcess
from tests.fakes import anthropic_upstream as fa
from tests.fakes import openai_upstream as fo
from tests.test_v1_serve import README_URL, snippets
from tests.test_v1_serve import run as run_snippet

BIN = Path(__file__).resolve().parent / "clients" / "node_modules" / ".bin"
TOOL_OUTPUT = "agentspace-tool-ok"


def client_binary(name: str, package: str) -> Path:
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{name} ({package}) is not installed: run ./scripts/test with npm on the PATH")
    return path


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


def records(server: GatewayProcess) -> list[dict[str, Any]]:
    return list(UsageStore(server.data_dir).records_sync())


async def run(argv: list[str | Path], env: dict[str, str], cwd: Path) -> str:
    process = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 180)
    assert process.returncode == 0, (out + err).decode(errors="replace")
    return out.decode()


def base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_API_KEY", "_AUTH_TOKEN", "_BASE_URL"))}
    env["HOME"] = str(home)
    return env


# --- Codex CLI ----------------------------------------------------------------------------------------


def codex_config(url: str) -> str:
    """The README's config.toml for Codex, pointed at ``url``."""
    lang, code = snippets()["codex-config"]
    assert lang == "toml"
    return code.replace(README_URL, url)


async def codex(
    server: GatewayProcess, tmp_path: Path, prompt: str, model: str | None = None, *options: str
) -> list[dict[str, Any]]:
    """``codex exec --json``: its JSONL events."""
    binary = client_binary("codex", "@openai/codex")
    home = tmp_path / "codex-home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(codex_config(server.url), encoding="utf-8")
    work = tmp_path / "project"
    work.mkdir(exist_ok=True)
    env = {**base_env(tmp_path), "CODEX_HOME": str(home), "AGENTSPACE_TOKEN": server.token}
    argv: list[str | Path] = [binary, "exec", "--json", "--skip-git-repo-check"]
    # The test machine may have no user namespaces for Codex's sandbox; the command it runs is an echo.
    argv += ["--dangerously-bypass-approvals-and-sandbox", *(["-m", model] if model else []), *options, prompt]
    out = await run(argv, env, work)
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def agent_messages(events: list[dict[str, Any]]) -> list[str]:
    return [
        e["item"]["text"]
        for e in events
        if e.get("type") == "item.completed" and e["item"].get("type") == "agent_message"
    ]


async def test_codex_plain_answer(server: GatewayProcess, fake_openai: fo.FakeOpenAI, tmp_path: Path) -> None:
    fake_openai.enqueue(fo.text_response("Hello from Codex's model", usage=fo.usage(321, 12, cached=300)))
    events = await codex(server, tmp_path, "Say hello")
    assert agent_messages(events) == ["Hello from Codex's model"]
    (thread,) = [e["thread_id"] for e in events if e.get("type") == "thread.started"]
    (turn,) = [e for e in events if e.get("type") == "turn.completed"]
    assert (turn["usage"]["input_tokens"], turn["usage"]["cached_input_tokens"], turn["usage"]["output_tokens"]) == (
        321,
        300,
        12,
    )
    (record,) = records(server)
    assert record["endpoint"] == "responses" and record["model"] == "openai/gpt-4o-mini"
    assert (record["inputTokens"], record["cacheReadTokens"], record["outputTokens"]) == (21, 300, 12)
    assert record["sessionId"] == thread  # Codex's session-id header
    sent = fake_openai.requests[0].body
    assert sent["messages"][0]["role"] == "system" and "Codex" in sent["messages"][0]["content"]
    assert sent["tool_choice"] == "auto" and "exec_command" in [t["function"]["name"] for t in sent["tools"]]
    assert server.log_problems() == []


async def test_codex_tool_round_trip(server: GatewayProcess, fake_openai: fo.FakeOpenAI, tmp_path: Path) -> None:
    fake_openai.enqueue(
        fo.tool_calls_response(
            fo.tool_call("call_codex_1", "exec_command", {"cmd": f"echo {TOOL_OUTPUT}-1"}),
            fo.tool_call("call_codex_2", "exec_command", {"cmd": f"echo {TOOL_OUTPUT}-2"}),
            usage=fo.usage(500, 30),
        ),
        fo.text_response("The commands printed them.", usage=fo.usage(700, 9)),
    )
    events = await codex(server, tmp_path, "Run two echos")
    assert agent_messages(events)[-1] == "The commands printed them."
    assert fake_openai.requests[0].body["parallel_tool_calls"] is True
    assert fake_openai.requests[0].body["max_tokens"] == 16_384  # Codex sets no limit: gpt-4o-mini's own
    second = fake_openai.requests[1].body["messages"]
    call = next(m for m in second if m["role"] == "assistant" and m.get("tool_calls"))
    assert [c["id"] for c in call["tool_calls"]] == ["call_codex_1", "call_codex_2"]
    results = {m["tool_call_id"]: m["content"] for m in second if m["role"] == "tool"}
    assert f"{TOOL_OUTPUT}-1" in results["call_codex_1"] and f"{TOOL_OUTPUT}-2" in results["call_codex_2"]
    got = [(r["endpoint"], r["inputTokens"], r["outputTokens"]) for r in records(server)]
    assert got == [("responses", 500, 30), ("responses", 700, 9)]
    (thread,) = [e["thread_id"] for e in events if e.get("type") == "thread.started"]
    assert {r["sessionId"] for r in records(server)} == {thread}  # Codex's session-id header
    assert server.log_problems() == []


async def test_codex_views_an_image(server: GatewayProcess, fake_openai: fo.FakeOpenAI, tmp_path: Path) -> None:
    """Codex's view_image tool answers with the image it read (a function_call_output of content items): the
    next turn reaches the model with the image (it was refused with a 400, and so was every later turn)."""
    png = base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    )
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "dot.png").write_bytes(png)
    fake_openai.enqueue(
        fo.tool_calls_response(fo.tool_call("call_img", "view_image", {"path": "dot.png"}), usage=fo.usage(500, 30)),
        fo.text_response("A single dot.", usage=fo.usage(900, 6)),
    )
    events = await codex(server, tmp_path, "What is in dot.png?")
    assert agent_messages(events)[-1] == "A single dot."
    second = fake_openai.requests[1].body["messages"]
    assert [m["role"] for m in second[-2:]] == ["tool", "user"] and second[-2]["tool_call_id"] == "call_img"
    (image,) = second[-1]["content"]
    assert image["type"] == "image_url" and image["image_url"]["url"].startswith("data:image/")
    got = [(r["endpoint"], r["inputTokens"], r["outputTokens"], r["error"]) for r in records(server)]
    assert got == [("responses", 500, 30, None), ("responses", 900, 6, None)]
    assert server.log_problems() == []


async def test_codex_on_an_openai_reasoning_model(
    server: GatewayProcess, fake_openai: fo.FakeOpenAI, tmp_path: Path
) -> None:
    """What Codex sends a reasoning model (its configured reasoning effort, a summary, encrypted reasoning) is
    all taken: the effort reaches OpenAI, the reasoning comes back as Codex's reasoning item."""
    fake_openai.enqueue(
        fo.text_response("Reasoned hello", reasoning="Greeting asked.", usage=fo.usage(400, 20, reasoning=12))
    )
    events = await codex(server, tmp_path, "Say hello", "openai/gpt-5", "-c", 'model_reasoning_effort="low"')
    assert agent_messages(events) == ["Reasoned hello"]
    reasoning = [
        e["item"]["text"] for e in events if e.get("type") == "item.completed" and e["item"]["type"] == "reasoning"
    ]
    assert any("Greeting asked." in text for text in reasoning), events
    sent = fake_openai.requests[0].body
    assert sent["model"] == "gpt-5" and sent["reasoning_effort"] == "low"  # Codex's model_reasoning_effort
    (record,) = records(server)
    assert (record["endpoint"], record["inputTokens"], record["outputTokens"], record["reasoningTokens"]) == (
        "responses",
        400,
        20,
        12,
    )
    assert server.log_problems() == []


async def test_codex_on_a_claude_model(
    server: GatewayProcess, fake_anthropic: fa.FakeAnthropic, tmp_path: Path
) -> None:
    """Parallel tool calls after signed thinking: Codex gets the reasoning summary, and its next turn sends
    the thinking back (its signature as encrypted_content) before both calls and both results."""
    fake_anthropic.enqueue(
        fa.message_response(
            fa.thinking_block("Two commands are needed."),
            fa.tool_use_block("exec_command", {"cmd": f"echo {TOOL_OUTPUT}-1"}, id="toolu_cx_1"),
            fa.tool_use_block("exec_command", {"cmd": f"echo {TOOL_OUTPUT}-2"}, id="toolu_cx_2"),
            stop_reason="tool_use",
            usage={"input_tokens": 900},
        ),
        fa.text_response("Claude ran them.", usage={"input_tokens": 950}),
    )
    events = await codex(server, tmp_path, "Run two echos", "anthropic/claude-sonnet-4-6")
    assert agent_messages(events)[-1] == "Claude ran them."
    reasoning = [
        e["item"]["text"] for e in events if e.get("type") == "item.completed" and e["item"].get("type") == "reasoning"
    ]
    assert any("Two commands are needed." in text for text in reasoning), events
    last = fake_anthropic.requests[-1].body["messages"]
    assistant = next(m for m in last if m["role"] == "assistant")
    assert [b["type"] for b in assistant["content"]] == ["thinking", "tool_use", "tool_use"]
    assert assistant["content"][0]["signature"] == fa.DEFAULT_SIGNATURE
    results = {
        b["tool_use_id"]: b["content"]
        for m in last
        for b in m["content"]
        if isinstance(b, dict) and b.get("type") == "tool_result"
    }
    assert f"{TOOL_OUTPUT}-1" in results["toolu_cx_1"] and f"{TOOL_OUTPUT}-2" in results["toolu_cx_2"]
    got = [(r["endpoint"], r["model"], r["inputTokens"]) for r in records(server)]
    assert got == [("responses", "anthropic/claude-sonnet-4-6", 900), ("responses", "anthropic/claude-sonnet-4-6", 950)]
    (thread,) = [e["thread_id"] for e in events if e.get("type") == "thread.started"]
    assert {r["sessionId"] for r in records(server)} == {thread}
    assert server.log_problems() == []


async def test_codex_on_claude_opus_4_7_keeps_its_signed_thinking(
    server: GatewayProcess, fake_anthropic: fa.FakeAnthropic, tmp_path: Path
) -> None:
    """Claude Opus 4.7 sends its thinking without text by default, only the signature: Codex gets it as a reasoning
    item and its next turn sends the thinking back before the tool call (the stream dropped it)."""
    fake_anthropic.enqueue(
        fa.message_response(
            fa.thinking_block("", signature="sig-of-omitted-thinking"),
            fa.tool_use_block("exec_command", {"cmd": f"echo {TOOL_OUTPUT}"}, id="toolu_o47"),
            stop_reason="tool_use",
        ),
        fa.text_response("Opus ran it."),
    )
    effort = 'model_reasoning_effort="high"'
    events = await codex(server, tmp_path, "Run an echo", "anthropic/claude-opus-4-7", "-c", effort)
    assert agent_messages(events)[-1] == "Opus ran it."
    last = fake_anthropic.requests[-1].body
    assert last["output_config"] == {"effort": "high"}
    assistant = next(m for m in last["messages"] if m["role"] == "assistant")
    assert [(b["type"], b.get("signature")) for b in assistant["content"]] == [
        ("thinking", "sig-of-omitted-thinking"),
        ("tool_use", None),
    ]
    assert [r["error"] for r in records(server)] == [None, None]
    assert server.log_problems() == []


# --- Claude Code --------------------------------------------------------------------------------------


async def claude(server: GatewayProcess, tmp_path: Path, model: str, prompt: str) -> dict[str, Any]:
    """``claude -p PROMPT --output-format json``: its result object."""
    binary = client_binary("claude", "@anthropic-ai/claude-code")
    work = tmp_path / "project"
    work.mkdir(exist_ok=True)
    env = {**base_env(tmp_path), "ANTHROPIC_BASE_URL": server.url, "ANTHROPIC_AUTH_TOKEN": server.token}
    argv: list[str | Path] = [binary, "-p", prompt, "--output-format", "json", "--model", model]
    argv += ["--allowedTools", "Bash(echo:*)"]
    out = await run(argv, env, work)
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    assert result["is_error"] is False, result
    return result


def claude_records(server: GatewayProcess, session: str) -> list[dict[str, Any]]:
    mine = [r for r in records(server) if r["sessionId"] == session]
    assert mine == records(server)  # every call is filed under Claude Code's session
    return mine


async def test_claude_code_on_a_claude_model(
    server: GatewayProcess, fake_anthropic: fa.FakeAnthropic, tmp_path: Path
) -> None:
    fake_anthropic.default = fa.text_response("(a side request)")
    fake_anthropic.enqueue(fa.text_response("Hello from Claude", usage={"input_tokens": 1234}))
    result = await claude(server, tmp_path, "claude-sonnet-4-6", "Say hello")
    assert result["result"] == "Hello from Claude"
    main = [r for r in claude_records(server, result["session_id"]) if r["inputTokens"] == 1234]
    assert [(r["endpoint"], r["model"]) for r in main] == [("anthropic", "anthropic/claude-sonnet-4-6")]

    fake_anthropic.requests.clear()
    fake_anthropic.enqueue(
        fa.tool_use_response("Bash", {"command": f"echo {TOOL_OUTPUT}"}, id="toolu_cc_1", usage={"input_tokens": 2000}),
        fa.text_response("It printed the word.", usage={"input_tokens": 2100}),
    )
    result = await claude(server, tmp_path, "claude-sonnet-4-6", "Run echo")
    assert result["result"] == "It printed the word."
    last = fake_anthropic.requests[-1].body["messages"]
    results = [b for m in last for b in m["content"] if isinstance(b, dict) and b.get("type") == "tool_result"]
    assert results and results[0]["tool_use_id"] == "toolu_cc_1" and TOOL_OUTPUT in json.dumps(results[0])
    tokens = sorted(r["inputTokens"] for r in records(server) if r["sessionId"] == result["session_id"])
    assert 2000 in tokens and 2100 in tokens
    assert server.log_problems() == []


async def test_claude_code_on_an_openai_model(
    server: GatewayProcess, fake_openai: fo.FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.enqueue(fo.text_response("Hello from GPT", usage=fo.usage(4321, 7)))
    result = await claude(server, tmp_path, "openai/gpt-4o-mini", "Say hello")
    assert result["result"] == "Hello from GPT"
    (record,) = claude_records(server, result["session_id"])
    assert (record["endpoint"], record["model"], record["inputTokens"], record["outputTokens"]) == (
        "anthropic",
        "openai/gpt-4o-mini",
        4321,
        7,
    )
    sent = fake_openai.requests[0].body
    assert sent["messages"][0]["role"] == "system" and "Bash" in [t["function"]["name"] for t in sent["tools"]]

    fake_openai.enqueue(
        fo.tool_calls_response(
            fo.tool_call("call_cc_1", "Bash", {"command": f"echo {TOOL_OUTPUT}"}), usage=fo.usage(5000, 20)
        ),
        fo.text_response("Echoed.", usage=fo.usage(5100, 3)),
    )
    result = await claude(server, tmp_path, "openai/gpt-4o-mini", "Run echo")
    assert result["result"] == "Echoed."
    tool = next(m for m in fake_openai.requests[-1].body["messages"] if m["role"] == "tool")
    assert tool["tool_call_id"] == "call_cc_1" and TOOL_OUTPUT in tool["content"]
    mine = [r for r in records(server) if r["sessionId"] == result["session_id"]]
    assert [(r["inputTokens"], r["outputTokens"]) for r in mine] == [(5000, 20), (5100, 3)]
    assert server.log_problems() == []


# --- the README's other snippets --------------------------------------------------------------------


async def test_readme_responses_and_parse_snippet(
    server: GatewayProcess, fake_openai: fo.FakeOpenAI, fake_anthropic: fa.FakeAnthropic
) -> None:
    fake_openai.enqueue(fo.text_response("Hello from Responses", usage=fo.usage(11, 4)))
    fake_anthropic.enqueue(fa.text_response('{"name": "Ada", "age": 36}', usage={"input_tokens": 77}))
    out = await run_snippet(server, *snippets()["openai-responses"])
    assert out.splitlines() == ["Hello from Responses", "name='Ada' age=36"]
    assert "output_config" in fake_anthropic.requests[0].body
    got = sorted((r["endpoint"], r["inputTokens"]) for r in records(server))
    assert got == [("openai", 77), ("responses", 11)]
