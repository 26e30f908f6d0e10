"""`agentspace serve` as a user runs it: a real process, and what a second one on the same data or port says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from scripts.harness import GatewayProcess, child_env


def second_serve(server: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentspace", "serve", "--config", str(server.config_path), *args],
                          env=child_env(server.data_dir), capture_output=True, text=True, timeout=60)


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
