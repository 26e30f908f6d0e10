"""The CLI as a user sees it: usage, sessions, models, and the chat/inspect clients of a gateway.

``chat`` and ``inspect`` talk to a small aiohttp WebSocket server started here, which speaks the
protocol of docs/protocol.md with canned replies (the real server has its own end-to-end tests).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
from aiohttp import WSMsgType, web
from click.testing import CliRunner

from agentspace.cli import main
from agentspace.cli.usage import parse_since
from agentspace.gateway_token import load_or_create_token
from agentspace.plugins import get_plugin_manager
from agentspace.storage.embedded.sessions import SessionStore
from agentspace.storage.embedded.usage import write_segment


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    data = tmp_path / "home"
    monkeypatch.setenv("AGENTSPACE_HOME", str(data))
    for var in (
        "AGENTSPACE_CONFIG",
        "AGENTSPACE_TOKEN",
        "AGENTSPACE_URL",
        "ANTHROPIC_API_KEY",
        "OPENAI_API_KEY",
        "GEMINI_API_KEY",
    ):
        monkeypatch.delenv(var, raising=False)
    return data


def invoke(*args: str, input: str | None = None) -> Any:
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


# --- usage --------------------------------------------------------------------------------------


def record(i: int, model: str, day: str, session: str = "s1", price_known: bool = True) -> dict[str, Any]:
    return {
        "id": f"r{i}",
        "timestamp": f"{day}T10:00:00.000Z",
        "model": model,
        "provider": model.split("/")[0],
        "sessionId": session,
        "client": None,
        "inputTokens": 1000,
        "outputTokens": 200,
        "cacheReadTokens": 50,
        "cacheWriteTokens": 10,
        "reasoningTokens": 0,
        "totalTokens": 1260,
        "inputCost": 0.003,
        "outputCost": 0.003,
        "totalCost": 0.006,
        "latencyMs": 5.0,
        "finishReason": "stop",
        "estimated": False,
        "priceKnown": price_known,
    }


@pytest.fixture
def usage_data(home: Path) -> None:
    write_segment(
        home,
        "2026-11-01",
        0,
        [
            record(1, "anthropic/claude-sonnet-4-5", "2026-11-01"),
            record(2, "mystery/model", "2026-11-01", "s2", price_known=False),
        ],
    )
    write_segment(home, "2026-11-02", 0, [record(3, "anthropic/claude-sonnet-4-5", "2026-11-02")])


# The text report's header row, word by word (two-word column names split in two).
USAGE_TABLE_HEADER = "model requests errors input output cache read cache write total tokens server tools cost".split()


def test_version_is_the_package_s() -> None:
    import agentspace

    result = CliRunner().invoke(main, ["--version"])
    assert (result.exit_code, result.stdout) == (0, f"agentspace, version {agentspace.__version__}\n")


def test_usage_table(usage_data: None) -> None:
    result = invoke("usage", "--by-model")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].split() == USAGE_TABLE_HEADER
    row = next(line for line in lines if line.startswith("anthropic/claude-sonnet-4-5"))
    assert row.split() == [
        "anthropic/claude-sonnet-4-5",
        "2",
        "0",
        "2,000",
        "400",
        "100",
        "20",
        "2,520",
        "-",
        "$0.012000",
    ]
    assert any(line.startswith("mystery/model*") for line in lines)
    assert any(line.startswith("TOTAL") and line.endswith("$0.018000") for line in lines)
    assert "* price unknown" in result.output


def test_usage_json_is_the_usage_report_shape(usage_data: None) -> None:
    data = json.loads(invoke("usage", "--json").output)
    assert set(data) == {"perModel", "grandTotal", "damagedFiles"}
    assert data["perModel"]["anthropic/claude-sonnet-4-5"]["requestCount"] == 2
    assert data["grandTotal"]["requestCount"] == 3
    assert data["grandTotal"]["totalCost"] == pytest.approx(0.018)
    by_day = json.loads(invoke("usage", "--by-day", "--json").output)
    assert set(by_day) == {"perDay", "grandTotal", "damagedFiles"}
    assert by_day["perDay"]["2026-11-01"]["requestCount"] == 2


def test_usage_filters(usage_data: None) -> None:
    assert json.loads(invoke("usage", "--json", "--session", "s2").output)["grandTotal"]["requestCount"] == 1
    since = json.loads(invoke("usage", "--json", "--since", "2026-11-02").output)
    assert list(since["perModel"]) == ["anthropic/claude-sonnet-4-5"]
    day_table = invoke("usage", "--by-day").output
    assert "2026-11-01" in day_table and "2026-11-02" in day_table
    assert "No usage recorded for session nope." in invoke("usage", "--session", "nope").output
    bad = CliRunner().invoke(main, ["usage", "--since", "yesterday"])
    assert bad.exit_code == 2 and "use a duration" in bad.output


def test_parse_since() -> None:
    from datetime import datetime, timedelta

    now = datetime(2026, 11, 10, 12, tzinfo=UTC)
    assert parse_since("7d", now) == now - timedelta(days=7)
    assert parse_since("24h", now) == now - timedelta(hours=24)
    assert parse_since("30m", now) == now - timedelta(minutes=30)
    assert parse_since("2026-11-01", now) == datetime(2026, 11, 1, tzinfo=UTC)


def test_usage_empty() -> None:
    assert invoke("usage").output == "No usage recorded.\n"


def test_usage_starts_without_heavy_imports(usage_data: None, home: Path) -> None:
    """`agentspace usage` must stay quick: no asyncio, aiohttp, provider SDK or litellm import on its path."""
    env = {**os.environ, "AGENTSPACE_HOME": str(home)}
    env.pop("AGENTSPACE_LOAD_PLUGINS", None)  # installed plugins must not be imported either
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "agentspace", "usage", "--by-model"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "anthropic/claude-sonnet-4-5" in result.stdout
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in result.stderr.splitlines() if "|" in line}
    assert not imported & {"asyncio", "aiohttp", "anthropic", "litellm", "openai", "tiktoken", "agentspace_echo"}


# --- sessions -----------------------------------------------------------------------------------


@pytest.fixture
def session_id(home: Path) -> str:
    async def seed() -> str:
        store = SessionStore(home)
        info = await store.create(model="anthropic/claude-sonnet-4-5")
        await store.append_message(info["id"], {"role": "user", "content": "What is 2+2?"})
        await store.append_message(
            info["id"],
            {
                "role": "assistant",
                "content": "4",
                "model": "anthropic/claude-sonnet-4-5",
                "finishReason": "stop",
                "usage": {"inputTokens": 12, "outputTokens": 1, "totalCost": 0.000051},
            },
        )
        await store.aclose()
        return str(info["id"])

    return asyncio.run(seed())


def test_sessions_list_show_delete(session_id: str) -> None:
    listing = invoke("sessions", "list").output
    assert session_id in listing and "What is 2+2?" in listing
    assert json.loads(invoke("sessions", "list", "--json").output)[0]["messageCount"] == 2

    shown = invoke("sessions", "show", session_id).output
    assert "What is 2+2?" in shown and "12 in / 1 out, $0.000051" in shown
    assert [m["role"] for m in json.loads(invoke("sessions", "show", session_id, "--json").output)["messages"]] == [
        "user",
        "assistant",
    ]

    refused = CliRunner().invoke(main, ["sessions", "delete", session_id], input="n\n")
    assert refused.exit_code == 1 and session_id in invoke("sessions", "list").output
    assert invoke("sessions", "delete", session_id, "--yes").output == f"Deleted session {session_id}\n"
    assert "No sessions yet" in invoke("sessions", "list").output


@pytest.mark.parametrize("command", [["show", "s_nope"], ["delete", "s_nope", "--yes"], ["delete", "s_nope"]])
def test_unknown_session(command: list[str]) -> None:
    result = CliRunner().invoke(main, ["sessions", *command])
    assert result.exit_code == 1
    assert "No session with id 's_nope'" in result.output


# --- models -------------------------------------------------------------------------------------


def models_json(*args: str) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in json.loads(invoke("models", "--json", *args).output)}


def test_models_follow_keys(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    assert not any(m.startswith(("anthropic/", "openai/")) for m in models_json())
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    models = models_json()
    sonnet = models["anthropic/claude-sonnet-4-6"]
    assert sonnet["provider"] == "anthropic" and sonnet["default"] is True
    assert (sonnet["inputPerMTok"], sonnet["outputPerMTok"]) == (3.0, 15.0)
    assert sonnet["contextWindow"] and sonnet["supportsReasoning"] is True
    assert not any(m.startswith("openai/") for m in models)
    invoke("keys", "add", "openai", input="sk-openai-test-key-000\n")
    # A model with no deprecation date in the cost map: models past theirs are not listed.
    assert "openai/gpt-5.4-mini" in models_json()


def test_models_all_and_table() -> None:
    models = models_json("--all")
    assert {"anthropic/claude-sonnet-4-5", "openai/gpt-4o-mini"} <= set(models)
    assert any(m.startswith("gemini/") for m in models)
    deprecated = [m for m in models.values() if m["deprecated"]]
    assert all(m["deprecationDate"] <= time.strftime("%Y-%m-%d") for m in deprecated)
    table = invoke("models", "--all").output
    assert table.splitlines()[0].split()[:4] == ["model", "provider", "in", "$/MTok"]
    assert "anthropic/claude-sonnet-4-6 (default)" in table
    if deprecated:
        assert "DEPRECATED" in table


def test_models_from_config_and_plugins(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        '[providers.ollama]\nbase_url = "http://127.0.0.1:11434"\nmodels = ["llama3.2"]\n'
        '[pricing."ollama/llama3.2"]\ninput_per_mtok = 0\noutput_per_mtok = 0\n'
    )

    class Lister:
        name = "listing"

        def claims(self, model: str) -> bool:
            return model.startswith("listing/")

        def models(self) -> list[str]:
            return ["listing/one"]

    class Plugin:
        @staticmethod
        def register_providers(register: Any, config: Any) -> None:
            register(Lister())

    from agentspace import hookimpl

    Plugin.register_providers = hookimpl(Plugin.register_providers)  # type: ignore[method-assign]
    pm = get_plugin_manager()
    pm.register(Plugin, name="test-listing")
    try:
        models = {m["id"]: m for m in json.loads(invoke("--config", str(config), "models", "--json").output)}
    finally:
        pm.unregister(name="test-listing")
    assert models["ollama/llama3.2"]["provider"] == "ollama"
    assert models["ollama/llama3.2"]["priceKnown"] is True
    assert models["listing/one"]["provider"] == "listing"


# --- a fake gateway -----------------------------------------------------------------------------

USAGE = {
    "inputTokens": 312,
    "outputTokens": 87,
    "totalTokens": 399,
    "cacheReadTokens": 0,
    "cacheWriteTokens": 0,
    "reasoningTokens": 12,
    "inputCost": 0.000936,
    "outputCost": 0.000298,
    "totalCost": 0.001234,
}


@dataclass
class FakeGateway:
    token: str
    url: str = ""
    received: list[dict[str, Any]] = field(default_factory=list)
    auth_headers: list[str | None] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.auth_headers.append(request.headers.get("Authorization"))
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            raise web.HTTPUnauthorized()
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        aborted = asyncio.Event()
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            frame = json.loads(msg.data)
            if frame["type"] == "auth":  # as the gateway answers a connection its header authenticated
                await ws.send_json({"type": "auth.ok", "requestId": frame["id"]})
                continue
            self.received.append(frame)
            if frame["type"] == "chat.send":
                asyncio.ensure_future(self.chat(ws, frame, aborted))
            elif frame["type"] == "chat.abort":
                aborted.set()
            elif frame["type"] == "context.inspect":
                await self.inspect(ws, frame)
        return ws

    async def chat(self, ws: web.WebSocketResponse, frame: dict[str, Any], aborted: asyncio.Event) -> None:
        rid, content = frame["id"], frame["content"]
        session = frame.get("sessionId")
        if session == "s_missing":
            await ws.send_json(
                {"type": "error", "requestId": rid, "code": "SESSION_NOT_FOUND", "message": "No session s_missing"}
            )
            return
        model = frame.get("model", "anthropic/claude-sonnet-4-5")
        if session is None:
            session = "s_new"
            await ws.send_json({"type": "session.created", "requestId": rid, "sessionId": session, "model": model})
        await ws.send_json({"type": "chat.stream.start", "requestId": rid, "sessionId": session, "model": model})
        if content == "fail":
            await ws.send_json({"type": "error", "requestId": rid, "code": "LLM_ERROR", "message": "upstream broke"})
            return
        if content == "slow":
            while not aborted.is_set():
                await ws.send_json(
                    {"type": "chat.stream.delta", "requestId": rid, "delta": "la ", "contentType": "text"}
                )
                await asyncio.sleep(0.02)
            aborted.clear()
            await ws.send_json({"type": "chat.stream.end", "requestId": rid, "finishReason": "aborted", "usage": USAGE})
            return
        for f in [
            {"type": "chat.stream.reasoning", "delta": "Pondering the question."},
            {"type": "chat.stream.delta", "delta": "Hello ", "contentType": "text"},
            {"type": "chat.stream.tool_call", "toolCallId": "t1", "name": "search", "input": {"q": content}},
            {
                "type": "chat.stream.tool_result",
                "toolCallId": "t1",
                "name": "search",
                "output": "3 hits",
                "isError": False,
            },
            {"type": "chat.stream.delta", "delta": f"you said: {content}", "contentType": "text"},
            {"type": "chat.stream.source", "source": {"url": "https://example.com/a", "title": "Example A"}},
            {"type": "chat.stream.end", "finishReason": "stop", "usage": USAGE},
        ]:
            await ws.send_json({**f, "requestId": rid})

    async def inspect(self, ws: web.WebSocketResponse, frame: dict[str, Any]) -> None:
        rid = frame["id"]
        if frame["sessionId"] == "s_missing":
            await ws.send_json(
                {"type": "error", "requestId": rid, "code": "SESSION_NOT_FOUND", "message": "No session s_missing"}
            )
            return
        sections = [
            {"name": "system_prompt", "byteCount": 28, "tokenEstimate": 6, "costEstimate": 0.000018},
            {"name": "history", "byteCount": 12000, "tokenEstimate": 3000, "costEstimate": 0.009},
        ]
        await ws.send_json(
            {
                "type": "context.inspection",
                "requestId": rid,
                "sessionId": frame["sessionId"],
                "model": frame.get("model", "anthropic/claude-sonnet-4-5"),
                "sections": sections,
                "totals": {"byteCount": 12028, "tokenEstimate": 3006, "costEstimate": 0.009018},
            }
        )


@pytest.fixture
def gateway(home: Path) -> Iterator[FakeGateway]:
    """The fake gateway on 127.0.0.1 in a thread of its own (the CLI runs its own event loop)."""
    fake = FakeGateway(token=load_or_create_token(home))
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    runner_box: list[web.AppRunner] = []

    async def start() -> None:
        app = web.Application()
        app.router.add_get("/gateway", fake.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        fake.url = f"ws://127.0.0.1:{port}/gateway"
        runner_box.append(runner)
        ready.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    thread.start()
    assert ready.wait(10)
    yield fake
    asyncio.run_coroutine_threadsafe(runner_box[0].cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


# --- chat ---------------------------------------------------------------------------------------


def test_chat_streams_and_remembers_the_session(gateway: FakeGateway) -> None:
    result = CliRunner().invoke(main, ["chat", "--url", gateway.url], input="hi there\nand again\n")
    assert result.exit_code == 0, result.output
    assert "Hello you said: hi there" in result.stdout
    assert "Hello you said: and again" in result.stdout
    assert "Pondering the question." in result.stderr  # reasoning, dimmed, beside the answer
    assert "→ search" in result.stderr and "← search: 3 hits" in result.stderr
    assert "Sources:\n  1. Example A <https://example.com/a>" in result.stdout
    assert result.stderr.count("[312 in / 87 out tokens, $0.001234]") == 2
    assert "[session s_new" in result.stderr

    sends = [f for f in gateway.received if f["type"] == "chat.send"]
    assert [f["content"] for f in sends] == ["hi there", "and again"]
    assert "sessionId" not in sends[0] and sends[1]["sessionId"] == "s_new"
    assert len({f["id"] for f in sends}) == 2
    assert gateway.auth_headers == [f"Bearer {gateway.token}"]


def test_chat_session_and_model_options(gateway: FakeGateway) -> None:
    result = CliRunner().invoke(
        main, ["chat", "--url", gateway.url, "--session", "s_old", "-m", "openai/gpt-4o"], input="hello\n"
    )
    assert result.exit_code == 0, result.output
    (send,) = [f for f in gateway.received if f["type"] == "chat.send"]
    assert send["sessionId"] == "s_old" and send["model"] == "openai/gpt-4o"
    assert "[session" not in result.output  # no session was created


def test_chat_errors_are_shown_with_their_code(gateway: FakeGateway) -> None:
    result = CliRunner().invoke(main, ["chat", "--url", gateway.url], input="fail\nfine\n")
    assert result.exit_code == 1  # piped input: a failed message fails the command
    assert "Error [LLM_ERROR]: upstream broke" in result.stderr
    assert "you said: fine" in result.stdout  # and the next line still went through

    missing = CliRunner().invoke(main, ["chat", "--url", gateway.url, "--session", "s_missing"], input="x\n")
    assert missing.exit_code == 1 and "Error [SESSION_NOT_FOUND]" in missing.output


def test_chat_wrong_token_and_no_server(gateway: FakeGateway) -> None:
    refused = CliRunner().invoke(main, ["chat", "--url", gateway.url, "--token", "wrong"], input="hi\n")
    assert refused.exit_code == 1
    assert "refused the token (HTTP 401)" in refused.output and "agentspace token" in refused.output

    down = CliRunner().invoke(main, ["chat", "--url", "ws://127.0.0.1:9/gateway"], input="hi\n")
    assert down.exit_code == 1
    assert "Cannot connect to the gateway at ws://127.0.0.1:9/gateway" in down.output
    assert "agentspace serve" in down.output


def test_chat_ctrl_c_aborts_the_answer_not_the_client(gateway: FakeGateway, home: Path) -> None:
    env = {**os.environ, "AGENTSPACE_HOME": str(home), "AGENTSPACE_LOAD_PLUGINS": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentspace", "chat", "--url", gateway.url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdin is not None
        proc.stdin.write("slow\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 20
        while not any(f["type"] == "chat.send" for f in gateway.received):
            assert time.monotonic() < deadline, "chat.send never arrived"
            time.sleep(0.05)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        while not any(f["type"] == "chat.abort" for f in gateway.received):
            assert time.monotonic() < deadline, "chat.abort never arrived"
            time.sleep(0.05)
        out, err = proc.communicate(input="after\n", timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    send, abort = [f for f in gateway.received if f["type"] in ("chat.send", "chat.abort")][:2]
    assert abort["requestId"] == send["id"]
    assert "la la" in out and "· aborted]" in err
    assert "you said: after" in out  # the client kept going after the interrupted answer


# --- inspect ------------------------------------------------------------------------------------


def test_inspect_table_and_json(gateway: FakeGateway) -> None:
    result = invoke("inspect", "s_abc", "--url", gateway.url)
    lines = result.output.splitlines()
    assert "s_abc" in lines[0] and "anthropic/claude-sonnet-4-5" in lines[0]
    assert next(line for line in lines if line.startswith("history")).split() == [
        "history",
        "12,000",
        "3,000",
        "$0.009000",
    ]
    assert next(line for line in lines if line.startswith("TOTAL")).split() == ["TOTAL", "12,028", "3,006", "$0.009018"]
    (frame,) = [f for f in gateway.received if f["type"] == "context.inspect"]
    assert frame["sessionId"] == "s_abc" and frame["id"]

    data = json.loads(invoke("inspect", "s_abc", "--url", gateway.url, "--json", "--model", "openai/gpt-4o").output)
    assert data["model"] == "openai/gpt-4o" and data["totals"]["tokenEstimate"] == 3006
    assert [s["name"] for s in data["sections"]] == ["system_prompt", "history"]


def test_inspect_unknown_session(gateway: FakeGateway) -> None:
    result = CliRunner().invoke(main, ["inspect", "s_missing", "--url", gateway.url])
    assert result.exit_code == 1 and "[SESSION_NOT_FOUND] No session s_missing" in result.output


def test_default_url_comes_from_the_config(gateway: FakeGateway, tmp_path: Path) -> None:
    port = gateway.url.split(":")[2].split("/")[0]
    config = tmp_path / "c.toml"
    config.write_text(f'[server]\nhost = "0.0.0.0"\nport = {port}\n')
    result = invoke("--config", str(config), "inspect", "s_abc")
    assert "TOTAL" in result.output
