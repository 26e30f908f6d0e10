"""One client's spend, written the same way everywhere: a real ``agentspace serve``; a client that spent more
than a dollar (web searches included) before its budget was set and one that spent a few thousandths of a
cent; then ``agentspace clients list`` and ``agentspace usage --by-client`` through click's runner, the
server's ``/api/clients`` and ``/api/usage``, and the web app's clients and usage pages in Chromium show the
same figure, written as the CLI writes it (cli/common.py's ``money``)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentspace.cli.common import money
from scripts.harness import write_config
from tests.fakes import anthropic_upstream as fa
from tests.test_server_tool_fee_column import run_cli, stored_records
from tests.test_web_app import CHROMIUM, Gateway, Page, ThreadedFake, playwright_api, served

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium not found: apt-get install chromium")

SONNET = "anthropic/claude-sonnet-4-5"


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    fake = ThreadedFake()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    config = tmp_path / "agentspace.toml"
    write_config(
        config,
        {
            "storage": {"data_dir": str(data_dir)},
            "models": {"default": SONNET},
            "thinking": {"enabled": False},
            "providers.anthropic": {"base_url": fake.fake.url},
        },
    )
    try:
        with served(tmp_path, config, data_dir, fake, launch=None) as gateway:
            yield gateway
    finally:
        fake.close()


def ask(gateway: Gateway, key: str) -> None:
    body = {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}]}
    req = urllib.request.Request(
        gateway.url + "/v1/messages",
        data=json.dumps(body).encode(),
        headers={"x-api-key": key, "anthropic-version": "2023-06-01", "content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as response:
        response.read()


def test_the_cli_the_server_and_the_web_app_write_the_same_spend(gateway: Gateway) -> None:
    keys = {name: run_cli(gateway, "clients", "add", name).strip() for name in ("big-spender", "penny")}
    # $1.20 of input, 3 searches ($0.03) and 40 output tokens: past a dollar, where rounding would show first.
    final = {"input_tokens": 400_000, "output_tokens": 40, "server_tool_use": {"web_search_requests": 3}}
    gateway.fake.enqueue(fa.text_response("Found.", usage={"input_tokens": 400_000}, delta_usages=[final]))
    ask(gateway, keys["big-spender"])
    gateway.fake.enqueue(fa.text_response("Hi.", usage={"input_tokens": 7}, delta_usages=[{"output_tokens": 1}]))
    ask(gateway, keys["penny"])
    run_cli(gateway, "clients", "set", "big-spender", "--budget", "5")  # set after the spend: it counts

    records = stored_records(gateway)
    spend = {name: sum(r["totalCost"] for r in records if r["client"] == name) for name in keys}
    assert spend["big-spender"] > 1 > 0.0001 > spend["penny"] > 0
    server = {c["name"]: c["spend"]["usd"] for c in gateway.get("/api/clients")["clients"]}
    assert server == pytest.approx(spend, abs=1e-12)
    report = gateway.get("/api/usage?by=client")["perClient"]
    assert {name: report[name]["totalCost"] for name in keys} == pytest.approx(spend, abs=1e-12)

    shown = {name: money(usd) for name, usd in spend.items()}
    listed = run_cli(gateway, "clients", "list")
    usage = run_cli(gateway, "usage", "--by-client")
    for name, text in shown.items():
        assert text in next(line for line in listed.splitlines() if line.startswith(name + " ")), listed
        assert text in next(line for line in usage.splitlines() if line.startswith(name + " ")), usage

    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            web = Page(browser, gateway)
            page = web.sign_in()
            page.get_by_role("link", name="Clients").click()
            for name, text in shown.items():
                cell = page.locator(f"tr[data-client='{name}'] td[data-spend]")
                cell.wait_for()
                assert float(cell.get_attribute("data-spend")) == pytest.approx(spend[name], abs=1e-12)
                assert text in cell.inner_text(), (name, cell.inner_text())
            page.get_by_role("link", name="Usage").click()
            page.get_by_label("Range", exact=True).select_option("today")
            page.wait_for_selector("#usage-body:not([aria-busy]) #card-totalCost")
            table = page.locator("table:has(caption:text('By client'))")
            for name, text in shown.items():
                cell = table.locator(f"tbody tr[data-key='{name}'] td[data-field=totalCost]")
                assert float(cell.get_attribute("data-value")) == pytest.approx(spend[name], abs=1e-12)
                assert cell.inner_text().startswith(text), (name, cell.inner_text())
            web.check()
        finally:
            browser.close()
