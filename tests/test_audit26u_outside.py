"""Issue 26 (every client unchanged) tried from outside with the third-party clients people point at a gateway:
the Vercel AI SDK's provider packages (``@ai-sdk/openai``, ``@ai-sdk/anthropic``, ``@ai-sdk/openai-compatible``,
pinned in tests/js/package.json), Simon Willison's ``llm`` and litellm's own SDK as a client, each against the
gateway's /v1 routes with the fake upstreams behind (docs: README "Use it from your tools")."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.fakes import openai_upstream as fo
from tests.fakes.openai_upstream import FakeOpenAI
from tests.test_v1_structured import client, records  # noqa: F401

JS_DIR = Path(__file__).parent / "js"
NODE = shutil.which("node")
needs_ai_sdk = pytest.mark.skipif(
    NODE is None or not (JS_DIR / "node_modules" / "@ai-sdk" / "openai").is_dir(),
    reason="node and tests/js's node_modules (npm ci in tests/js) are needed to run the AI SDK",
)

# The AI SDK's providers pointed at the gateway's /v1, as its docs show for any OpenAI- or Anthropic-compatible
# server. A script prints one JSON line: what the test reads.
AI_SDK = """
import { createOpenAI } from '@ai-sdk/openai';
import { createAnthropic } from '@ai-sdk/anthropic';
import { createOpenAICompatible } from '@ai-sdk/openai-compatible';
import { generateText, streamText, generateObject, Output, tool, stepCountIs, jsonSchema } from 'ai';
const openai = createOpenAI({ baseURL: process.env.BASE_URL, apiKey: process.env.TOKEN });
const anthropic = createAnthropic({ baseURL: process.env.BASE_URL, apiKey: process.env.TOKEN });
const compat = createOpenAICompatible({
  name: 'agentspace', baseURL: process.env.BASE_URL, apiKey: process.env.TOKEN, includeUsage: true,
});
const weather = tool({
  description: 'The weather in a city',
  inputSchema: jsonSchema({ type: 'object', properties: { city: { type: 'string' } }, required: ['city'] }),
  execute: async ({ city }) => ({ city, temperature: 21 }),
});
const failure = (e) => ({ error: e.message, status: e.statusCode ?? null, body: e.responseBody ?? null });
"""


async def run_ai_sdk(gateway: TestClient, token: str, script: str) -> Any:
    """Runs ``script`` (after the providers above) with node in tests/js; returns the JSON it printed."""
    process = await asyncio.create_subprocess_exec(
        NODE or "node", "--input-type=module", "-e", AI_SDK + script,
        cwd=JS_DIR,
        env={**os.environ, "BASE_URL": f"http://127.0.0.1:{gateway.port}/v1", "TOKEN": token},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()
    return json.loads(out.decode().strip().splitlines()[-1])


@needs_ai_sdk
async def test_the_ai_sdk_default_provider_is_told_to_send_store_false(
    client: TestClient,  # noqa: F811
    token: str,
    fake_openai: FakeOpenAI,
) -> None:
    """``openai(model)``, the AI SDK's default (the Responses API), keeps ``store`` on unless told: the step after
    a tool call sends the answer's text back as an ``item_reference`` to it, which a gateway that stores no
    responses cannot look up. The 400 said only that the item type is not taken; it now says why and what to
    send (``store: false``, which the README shows), and with it the tool loop runs, one record per step."""
    fake_openai.enqueue(
        fo.tool_calls_response(fo.tool_call("call_1", "weather", {"city": "Paris"}), text="Let me look.")
    )
    refused = await run_ai_sdk(client, token, """
try {
  await generateText({ model: openai('openai/gpt-4o-mini'), prompt: 'Weather in Paris?', tools: { weather },
    stopWhen: stepCountIs(3), maxRetries: 0 });
  console.log(JSON.stringify({ error: null }));
} catch (e) { console.log(JSON.stringify(failure(e))); }
""")  # fmt: skip
    assert refused["status"] == 400, refused
    error = json.loads(refused["body"])["error"]
    assert error["param"] == "input[1].type" and "stores no responses" in error["message"], error
    assert "store: false" in error["message"], error

    fake_openai.enqueue(
        fo.tool_calls_response(fo.tool_call("call_1", "weather", {"city": "Paris"}), text="Let me look.")
    )
    fake_openai.enqueue(fo.text_response("Sunny, 21 degrees.", usage=fo.usage(41, 7)))
    answer = await run_ai_sdk(client, token, """
