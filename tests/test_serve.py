"""`agentspace serve` as a user runs it: a real process, and what a second one on the same data or port says."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from scripts.harness import GatewayProcess, child_env
from tests.fakes import anthropic_upstream as fa


def second_serve(server: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentspace", "serve", "--config", str(server.config_path), *args],
        env=child_env(server.data_dir),
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_second_server_on_the_same_data_refuses_before_binding(tmp_path: Path, fake_anthropic: Any) -> None:
    server = GatewayProcess(tmp_path / "data", fake_anthropic.url)
    url = await server.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/healthz") as resp:
                assert resp.status == 200 and await resp.json() == {"status": "ok"}

        other = second_serve(server, "--port", "0")
        assert other.returncode == 1
        assert "listening" not in other.stdout
        assert "already using" in other.stderr and str(tmp_path / "data") in other.stderr
        assert "Traceback" not in other.stderr

        port = url.rsplit(":", 1)[1]
        taken = second_serve(server, "--port", port, "--data-dir", str(tmp_path / "other-data"))
        assert taken.returncode == 1 and "cannot listen on 127.0.0.1:" + port in taken.stderr
        assert "Traceback" not in taken.stderr
    finally:
        assert await server.terminate() == 0


@pytest.mark.parametrize("event_loop", ["auto", "asyncio"])
async def test_serve_chats_on_the_configured_event_loop(tmp_path: Path, fake_anthropic: Any, event_loop: str) -> None:
    """``[server] event_loop``: "auto" runs uvloop where it is installed (a dependency off Windows), "asyncio"
    the standard library's loop; a streamed chat and its stored answer work on either."""
    server = GatewayProcess(tmp_path / "data", fake_anthropic.url, server={"event_loop": event_loop})
    await server.start()
    try:
        expected = "uvloop" if event_loop == "auto" and importlib.util.find_spec("uvloop") else "asyncio"
        await server.wait_for_log(f"event loop: {expected}")
        headers = {"Authorization": f"Bearer {server.token}"}
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(server.ws_url, headers=headers) as ws:
                await ws.send_json({"type": "chat.send", "id": "1", "content": "Hello"})
                frames = []
                while not frames or frames[-1]["type"] not in ("chat.stream.end", "error"):
                    frames.append(await ws.receive_json(timeout=30))
            session_id = frames[0]["sessionId"]
            async with http.get(f"{server.url}/api/sessions/{session_id}", headers=headers) as resp:
                messages = (await resp.json())["session"]["messages"]
        assert frames[-1]["type"] == "chat.stream.end"
        text = "".join(f["delta"] for f in frames if f["type"] == "chat.stream.delta")
        assert text == fa.DEFAULT_TEXT
        assert [m["role"] for m in messages] == ["user", "assistant"] and messages[1]["content"] == fa.DEFAULT_TEXT
    finally:
        assert await server.terminate() == 0
    assert server.log_problems() == []


def test_serve_names_a_missing_uvloop(tmp_path: Path) -> None:
    """``event_loop = "uvloop"`` without uvloop installed stops before binding, saying what to install."""
    config = tmp_path / "agentspace.toml"
    config.write_text(
        f'[server]\nevent_loop = "uvloop"\n\n[storage]\ndata_dir = "{tmp_path / "data"}"\n', encoding="utf-8"
    )
    blocker = tmp_path / "no-uvloop"
    blocker.mkdir()
    (blocker / "uvloop.py").write_text("raise ImportError('uvloop is not installed here')\n", encoding="utf-8")
    env = child_env(tmp_path / "data")
    env["PYTHONPATH"] = str(blocker) + os.pathsep + env["PYTHONPATH"]
    result = subprocess.run(
        [sys.executable, "-m", "agentspace", "serve", "--config", str(config), "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "uvloop is not installed: pip install uvloop" in result.stderr
    assert "listening" not in result.stdout and "Traceback" not in result.stderr
