"""The CLI run with its standard output a terminal (a pseudo-terminal): what it printed there."""

from __future__ import annotations

import os
import pty
import subprocess
import sys


def on_a_terminal(*args: str) -> bytes:
    """``agentspace ARGS`` with its standard output a terminal (a pseudo-terminal here): what it printed."""
    master, slave = pty.openpty()
    with subprocess.Popen(
        [sys.executable, "-m", "agentspace", *args], stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.DEVNULL
    ) as process:
        os.close(slave)
        out = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        assert process.wait(timeout=60) == 0
    os.close(master)
    return out
