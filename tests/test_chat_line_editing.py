"""`agentspace chat` on a terminal: line editing and a history kept in the data directory (readline).

The client runs as a user runs it, in its own process on a pseudo-terminal, against the real gateway
(which calls the fake Anthropic upstream); keys are typed as a terminal sends them.
"""

from __future__ import annotations

import asyncio
import os
import pty
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

pytest.importorskip("readline")

UP, LEFT, ENTER, CTRL_D = "\x1b[A", "\x1b[D", "\r", "\x04"


class Terminal:
    """``agentspace chat`` on a pseudo-terminal: type keys, wait for what it prints."""

    def __init__(self, url: str, home: Path) -> None:
        master, slave = pty.openpty()
        env = {**os.environ, "AGENTSPACE_HOME": str(home), "AGENTSPACE_LOAD_PLUGINS": "", "TERM": "xterm"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agentspace", "chat", "--url", url],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
        )
        os.close(slave)
        self.master = master
        self.output = ""
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:  # the client exited and the terminal closed
                return
            if not data:
                return
            with self._lock:
                self.output += data.decode("utf-8", "replace")

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def wait_for(self, text: str, count: int = 1, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self.output.count(text) >= count:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} did not appear {count} time(s); the terminal shows:\n{self.output}")
            time.sleep(0.02)

    def exit(self) -> int:
        self.type(CTRL_D)
        try:
            return self.proc.wait(timeout=20)
        finally:
            os.close(self.master)


def sent_messages(fake_anthropic: Any) -> list[str]:
    """The user message of each call that reached the upstream."""
    out = []
    for request in fake_anthropic.requests:
        content = request.body["messages"][-1]["content"]
        out.append(content if isinstance(content, str) else "".join(b.get("text", "") for b in content))
    return out


def drive(url: str, home: Path, keys: list[str]) -> int:
    """Type each entry of ``keys`` at a fresh prompt (after the previous answer), then Ctrl-D."""
    terminal = Terminal(url, home)
    try:
        for n, entry in enumerate(keys, 1):
            terminal.wait_for("> ", count=n)
            terminal.type(entry)
            terminal.wait_for(" out tokens", count=n)  # the answer's usage line: the turn is over
        terminal.wait_for("> ", count=len(keys) + 1)
        return terminal.exit()
    finally:
        if terminal.proc.poll() is None:
            terminal.proc.kill()
            terminal.proc.wait()


async def test_up_recalls_and_history_survives_a_restart(
    client: TestClient, fake_anthropic: Any, isolated_env: Path
) -> None:
    url = str(client.make_url("/gateway")).replace("http://", "ws://")
    history = isolated_env / "chat_history"

    # Editing: the cursor moves left and a letter goes in mid-line. Recall: Up brings the last line back.
    keys = ["helo" + LEFT + "l" + ENTER, UP + ENTER, "second" + ENTER]
    code = await asyncio.to_thread(drive, url, isolated_env, keys)
    assert code == 0
    assert sent_messages(fake_anthropic) == ["hello", "hello", "second"]
    # Kept in the data dir, private to the user, each line once (a repeated line is not stored twice).
    assert stat.S_IMODE(history.stat().st_mode) == 0o600
    assert [line for line in history.read_text().splitlines() if not line.startswith("_HiStOrY")] == ["hello", "second"]

    # A new client starts with that history: Up Up is the line before the last one.
    code = await asyncio.to_thread(drive, url, isolated_env, [UP + UP + ENTER])
    assert code == 0
    assert sent_messages(fake_anthropic)[-1] == "hello"
    assert history.read_text().splitlines()[-1] == "hello"


async def test_ctrl_c_at_the_prompt_gives_the_terminal_back(client: TestClient, isolated_env: Path) -> None:
    """readline puts the terminal in its own mode while it reads; quitting from the prompt must undo it."""
    import signal
    import termios

    url = str(client.make_url("/gateway")).replace("http://", "ws://")

    def quit_at_the_prompt() -> tuple[int, int]:
        terminal = Terminal(url, isolated_env)
        try:
            terminal.wait_for("> ")
            time.sleep(0.2)  # readline is now waiting for a key, in its mode
            assert not termios.tcgetattr(terminal.master)[3] & termios.ICANON
            terminal.proc.send_signal(signal.SIGINT)
            code = terminal.proc.wait(timeout=20)
            return code, termios.tcgetattr(terminal.master)[3]
        finally:
            if terminal.proc.poll() is None:
                terminal.proc.kill()
                terminal.proc.wait()
            os.close(terminal.master)

    code, local_modes = await asyncio.to_thread(quit_at_the_prompt)
    assert code == 0
    assert local_modes & termios.ICANON and local_modes & termios.ECHO
