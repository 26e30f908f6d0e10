"""The web app's deployments page in a real browser (Playwright, Chromium) against a real ``agentspace
serve`` with a model group over two fake Anthropic upstreams, one of which answers 429 with Retry-After."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from agentspace.vault import KeyVault
from scripts.harness import write_config
from tests.fakes.anthropic_upstream import error_status
from tests.test_web_app import CHROMIUM, Gateway, Page, ThreadedFake, playwright_api, served

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium not found: apt-get install chromium")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    fakes = [ThreadedFake(), ThreadedFake()]
    fakes[1].loop.call_soon_threadsafe(setattr, fakes[1].fake, "default", error_status(429, retry_after=30))
    base = tmp_path_factory.mktemp("web-routing")
    data_dir = base / "data"
    data_dir.mkdir(mode=0o700)
    vault = KeyVault(data_dir)
    vault.set("team-1", "sk-ant-team1-0123456789abcdef")
    vault.set("team-2", "sk-ant-team2-0123456789abcdef")
    deployments = [
        # team-2 weighs 1000 times team-1: the first call goes to it, gets the 429, and it is cooled down.
        {"model": "anthropic/claude-sonnet-4-5", "key": f"team-{i + 1}", "base_url": f.fake.url, "weight": 1000**i}
        for i, f in enumerate(fakes)
    ]
    config = base / "agentspace.toml"
    write_config(
        config,
        {
            "storage": {"data_dir": str(data_dir)},
            "models": {"default": "claude"},
            "thinking": {"enabled": False},
            'models.groups."claude"': {"deployments": deployments, "allowed_fails": 0},
        },
    )
    try:
        with served(base, config, data_dir, fakes[0]) as gateway:
            yield gateway
    finally:
        for fake in fakes:
            fake.close()


@pytest.fixture(scope="module")
def browser(gateway: Gateway) -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


def test_deployments_page_shows_the_cooling_deployment(browser: Any, gateway: Gateway) -> None:
    for n in range(3):
        gateway.chat(f"s{n}", "Hi")
    states = {d["id"]: d for d in gateway.get("/api/deployments")["deployments"]}
    web = Page(browser, gateway)
    page = web.sign_in()
    page.get_by_role("link", name="Deployments").click()
    page.locator("#deployments-list tbody tr").first.wait_for()
    rows = page.locator("#deployments-list tbody tr")
    assert rows.evaluate_all("rs => rs.map(r => r.dataset.deployment)") == ["claude/team-1", "claude/team-2"]
    shown = page.locator("tr[data-deployment='claude/team-1'] td[data-state]").get_attribute("data-state")
    assert shown == states["claude/team-1"]["state"] == "active"
    cell = page.locator("tr[data-deployment='claude/team-2'] td[data-state]")
    assert cell.get_attribute("data-state") == states["claude/team-2"]["state"] == "cooling"
    assert "cooling down until" in cell.inner_text()
    assert "RATE_LIMITED" in page.locator("tr[data-deployment='claude/team-2']").inner_text()
    # Calls in flight, the minute's requests and the TTFT average, as /api/deployments has them.
    cells = page.locator("tr[data-deployment='claude/team-1'] td").all_inner_texts()
    team1 = states["claude/team-1"]
    assert cells[2] == str(team1["inFlight"]) == "0"
    assert cells[3].startswith(str(team1["requestsLastMinute"])) and team1["requestsLastMinute"] >= 3
    assert team1["latencyMs"] is not None and float(cells[5].removesuffix(" ms")) == team1["latencyMs"]
    web.check()
    # A client key sees no deployments page.
    key = gateway.call("POST", "/api/clients", {"name": "reader"})["key"]
    page = Page(browser, gateway).sign_in(key)
    assert page.get_by_role("link", name="Deployments").count() == 0


def test_phone_chat_and_deployments_fit_the_screen(browser: Any, gateway: Gateway) -> None:
    """At a phone's width (390 px) nothing scrolls sideways but code: a long unbroken word in a question or an
    answer wraps, and each deployment is a card whose state (cooling down until when) is in view."""
    from tests.fakes.anthropic_upstream import text_response
    from tests.test_web_app import PHONE

    long = "https://example.com/" + "a" * 200
    gateway.fake.enqueue(text_response(f"See {long} and\n\n| a | b |\n|---|---|\n| {'w' * 120} | c |"))
    gateway.chat("phone-long", "T" * 150)
    gateway.call("POST", "/api/clients", {"name": "phone-routing"})  # every page's link in the top bar
    web = Page(browser, gateway, PHONE)
    page = web.sign_in()
    page.goto(gateway.url + "/#/chat/phone-long")
    page.locator("li.message.assistant .md").last.wait_for()
    # The top bar keeps to one row with all four pages' links (a second row would take the conversation's room).
    items = page.locator(".topbar nav a, .topbar > button")
    assert items.count() == 5
    tops = {round(box["y"]) for box in (item.bounding_box() for item in items.all()) if box is not None}
    assert max(tops) - min(tops) <= 6, tops
    for item in items.all():
        box = item.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], box
    sideways = "e => e.scrollWidth - e.clientWidth"
    assert page.locator("#messages").evaluate(sideways) <= 0
    for part in ("li.message.user .bubble", "li.message.assistant .md a", "li.message.assistant .md td"):
        box = page.locator(part).first.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], (part, box)
    page.get_by_role("link", name="Deployments").click()
    page.locator("tr[data-deployment='claude/team-2'] td[data-state='cooling']").wait_for()
    heading = page.get_by_role("heading", name="Deployments").bounding_box()
    assert heading is not None and heading["x"] >= 8  # the page has its margin, as the others do
    for cell in page.locator("#deployments-list tbody td").all():
        box = cell.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], box
    state = page.locator("tr[data-deployment='claude/team-2'] td[data-state]")
    assert state.evaluate("e => getComputedStyle(e, '::before').content") == '"State: "'  # a card's label
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    gateway.call("DELETE", "/api/clients/phone-routing")
    web.check()


def test_the_deployments_page_keeps_refreshing_after_a_failed_refresh(browser: Any, gateway: Gateway) -> None:
    """One refresh that failed (a restart, a dropped connection: when an operator watches this page) stopped
    the refreshing for good, with nothing on the page to say its states were stale. It says so now, and goes
    on."""
    page = Page(browser, gateway).sign_in()
    page.get_by_role("link", name="Deployments").click()
    page.locator("#deployments-list tbody tr").first.wait_for()
    refused: list[str] = []

    def refuse_once(route: Any) -> None:
        if refused:
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort()

    page.route("**/api/deployments", refuse_once)
    stale = page.locator("#deployments-stale")
    stale.wait_for(state="visible", timeout=20_000)  # the next refresh failed, and the page says so
    assert "Could not refresh" in stale.inner_text()
    stale.wait_for(state="hidden", timeout=20_000)  # the one after it succeeded
    assert page.locator("tr[data-deployment='claude/team-1'] td[data-state]").count() == 1
