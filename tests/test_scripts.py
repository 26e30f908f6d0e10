"""The load and crash scripts in a reduced mode, so CI covers them (the full runs are in the README)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(script: str, *args: str) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout)


def test_load_script() -> None:
    summary = run("load_test.py", "--duration", "3", "--concurrency", "10", "--seed", "1")
    assert summary["problemCount"] == 0 and summary["started"] == summary["requests"] == summary["usageRecords"]
    assert summary["requests"] > 0


def test_crash_script() -> None:
    summary = run("crash_test.py", "--rounds", "2", "--duration", "2", "--concurrency", "10", "--seed", "1")
    assert summary["problemCount"] == 0
    assert all(r["completedSoFar"] > 0 for r in summary["rounds"])  # type: ignore[union-attr]
