"""A call the upstream served at OpenAI's priority tier, cut by a SIGKILL of ``agentspace serve`` mid-stream, is
recovered at that tier's rates (docs/accounting.md), and every report gives the records' numbers after the
restart: ``agentspace usage`` (every ``--by``), ``GET /api/usage`` (every ``by``, a ``since`` inside the day
too), the client's spend, the web app's usage page (Chromium) and ``/metrics``."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from agentspace.cli import main as cli
from agentspace.config import load_config
from agentspace.default_plugins.storage import open_storage
from agentspace.pricing import model_info
from agentspace.storage.reports import REPORTS, SUMMED
from scripts.harness import GatewayProcess
from tests.fakes import anthropic_upstream as fa
from tests.fakes import openai_upstream as fo
from tests.test_web_app import CHROMIUM, Gateway, Page, playwright_api

GPT = "openai/gpt-4o-mini"
OPENAI_KEY = "sk-openai-test-0123456789"
CLI_GROUPS = {"model": "perModel", "day": "perDay", "client": "perClient", "session": "perSession"}
CLI_GROUPS |= {"deployment": "perDeployment", "endpoint": "perEndpoint"}


def usage_page_cards(server: GatewayProcess) -> dict[str, float]:
    """The web app's usage page in Chromium, signed in with the gateway token, range "Today": its cards."""
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            web = Page(browser, Gateway(server.url, server.data_dir, server.config_path, None))  # type: ignore[arg-type]
            page = web.sign_in()
            page.get_by_role("link", name="Usage").click()
            page.get_by_label("Range", exact=True).select_option("today")
            page.wait_for_selector("#usage-body:not([aria-busy]) #card-totalCost")
            fields = ("totalCost", "serverToolCost", "requestCount", "errorCount", "inputTokens", "outputTokens")
            cards = {f: float(page.locator(f"#card-{f}").get_attribute("data-value") or "nan") for f in fields}
            web.check()
            return cards
        finally:
            browser.close()