const r = await generateText({ model: openai('openai/gpt-4o-mini'), prompt: 'Weather in Paris?', tools: { weather },
  stopWhen: stepCountIs(3), maxRetries: 0, providerOptions: { openai: { store: false } } });
console.log(JSON.stringify({ text: r.text, steps: r.steps.map((s) => s.finishReason) }));
""")  # fmt: skip
    assert answer == {"text": "Sunny, 21 degrees.", "steps": ["tool-calls", "stop"]}
    sent = fake_openai.requests[-1].body["messages"]
    assert sent[1] == {
        "role": "assistant",
        "content": "Let me look.",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
        ],
    }
    usage = [(r["endpoint"], r["inputTokens"], r["outputTokens"]) for r in await records(client)]
    assert usage[-2:] == [("responses", 20, 10), ("responses", 41, 7)]


PDF = "JVBERi0xLjQKMSAwIG9iago8PD4+CmVuZG9iagp0cmFpbGVyCjw8Pj4KJSVFT0YK"


@needs_ai_sdk
async def test_a_pdf_by_url_for_an_openai_model_is_refused_by_what_it_is(
    client: TestClient,  # noqa: F811
    token: str,
    fake_openai: FakeOpenAI,
) -> None:
    """A PDF given by URL (the AI SDK's file part with a ``URL``: ``input_file.file_url`` on /v1/responses, a
    ``document`` with a URL source on /v1/messages) for an OpenAI model, which the gateway calls through Chat
    Completions: the URL went as ``file_data``, which OpenAI takes only as the file's data, and its 400 named
    ``messages[0].content[1].file.file_data``, a field the client never sent. It is now refused before the call,
    saying what cannot be sent and what to send; the same file as base64 data goes through."""
    results = await run_ai_sdk(client, token, """
const out = [];
for (const model of [openai('openai/gpt-4o-mini'), anthropic('openai/gpt-4o-mini')]) {
  for (const data of [new URL('https://example.com/report.pdf'), '""" + PDF + """']) {
    try {
      const r = await generateText({ model, maxRetries: 0, maxOutputTokens: 100, messages: [{ role: 'user', content: [
        { type: 'text', text: 'Summarize' }, { type: 'file', data, mediaType: 'application/pdf', filename: 'report.pdf' },
      ] }] });
      out.push({ text: r.text });
    } catch (e) { out.push(failure(e)); }
  }
}
console.log(JSON.stringify(out));
""")  # fmt: skip
    by_url = [results[0], results[2]]
    for refused in by_url:
        assert refused["status"] == 400, results
        assert "file_data" not in refused["error"], refused
        assert refused["error"].startswith("A document by URL (https://example.com/report.pdf) cannot be sent"), refused
    assert [r.get("text") for r in (results[1], results[3])] == ["Hello from the fake OpenAI upstream."] * 2
    assert len(fake_openai.requests) == 2  # the base64 ones only
    for request in fake_openai.requests:
        (user,) = [m for m in request.body["messages"] if m["role"] == "user"]
        assert user["content"][1]["file"]["file_data"] == f"data:application/pdf;base64,{PDF}"


@needs_ai_sdk
@pytest.mark.parametrize("model", ["openai/o3", "openai/o4-mini", "openai/gpt-5"])
async def test_a_reasoning_models_system_prompt_stays_a_system_prompt(
    client: TestClient,  # noqa: F811
    token: str,
    fake_openai: FakeOpenAI,
    model: str,
) -> None:
    """OpenAI's reasoning models take instructions as a developer message (what OpenAI makes of a system one).
    For o3 and o4-mini, which litellm's model map does not mark as taking system messages, litellm sent the
    system prompt as a *user* message: the AI SDK's ``system`` (and Codex's instructions) reached the model as
    something the user said. It now goes as a developer message, as the client sent it to OpenAI."""
    fake_openai.enqueue(fo.text_response("Bonjour."))
    fake_openai.enqueue(fo.text_response("Bonjour."))
    out = await run_ai_sdk(client, token, f"""
const out = [];
for (const make of [openai.chat, openai.responses]) {{
  const r = await generateText({{ model: make('{model}'), system: 'Answer in French.', prompt: 'Hello', maxRetries: 0 }});
  out.push(r.text);
}}
console.log(JSON.stringify(out));
""")  # fmt: skip
    assert out == ["Bonjour.", "Bonjour."]
    for request in fake_openai.requests:
        assert request.body["messages"] == [
            {"role": "system" if model == "openai/gpt-5" else "developer", "content": "Answer in French."},
            {"role": "user", "content": "Hello"},
        ], request.body["messages"]
