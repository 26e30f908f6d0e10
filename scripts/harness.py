"""Run a real ``agentspace serve`` process for tests and the load and crash scripts.

``GatewayProcess`` writes a config for a data directory and an upstream URL, starts
``python -m agentspace serve --config FILE --port 0`` (loopback, a free port), reads the URL it prints,
and stops it with SIGTERM (graceful) or SIGKILL (a crash). The server's log goes to a file, so a
caller can wait for a line and scan it for unhandled exceptions afterwards.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TEST_KEY = "sk-ant-harness-0123456789abcdef"
# What an unhandled problem looks like in the server's log.
LOG_PROBLEMS = re.compile(r"Traceback|Task exception was never retrieved|Exception ignored| ERROR |CRITICAL")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table: a model group's deployments
        return "{ " + ", ".join(f"{toml_value(str(k))} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> None:
    lines = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in table.items()]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")


def child_env(data_dir: Path, load_plugins: str = "") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env.update(
        AGENTSPACE_HOME=str(data_dir),
        AGENTSPACE_LOAD_PLUGINS=load_plugins,
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        ANTHROPIC_API_KEY=TEST_KEY,
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


class GatewayProcess:
    def __init__(self, data_dir: Path, upstream_url: str, **sections: dict[str, Any]) -> None:
        self.data_dir = data_dir
        self.config_path = data_dir.parent / f"{data_dir.name}.toml"
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        base: dict[str, dict[str, Any]] = {
            "storage": {"data_dir": str(data_dir)},
            "models": {"default": "anthropic/claude-sonnet-4-5"},
            "thinking": {"enabled": False},
            "logging": {"level": "info"},
            "providers.anthropic": {"base_url": upstream_url},
        }
        for name, table in sections.items():
            base.setdefault(name, {}).update(table)
        write_config(self.config_path, base)
        self.process: asyncio.subprocess.Process | None = None
        self.url = ""
        self.load_plugins = ""  # the server's AGENTSPACE_LOAD_PLUGINS (none), e.g. "metrics,telemetry"
        self.preexec_fn: Callable[[], None] | None = None  # run in the server's process before exec (limits)
        # How Python runs the CLI: ``["-c", CODE]`` to register a plugin (a test's tools) before it starts.
        self.launch = ["-m", "agentspace"]

    @property
    def token(self) -> str:
        return (self.data_dir / "gateway-token").read_text(encoding="utf-8").strip()

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1) + "/gateway"

    async def start(self, timeout: float = 60.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                *self.launch,
                "serve",
                "--config",
                str(self.config_path),
                "--port",
                "0",
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                env=child_env(self.data_dir, self.load_plugins),
                cwd=ROOT,
                preexec_fn=self.preexec_fn,
            )
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        match = re.search(rb"listening on (http://\S+)", line)
        if match is None:
            raise RuntimeError(f"the server did not start: {line!r}\n{self.log()}")
        self.url = match.group(1).decode()
        return self.url

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_problems(self) -> list[str]:
        return [line for line in self.log().splitlines() if LOG_PROBLEMS.search(line)]

    async def wait_for_log(self, text: str, timeout: float = 30.0) -> None:
        """Poll the log (bounded) until it contains ``text``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while text not in self.log():
            if loop.time() > deadline:
                raise TimeoutError(f"{text!r} not in the server log")
            await asyncio.sleep(0.02)

    async def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then the exit code (the server shuts down gracefully)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), timeout)

    async def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        await self.process.wait()

    async def aclose(self) -> None:
        """Make sure the process is gone (a failed test must not leave it running)."""
        if self.process is not None and self.process.returncode is None:
            await self.kill()
