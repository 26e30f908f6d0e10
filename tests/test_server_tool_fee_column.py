"""Server-tool fees as a column of their own in every usage report (docs/accounting.md), on both storage
backends: a real ``agentspace serve`` whose fake Anthropic upstream reports ``server_tool_use:
{web_search_requests: N}``; then ``agentspace usage`` through click's runner (every ``--by``, table and
``--json``), ``GET /api/usage`` over HTTP (every ``by``) and the web app's usage page in Chromium show the
fees and uses the records hold, next to a cost that still includes them."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from agentspace.cli import main as cli
from agentspace.cli.common import money
from agentspace.storage.reports import REPORTS
from scripts.harness import write_config
from tests.fakes import anthropic_upstream as fa
from tests.test_web_app import CHROMIUM, Gateway, Page, ThreadedFake, playwright_api, served

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium not found: apt-get install chromium")

SONNET = "anthropic/claude-sonnet-4-5"
HAIKU = "anthropic/claude-haiku-4-5"


def searches(n: int, text: str) -> fa.FakeResponse:
    """An answer after ``n`` web searches: the upstream reports ``server_tool_use: {web_search_requests: n}``."""
    blocks: list[fa.Block] = [fa.text_block("Let me search.", chunks=1)]
    for i in range(n):
        blocks.append(fa.server_tool_use_block(f"query {i}", id=f"srvtoolu_{i}"))
        blocks.append(
            fa.web_search_result_block([(f"https://example.com/{i}", f"Result {i}")], tool_use_id=f"srvtoolu_{i}")
        )
    return fa.message_response(*blocks, fa.text_block(text))


@pytest.fixture(params=["tinydb", "postgres"])
def gateway(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Gateway]:
    fake = ThreadedFake()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    storage: dict[str, Any] = {"data_dir": str(data_dir)}
    if request.param == "postgres":
        storage |= {"backend": "postgres", "dsn": request.getfixturevalue("pg_dsn")}
    config = tmp_path / "agentspace.toml"
    write_config(
        config,
        {
            "storage": storage,
            "models": {"default": SONNET},
            "thinking": {"enabled": False},
            "providers.anthropic": {"base_url": fake.fake.url},
        },
    )
    try:
        with served(tmp_path, config, data_dir, fake, launch=None, load_plugins="metrics") as gateway:
            yield gateway
    finally:
        fake.close()


def run_cli(gateway: Gateway, *args: str) -> str:
    result = CliRunner().invoke(
        cli, ["--config", str(gateway.config), *args], env={"AGENTSPACE_HOME": str(gateway.data_dir)}
    )
    assert result.exit_code == 0, result.output
    return str(result.stdout)


def stored_records(gateway: Gateway) -> list[dict[str, Any]]:
    """The usage records as the configured store of record holds them."""
    from agentspace.config import load_config
    from agentspace.default_plugins.storage import open_storage

    async def read() -> list[dict[str, Any]]:
        storage = open_storage(load_config(gateway.config))
        await storage.start()
        try:
            return await storage.usage.records()
        finally:
            await storage.aclose()

    return asyncio.run(read())


def ask_with_web_search(gateway: Gateway, key: str) -> None:
    """``POST /v1/messages`` with the web search tool, as the anthropic SDK sends it (relayed upstream)."""
    body = {
        "model": HAIKU.split("/")[1],
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Search the web"}],
        "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}],
    }
    req = urllib.request.Request(
        gateway.url + "/v1/messages",
        data=json.dumps(body).encode(),
        headers={"x-api-key": key, "anthropic-version": "2023-06-01", "content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as response:
        assert json.loads(response.read())["usage"]["server_tool_use"] == {"web_search_requests": 3}


def test_every_report_shows_the_server_tool_fees_of_the_records(gateway: Gateway) -> None:
    key = run_cli(gateway, "clients", "add", "researcher").strip()
    gateway.fake.enqueue(searches(2, "Two searches."), searches(3, "Three searches."), fa.text_response("No tools."))
    gateway.chat("fees", "Look it up")  # /api/chat, Sonnet: 2 web searches
    ask_with_web_search(gateway, key)  # /v1/messages, Haiku, a client key: 3 web searches
    gateway.chat("plain", "Just answer")  # no server tools: no fee

    records = stored_records(gateway)
    assert len(records) == 3
    fee: dict[str, float] = {}  # per model
    for r in records:
        fee[r["model"]] = fee.get(r["model"], 0.0) + r["serverToolCost"]
    assert {r["model"]: r["serverToolUse"] for r in records if r["serverToolUse"]} == {
        SONNET: {"web_search": 2},
        HAIKU: {"web_search": 3},
    }
    assert fee[SONNET] == pytest.approx(0.02) and fee[HAIKU] == pytest.approx(0.03)  # $10 per 1000 searches
    total_fee = sum(fee.values())
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    groups = {  # every report's groups, with the fee and uses each must show, from the records
        "model": ("perModel", lambda r: r["model"]),
        "day": ("perDay", lambda r: today),
        "client": ("perClient", lambda r: r["client"] if r["client"] not in (None, "ws", "http") else "admin"),
        "session": ("perSession", lambda r: r["sessionId"] or "none"),
        "deployment": ("perDeployment", lambda r: "none"),
        "endpoint": ("perEndpoint", lambda r: r["endpoint"] or "none"),
    }

    def expected(by: str) -> dict[str, tuple[float, int]]:
        out: dict[str, tuple[float, int]] = {}
        for r in records:
            name = groups[by][1](r)
            cost, uses = out.get(name, (0.0, 0))
            out[name] = (cost + r["serverToolCost"], uses + sum(r["serverToolUse"].values()))
        return out

    def check_totals(report: dict[str, Any], by: str) -> None:
        per = report[groups[by][0]]
        assert {name: (pytest.approx(t["serverToolCost"]), t["serverToolUses"]) for name, t in per.items()} == {
            name: (pytest.approx(cost), uses) for name, (cost, uses) in expected(by).items()
        }, by
        grand = report["grandTotal"]
        assert (grand["serverToolCost"], grand["serverToolUses"]) == (pytest.approx(total_fee), 5)
        assert grand["totalCost"] == pytest.approx(sum(r["totalCost"] for r in records))  # fees included
        assert grand["totalCost"] > total_fee

    # The CLI: every grouping, as JSON and as a table with the "server tools" column next to the cost.
    for by in ("model", "day", "client", "session", "deployment", "endpoint"):
        check_totals(json.loads(run_cli(gateway, "usage", f"--by-{by}", "--json")), by)
        lines = run_cli(gateway, "usage", f"--by-{by}").splitlines()
        assert lines[0].split()[-3:] == ["server", "tools", "cost"], lines[0]
        for name, (cost, uses) in expected(by).items():
            row = next(line for line in lines if line.startswith(name + " "))
            shown = row.split()[-3:-1] if uses else row.split()[-2:-1]  # the fee and (uses), or "-"
            assert shown == ([money(cost), f"({uses})"] if uses else ["-"]), row
        total = next(line for line in lines if line.startswith("TOTAL")).split()
        assert total[-3:-1] == [money(total_fee), "(5)"]

    # GET /api/usage: every `by`, each total's fields documented in the OpenAPI document.
    documented = gateway.get("/api/openapi.json")["components"]["schemas"]["UsageTotals"]["properties"]
    for by in REPORTS:
        report = gateway.get(f"/api/usage?by={by}")
        if by == "day-model":
            per_day = report["perDay"][today]
            assert {m: t["serverToolCost"] for m, t in per_day.items()} == pytest.approx(fee)
            assert report["grandTotal"]["serverToolCost"] == pytest.approx(total_fee)
        else:
            check_totals(report, by)
        assert set(report["grandTotal"]) <= set(documented)
    # A client key sees its own fees only.
    own = gateway.get("/api/usage", key=key)["grandTotal"]
    assert (own["serverToolCost"], own["serverToolUses"]) == (pytest.approx(fee[HAIKU]), 3)

    # /metrics: the fees and the uses, beside the cost that includes them.
    req = urllib.request.Request(gateway.url + "/metrics", headers={"Authorization": f"Bearer {gateway.token}"})
    with urllib.request.urlopen(req, timeout=10) as response:
        exposed = response.read().decode()
    samples = [s for family in text_string_to_metric_families(exposed) for s in family.samples]

    def metric(name: str, **labels: str) -> float:
        return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())

    assert metric("agentspace_server_tool_cost_usd_total") == pytest.approx(total_fee)
    assert metric("agentspace_server_tool_cost_usd_total", model=HAIKU) == pytest.approx(fee[HAIKU])
    assert metric("agentspace_server_tool_uses_total", tool="web_search") == 5
    assert metric("agentspace_cost_usd_total") == pytest.approx(sum(r["totalCost"] for r in records))

    # The web app: the card, and the column in the tables (by model, by client, by session) and the CSV.
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            web = Page(browser, gateway)
            page = web.sign_in()
            page.get_by_role("link", name="Usage").click()
            page.get_by_label("Range", exact=True).select_option("today")
            page.wait_for_selector("#usage-body:not([aria-busy]) #card-serverToolCost")
            card = page.locator("#card-serverToolCost")
            assert float(card.get_attribute("data-value")) == pytest.approx(total_fee, abs=1e-12)
            assert money(total_fee) in card.inner_text()
            for caption, by in (("By model", "model"), ("By client", "client"), ("By session", "session")):
                table = page.locator(f"table:has(caption:text('{caption}'))")
                headers = table.locator("thead th").all_inner_texts()
                assert headers[1:3] == ["Cost (USD)", "Server tools (USD)"]  # next to the cost
                for name, (cost, uses) in expected(by).items():
                    cell = table.locator(f"tbody tr[data-key='{name}'] td[data-field=serverToolCost]")
                    assert float(cell.get_attribute("data-value")) == pytest.approx(cost, abs=1e-12), (by, name)
                    assert (cell.get_attribute("data-uses") or "0") == str(uses)
                    assert cell.inner_text().startswith(money(cost))
            foot = page.locator("table:has(caption:text('By model')) tfoot td[data-field=serverToolCost]")
            assert float(foot.get_attribute("data-value")) == pytest.approx(total_fee, abs=1e-12)
            assert foot.get_attribute("data-uses") == "5"
            with page.expect_download() as download:
                page.get_by_role("button", name="Export CSV").click()
            rows = Path(download.value.path()).read_text().splitlines()
            header = rows[0].split(",")
            exported = {row.split(",")[0]: float(row.split(",")[header.index("serverToolCost")]) for row in rows[1:]}
            assert exported == pytest.approx({**fee, "TOTAL": total_fee})
            web.check()
        finally:
            browser.close()