async def relayed_noted(data_dir: Path, timeout: float = 30.0) -> None:
    """Wait until the ledger's journal notes the output relayed so far (a few times a second while it streams)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pattern = re.compile(rb'"relayedTokens":[1-9]')
    while not any(pattern.search(p.read_bytes()) for p in (data_dir / "ledger").glob("journal-*.jsonl")):
        assert loop.time() < deadline, "the output relayed was never noted"
        await asyncio.sleep(0.05)


def run_cli(server: GatewayProcess, *args: str) -> str:
    result = CliRunner().invoke(
        cli, ["--config", str(server.config_path), *args], env={"AGENTSPACE_HOME": str(server.data_dir)}
    )
    assert result.exit_code == 0, result.output
    return str(result.stdout)


async def stored(server: GatewayProcess) -> list[dict[str, Any]]:
    storage = open_storage(load_config(server.config_path))
    await storage.start()
    try:
        return await storage.usage.records()
    finally:
        await storage.aclose()


def sums(records: list[dict[str, Any]]) -> dict[str, Any]:
    fields = ("inputTokens", "outputTokens", "cacheReadTokens", "cacheWriteTokens", "reasoningTokens", "totalTokens")
    return {
        **{f: sum(r[f] for r in records) for f in fields},
        "totalCost": pytest.approx(sum(r["totalCost"] for r in records), abs=1e-9),
        "serverToolCost": pytest.approx(sum(r["serverToolCost"] for r in records), abs=1e-9),
        "serverToolUses": sum(sum(r["serverToolUse"].values()) for r in records),
        "requestCount": sum(1 for r in records if r["answered"]),
        "errorCount": sum(1 for r in records if r["error"]),
        "estimatedCount": sum(1 for r in records if r["estimated"]),
    }


async def reports_agree(
    http: aiohttp.ClientSession, server: GatewayProcess, records: list[dict[str, Any]], since: str | None = None
) -> None:
    expected = sums(records)
    headers = {"Authorization": f"Bearer {server.token}"}
    query = {"since": since} if since else {}
    for by, key in CLI_GROUPS.items():
        args = ["usage", f"--by-{by}", "--json", *(["--since", since] if since else [])]
        report = json.loads(await asyncio.to_thread(run_cli, server, *args))
        assert {f: report["grandTotal"][f] for f in SUMMED} == expected, (by, since)
        async with http.get(f"{server.url}/api/usage", params={"by": by, **query}, headers=headers) as resp:
            assert (await resp.json())[key] == report[key], (by, since)
    for by in REPORTS:
        async with http.get(f"{server.url}/api/usage", params={"by": by, **query}, headers=headers) as resp:
            grand = (await resp.json())["grandTotal"]
        assert {f: grand[f] for f in SUMMED} == expected, (by, since)


@pytest.fixture(params=["tinydb", "postgres"])
def storage(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "postgres":
        return {"backend": "postgres", "dsn": request.getfixturevalue("pg_dsn")}
    return {}


async def test_a_priority_call_cut_by_a_crash_is_recovered_at_the_priority_rates_and_every_report_agrees(
    tmp_path: Path,
    storage: dict[str, Any],
    fake_anthropic: fa.FakeAnthropic,
    fake_openai: fo.FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKE_OPENAI_KEY", OPENAI_KEY)
    sections = {
        "storage": storage,
        "providers.openai": {"base_url": fake_openai.url, "api_key_env": "FAKE_OPENAI_KEY"},
    }
    data_dir = tmp_path / "data"
    server = GatewayProcess(data_dir, fake_anthropic.url, **sections)
    server.load_plugins = "metrics"
    # The stream stops after its first chunks, which say the call runs at the priority tier; its usage would
    # have come in the last chunk.
    fake_openai.default = fo.text_response("word " * 60, chunks=60, usage=fo.usage(2000, 60)).stall(120, after=6)
    try:
        await server.start()
        key = (await asyncio.to_thread(run_cli, server, "clients", "add", "acme", "--budget", "5")).strip()
        body = {
            "model": GPT,
            "messages": [{"role": "user", "content": "Tell me about the weather on the coast this week. " * 20}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "service_tier": "priority",
        }
        async with aiohttp.ClientSession() as http:
            resp = await http.post(
                server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
            )
            assert resp.status == 200
            await resp.content.readuntil(b"\n\n")  # the first chunk: the upstream says it serves at priority
            assert fake_openai.requests[0].body["service_tier"] == "priority"
            await relayed_noted(data_dir)
            await server.kill()
            resp.close()
    finally:
        await server.aclose()

    restarted = GatewayProcess(data_dir, fake_anthropic.url, **sections)
    restarted.load_plugins = "metrics"
    try:
        await restarted.start()
        await restarted.wait_for_log("recovered")
        (record,) = await stored(restarted)
        assert record["recovered"] is True and record["client"] == "acme" and record["outputTokens"] > 0
        standard = model_info(load_config(restarted.config_path), GPT)
        priority = standard.service_tiers["priority"]
        assert priority[0] > standard.input_per_mtok  # the tier is dearer
        expected = (record["inputTokens"] * priority[0] + record["outputTokens"] * priority[1]) / 1e6
        assert record["totalCost"] == pytest.approx(expected, rel=1e-9), record

        async with aiohttp.ClientSession() as http:
            await reports_agree(http, restarted, [record])
            await reports_agree(http, restarted, [record], since=record["timestamp"])  # a since inside the day
            after = datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")) + timedelta(milliseconds=1)
            await reports_agree(http, restarted, [], since=after.isoformat().replace("+00:00", "Z"))
            headers = {"Authorization": f"Bearer {restarted.token}"}
            async with http.get(restarted.url + "/api/clients/acme", headers=headers) as resp:
                assert (await resp.json())["client"]["spend"]["usd"] == pytest.approx(expected, rel=1e-9)
            async with http.get(restarted.url + "/metrics", headers=headers) as resp:
                text = await resp.text()
        if CHROMIUM is not None:  # the web app's usage page shows the same
            cards = await asyncio.to_thread(usage_page_cards, restarted)
            assert cards == {
                "totalCost": pytest.approx(expected, abs=1e-12),
                "serverToolCost": 0,
                "requestCount": 1,
                "errorCount": 1,
                "inputTokens": record["inputTokens"],
                "outputTokens": record["outputTokens"],
            }
        samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
        assert sum(s.value for s in samples if s.name == "agentspace_cost_usd_total") == pytest.approx(expected)
        assert sum(s.value for s in samples if s.name == "agentspace_requests_total") == 1
    finally:
        await restarted.aclose()
