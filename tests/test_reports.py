"""Usage reports (issue 14 item 4): requests and errors counted apart, the same in ``agentspace usage --json``,
``/api/usage`` and the WebSocket ``usage.report``; the text report's TOTAL row shows every column; models
priced by the fallback are flagged ``priceKnown: false``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient
from click.testing import CliRunner

from agentspace.cli import main as cli
from agentspace.storage import UsageStore
from agentspace.storage.embedded.usage import write_segment
from agentspace.types import Cost, TokenUsage, UsageRecord, now_iso
from tests.fakes.anthropic_upstream import error_status
from tests.support.ws import chat, connect, receive_after
from tests.test_cli import USAGE_TABLE_HEADER

SONNET = "anthropic/claude-sonnet-4-5"
MYSTERY = "mystery/model"


def record(
    n: int,
    model: str = SONNET,
    *,
    tokens: tuple[int, int] = (100, 20),
    error: str | None = None,
    answered: bool = True,
    price_known: bool = True,
    finish: str = "stop",
) -> UsageRecord:
    return UsageRecord(
        f"u{n}",
        now_iso(),
        model,
        model.split("/")[0],
        "s1",
        "test",
        TokenUsage(*tokens),
        Cost(tokens[0] * 1e-6, tokens[1] * 1e-6),
        5.0,
        finish,
        price_known=price_known,
        error=error,
        answered=answered,
    )


async def store_records(data_dir: Path) -> None:
    store = UsageStore(data_dir)
    await store.append(record(1))
    await store.append(record(2))
    await store.append(record(3, tokens=(100, 5), error="LLM_ERROR", finish="error"))  # answered, then failed
    await store.append(record(4, tokens=(0, 0), error="NO_API_KEY", answered=False, finish="error"))  # never answered
    await store.append(record(5, MYSTERY, tokens=(10, 10), price_known=False))
    await store.aclose()
    # A record written before records had ``error``: its finish reason says it failed.
    legacy = {
        k: v
        for k, v in record(6, tokens=(50, 0), finish="error").to_dict().items()
        if k not in ("error", "answered", "attempts")
    } | {"timestamp": "2026-01-01T10:00:00.000Z"}
    write_segment(data_dir, "2026-01-01", 0, [legacy])


def check(report: dict[str, Any]) -> None:
    sonnet, mystery, grand = report["perModel"][SONNET], report["perModel"][MYSTERY], report["grandTotal"]
    assert (sonnet["requestCount"], sonnet["errorCount"]) == (4, 3)  # u1 u2 u3 u6 answered; u3 u4 u6 failed
    assert (mystery["requestCount"], mystery["errorCount"]) == (1, 0)
    assert (grand["requestCount"], grand["errorCount"]) == (5, 3)
    assert sonnet["inputTokens"] == 350 and grand["inputTokens"] == 360
    assert mystery["priceKnown"] is False and "priceKnown" not in sonnet
    assert grand["priceKnown"] is False  # the total has a part at the fallback price
    assert report["damagedFiles"] == []


async def test_reports_count_requests_and_errors_apart(
    client: TestClient, token: str, auth_headers: dict[str, str], isolated_env: Path
) -> None:
    await store_records(isolated_env)
    result = CliRunner().invoke(cli, ["usage", "--json"])
    assert result.exit_code == 0, result.output
    check(json.loads(result.stdout))
    resp = await client.get("/api/usage", headers=auth_headers)
    assert resp.status == 200
    check(await resp.json())
    ws = await connect(client, token)
    check(await receive_after(ws, {"type": "usage.query", "id": "q1"}))
    await ws.close()
    by_day = json.loads(CliRunner().invoke(cli, ["usage", "--by-day", "--json"]).stdout)
    assert by_day["perDay"]["2026-01-01"]["errorCount"] == 1
    assert (by_day["grandTotal"]["requestCount"], by_day["grandTotal"]["errorCount"]) == (5, 3)


def test_text_report_total_row_shows_every_column(isolated_env: Path) -> None:
    import asyncio

    asyncio.run(store_records(isolated_env))
    result = CliRunner().invoke(cli, ["usage"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == USAGE_TABLE_HEADER
    assert next(line for line in lines if line.startswith(MYSTERY + "*"))
    total = next(line for line in lines if line.startswith("TOTAL")).split()
    assert total == ["TOTAL", "5", "3", "360", "55", "0", "0", "415", "-", "$0.000415"]
    assert "* price unknown" in result.stdout
    day = CliRunner().invoke(cli, ["usage", "--by-day"]).stdout.splitlines()
    assert next(line for line in day if line.startswith("TOTAL")).split() == total


async def test_a_failed_chat_counts_as_an_error(
    make_client: Any, token: str, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    client = await make_client(chat={"max_retries": 0})
    fake_anthropic.enqueue(error_status(500))
    ws = await connect(client, token)
    assert (await chat(ws, "hi"))[-1]["type"] == "error"
    assert (await chat(ws, "hi again", "r2"))[-1]["type"] == "chat.stream.end"
    await ws.close()
    report = await (await client.get("/api/usage", headers=auth_headers)).json()
    assert report["grandTotal"]["errorCount"] == 1
    assert report["perModel"][SONNET]["errorCount"] == 1
