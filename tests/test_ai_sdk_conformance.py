"""POST /api/chat read by the Vercel AI SDK's own client code (npm package ``ai``, pinned in tests/js).

``tests/js/read_stream.mjs`` sends the request with ``DefaultChatTransport`` (what ``useChat`` uses), builds the
message with ``readUIMessageStream`` (the SDK validates every chunk against its schema and checks the part
lifecycle), and asks to resume the finished chat. We assert on the UIMessage it prints.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from agentspace.plugins import create_plugin_manager
from tests.fakes.anthropic_upstream import (
    error_status,
    message_response,
    text_block,
    text_response,
    thinking_block,
    tool_use_response,
    web_citation,
)
from tests.tool_plugins import WeatherTools

JS_DIR = Path(__file__).parent / "js"
NODE = shutil.which("node")
NPM = shutil.which("npm")

pytestmark = pytest.mark.skipif(NODE is None or NPM is None, reason="node and npm are needed to run the AI SDK")


@pytest.fixture(scope="module")
def ai_sdk() -> Path:
    """tests/js with its node_modules installed (CI installs them beforehand; npm ci keeps the lock file)."""
    if not (JS_DIR / "node_modules" / "ai").is_dir():
        result = subprocess.run(
            [NPM, "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0:
            pytest.skip(f"npm ci failed in tests/js (offline?): {result.stderr.strip()[-500:]}")
    return JS_DIR / "read_stream.mjs"


async def read_with_ai_sdk(script: Path, client: TestClient, token: str, body: dict[str, Any]) -> dict[str, Any]:
    # The server runs on this event loop: run node without blocking it.
    proc = await asyncio.create_subprocess_exec(
        NODE,
        str(script),
        str(client.make_url("/api/chat")),
        token,
        json.dumps(body),  # type: ignore[arg-type]
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode()
    return json.loads(stdout)


async def test_ai_sdk_reads_text_reasoning_sources_and_usage(
    ai_sdk: Path, client: TestClient, token: str, fake_anthropic: Any
) -> None:
    fake_anthropic.enqueue(
        message_response(
            thinking_block("Which sources say so?", chunks=3),
            text_block("It is so, ", chunks=2),
            text_block(
                "as cited.",
                chunks=2,
                citations=[
                    web_citation("https://example.com/a", "Page A"),
                    web_citation("https://example.com/b", None),
                ],
            ),
            usage={"input_tokens": 40},
            delta_usages=[{"output_tokens": 12}],
        )
    )
    body = {
        "id": "sdk-chat",
        "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "Is it so?"}]}],
    }
    result = await read_with_ai_sdk(ai_sdk, client, token, body)

    assert result["errors"] == []
    message = result["message"]
    assert message["role"] == "assistant" and message["id"].startswith("msg_")
    parts = [p for p in message["parts"] if p["type"] != "step-start"]
    reasoning = [p for p in parts if p["type"] == "reasoning"]
    texts = [p for p in parts if p["type"] == "text"]
    sources = [p for p in parts if p["type"] == "source-url"]
    assert [(p["text"], p["state"]) for p in reasoning] == [("Which sources say so?", "done")]
    assert "".join(p["text"] for p in texts) == "It is so, as cited."
    assert all(p["state"] == "done" for p in texts)
    assert [(s["url"], s.get("title")) for s in sources] == [
        ("https://example.com/a", "Page A"),
        ("https://example.com/b", None),
    ]
    assert message["parts"][0]["type"] == "step-start"

    usage = message["metadata"]["usage"]
    assert (usage["inputTokens"], usage["outputTokens"], usage["totalTokens"]) == (40, 12, 52)
    assert usage["totalCost"] > 0
    assert result["chunkTypes"][0] == "start" and result["chunkTypes"][-1] == "finish"
    assert result["resumed"] is None  # 204: nothing streaming any more


async def test_ai_sdk_sees_errors(ai_sdk: Path, client: TestClient, token: str, fake_anthropic: Any) -> None:
    fake_anthropic.enqueue(error_status(400, "bad request upstream"))
    body = {"id": "sdk-error", "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}]}
    result = await read_with_ai_sdk(ai_sdk, client, token, body)
    assert len(result["errors"]) == 1 and result["chunkTypes"][-1] == "error"


async def test_ai_sdk_reads_tool_calls_and_results(
    ai_sdk: Path, make_client: Any, token: str, fake_anthropic: Any
) -> None:
    pm = create_plugin_manager()
    pm.register(WeatherTools())
    client = await make_client(pm=pm)
    fake_anthropic.enqueue(
        tool_use_response("get_weather", {"city": "Paris"}, text="Checking."),
        tool_use_response("broken", {}, id="toolu_02"),
        text_response("It is sunny in Paris."),
    )
    body = {
        "id": "sdk-tools",
        "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "weather?"}]}],
    }
    result = await read_with_ai_sdk(ai_sdk, client, token, body)

    assert result["errors"] == []
    parts = result["message"]["parts"]
    assert [p["type"] for p in parts] == [
        "step-start",
        "text",
        "tool-get_weather",
        "step-start",
        "tool-broken",
        "step-start",
        "text",
    ]
    weather, broken = parts[2], parts[4]
    assert (weather["state"], weather["input"], weather["output"]) == (
        "output-available",
        {"city": "Paris"},
        {"city": "Paris", "forecast": "sunny"},
    )
    assert broken["state"] == "output-error" and "sensor offline" in broken["errorText"]
    assert parts[-1]["text"] == "It is sunny in Paris."
