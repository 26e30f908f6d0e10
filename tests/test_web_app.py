"""The web app in a real browser: Playwright drives Debian's Chromium against a real ``agentspace serve``
(one per module) whose Anthropic provider talks to the fake upstream, which streams slowly where a test
needs to act mid-answer. Every page records its console and its requests: no console errors, and no
request leaves the gateway's origin. The tests take a screenshot of each page (into docs/screenshots/ with AGENTSPACE_SCREENSHOTS=1).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from agentspace.cli import main as cli
from scripts.harness import ROOT, child_env, write_config
from tests.fakes.anthropic_upstream import (
    FakeAnthropic,
    FakeResponse,
    citations_response,
    message_response,
    text_block,
    text_response,
    thinking_block,
    tool_use_response,
)

playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed: pip install -e '.[test]'"
)
expect = playwright_api.expect

CHROMIUM = next(
    (
        p
        for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
        if p and Path(p).exists()
    ),
    None,
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium not found: apt-get install chromium (scripts/test does it as root)"
)

SCREENSHOTS = ROOT / "docs" / "screenshots"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
UNPRICED = "anthropic/claude-in-house"
# Tools run in the served gateway: registered as a plugin before the CLI starts it.
LAUNCH = (
    "import sys; from agentspace.plugins import get_plugin_manager; import tests.fixtures.web_app_tools as tools; "
    "get_plugin_manager().register(tools); from agentspace.cli import main; sys.argv[0] = 'agentspace'; main()"
)


class ThreadedFake:
    """The fake Anthropic upstream on its own event loop in a thread, so the gateway process can reach it
    while the (synchronous) browser tests script it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.fake: FakeAnthropic = asyncio.run_coroutine_threadsafe(FakeAnthropic().start(), self.loop).result(10)

    def enqueue(self, *responses: FakeResponse) -> None:
        self.loop.call_soon_threadsafe(self.fake.enqueue, *responses)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.fake.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class Gateway:
    def __init__(self, url: str, data_dir: Path, config: Path, fake: ThreadedFake) -> None:
        self.url, self.data_dir, self.config, self.fake = url, data_dir, config, fake

    @property
    def token(self) -> str:
        return (self.data_dir / "gateway-token").read_text(encoding="utf-8").strip()

    def get(self, path: str, key: str | None = None) -> Any:
        return self.call("GET", path, key=key)

    def call(self, method: str, path: str, body: Any = None, key: str | None = None) -> Any:
        """An API call with the gateway token (or ``key``); the JSON answer (None when empty)."""
        headers = {"Authorization": f"Bearer {key or self.token}"}
        data = None if body is None else json.dumps(body).encode()
        if data is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        with urllib.request.urlopen(req, timeout=10) as response:
            return json.loads(response.read() or b"null")

    def chat(self, session_id: str, text: str, key: str | None = None) -> None:
        """One turn over ``POST /api/chat`` (the AI SDK's request), read to its end."""
        message = {"id": "m1", "role": "user", "parts": [{"type": "text", "text": text}]}
        req = urllib.request.Request(
            self.url + "/api/chat",
            data=json.dumps({"id": session_id, "messages": [message]}).encode(),
            headers={"Authorization": f"Bearer {key or self.token}", "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=30) as response:
            assert response.read().endswith(b"data: [DONE]\n\n")

    def has_route(self, path: str) -> bool:
        return path in self.get("/api/openapi.json")["paths"]


@contextlib.contextmanager
def served(
    folder: Path,
    config: Path,
    data_dir: Path,
    fake: ThreadedFake,
    launch: str | None = LAUNCH,
    load_plugins: str = "",
) -> Iterator[Gateway]:
    """``agentspace serve`` on ``config`` (the web app's test tools registered, unless ``launch`` is None; the
    optional plugins ``load_plugins`` names), its log in ``folder/serve.log``, stopped by its PID at the end."""
    entry = ["-m", "agentspace"] if launch is None else ["-c", launch]
    log = open(folder / "serve.log", "wb")  # noqa: SIM115 - closed below, after the server
    proc = subprocess.Popen(
        [sys.executable, *entry, "serve", "--config", str(config), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=log,
        env=child_env(data_dir, load_plugins),
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert "listening on http://" in line, (line, (folder / "serve.log").read_text())
        yield Gateway(line.split("listening on ")[1].split()[0], data_dir, config, fake)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    fake = ThreadedFake()
    base = tmp_path_factory.mktemp("web")
    data_dir = base / "data"
    data_dir.mkdir()
    config = base / "agentspace.toml"
    write_config(
        config,
        {
            "storage": {"data_dir": str(data_dir)},
            "models": {"default": "anthropic/claude-sonnet-4-5"},
            "thinking": {"enabled": False},
            # claude-in-house: a model the config declares without a price (costed at the fallback price).
            "providers.anthropic": {"base_url": fake.fake.url, "models": [UNPRICED.split("/", 1)[1]]},
        },
    )
    try:
        with served(base, config, data_dir, fake) as gateway:
            yield gateway
    finally:
        fake.close()


@pytest.fixture(scope="module")
def browser(gateway: Gateway) -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


class Page:
    """A signed-in-or-not page with what it logged and requested."""

    def __init__(
        self, browser: Any, gateway: Gateway, viewport: dict[str, int] = DESKTOP, color_scheme: str = "light"
    ) -> None:
        self.context = browser.new_context(
            viewport=viewport, color_scheme=color_scheme, permissions=["clipboard-read", "clipboard-write"]
        )
        self.page = self.context.new_page()
        self.gateway = gateway
        self.console_errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))
        self.page.on("pageerror", lambda e: self.console_errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))

    def sign_in(self, key: str | None = None) -> Any:
        page = self.page
        page.goto(self.gateway.url + "/")
        page.get_by_label("Gateway token or client key").fill(key or self.gateway.token)
        page.get_by_role("button", name="Sign in").click()
        page.get_by_role("navigation", name="Pages").wait_for()
        return page

    def check(self) -> None:
        """No console errors; every request went to the gateway (or is a blob of this page)."""
        assert self.console_errors == []
        outside = [
            u
            for u in self.requests
            if not (u.startswith(self.gateway.url + "/") or u.startswith(f"blob:{self.gateway.url}/"))
        ]
        assert outside == []
        self.context.close()


@pytest.fixture
def web(browser: Any, gateway: Gateway) -> Iterator[Page]:
    page = Page(browser, gateway)
    yield page
    page.check()


def screenshot(page: Any, name: str) -> None:
    """Take the page's picture: into docs/screenshots/ with AGENTSPACE_SCREENSHOTS=1 (to refresh the README's),
    else into a temporary folder, so that a test run leaves the work tree as it was."""
    folder = SCREENSHOTS if os.environ.get("AGENTSPACE_SCREENSHOTS") == "1" else Path(tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"agentspace-{name}.png" if folder != SCREENSHOTS else folder / f"{name}.png"))


def slow_text(text: str, chunks: int, delay: float) -> FakeResponse:
    return text_response(text, chunks=chunks).with_delay(delay)


def answer(page: Any) -> Any:
    return page.locator("li.message.assistant").last


def send(page: Any, text: str) -> None:
    prompt = page.get_by_label("Message", exact=True)
    prompt.fill(text)
    prompt.press("Enter")


def new_chat(page: Any) -> None:
    page.get_by_role("button", name="New chat", exact=True).click()
    expect(page.locator("li.message")).to_have_count(0)


def session_id(page: Any) -> str:
    return str(page.evaluate("decodeURIComponent(location.hash.split('/')[2])"))


# --- the tests ------------------------------------------------------------------------------------


def test_pages_are_served_with_cache_headers_and_a_strict_csp(gateway: Gateway) -> None:
    with urllib.request.urlopen(gateway.url + "/", timeout=10) as response:  # no token needed
        html = response.read().decode()
        assert response.headers["Cache-Control"] == "no-cache"
        csp = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "'unsafe-inline'" not in csp
    asset = html.split('src="')[1].split('"')[0]
    assert asset.startswith("/assets/") and asset.endswith("/app.js")
    with urllib.request.urlopen(gateway.url + asset, timeout=10) as response:
        assert (
            "immutable" in response.headers["Cache-Control"] and "max-age=31536000" in response.headers["Cache-Control"]
        )
        assert response.headers["Content-Type"].startswith("text/javascript")
    with pytest.raises(urllib.error.HTTPError) as stale:
        urllib.request.urlopen(gateway.url + "/assets/000000000000/app.js", timeout=10)
    assert stale.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as api:  # the API still needs the token
        urllib.request.urlopen(gateway.url + "/api/sessions", timeout=10)
    assert api.value.code == 401


def test_sign_in_rejects_a_wrong_key_and_sign_out_forgets_the_key(browser: Any, gateway: Gateway) -> None:
    web = Page(browser, gateway)
    page = web.page
    page.goto(gateway.url + "/")
    screenshot(page, "sign-in")
    page.get_by_label("Gateway token or client key").fill("not-the-token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("not valid")
    # The wrong key's 401 is the one console error this page may have (Chromium logs failed fetches).
    assert all("401" in e for e in web.console_errors)
    web.console_errors.clear()
    web.sign_in()
    assert page.evaluate("sessionStorage.getItem('agentspace.key')") == gateway.token
    assert gateway.token not in page.url
    page.get_by_role("button", name="Sign out").click()
    page.get_by_label("Gateway token or client key").wait_for()
    assert page.evaluate("sessionStorage.getItem('agentspace.key')") is None
    web.check()


def test_chat_streams_markdown_with_code_reasoning_sources_and_tools(web: Page, gateway: Gateway) -> None:
    page = web.sign_in()
    new_chat(page)
    text = "Here is the code:\n\n```python\ndef add(a, b):\n    return a + b  # sum\n```\n\nAnd **done**."
    gateway.fake.enqueue(
        message_response(thinking_block("Thinking about adding."), text_block(text, chunks=12)).with_delay(0.12)
    )
    send(page, "Write an add function")
    # The answer is on screen while it is still streaming.
    page.wait_for_selector("li.message.assistant[data-state=streaming] .answer > .md")
    assert answer(page).get_attribute("data-state") == "streaming"
    # One answer on screen: the placeholder shown until the first words is the answer, not a bubble beside it.
    assert page.locator("li.message.assistant").count() == 1
    assert page.locator("li.message.assistant[data-state=streaming] .answer > .md").first.inner_text() != ""
    page.wait_for_selector("li.message.assistant[data-state=done] .meta")
    done = answer(page)
    assert done.locator("code.lang-python .tok-kw", has_text="def").count() == 1
    assert done.locator("code.lang-python .tok-com").inner_text() == "# sum"
    assert done.get_by_role("button", name="Copy code").count() == 1
    assert done.locator("strong", has_text="done").count() == 1
    reasoning = done.locator("details.reasoning")
    assert reasoning.get_attribute("open") is None and "Thinking about adding." in reasoning.text_content()
    assert "tokens" in done.locator(".meta").inner_text() and "TTFT" in done.locator(".meta").inner_text()
    # The title comes from the first message; the sidebar lists the session.
    page.locator("#sessions li", has_text="Write an add function").wait_for()

    gateway.fake.enqueue(citations_response())
    send(page, "Search for it")
    page.wait_for_selector("li.message.assistant[data-state=done] .sources")
    links = answer(page).locator(".sources a")
    hrefs = links.evaluate_all("els => els.map(e => e.href)")
    assert "https://example.com/a" in hrefs and "https://example.com/c" in hrefs and len(hrefs) == len(set(hrefs))

    gateway.fake.enqueue(tool_use_response("get_weather", {"city": "Paris"}), text_response("It is sunny in Paris."))
    send(page, "Weather in Paris?")
    expect(page.locator("li.message.assistant[data-state=done]").last).to_contain_text("It is sunny in Paris.")
    card = answer(page).locator(".tool-card")
    assert "get_weather" in card.inner_text() and "Paris" in card.inner_text() and "sunny" in card.inner_text()
    page.wait_for_selector("#context .stack .seg")
    assert page.locator("#context .seg[data-section=history]").get_attribute("title").startswith("history: ")
    screenshot(page, "chat")


def test_stop_keeps_the_partial_answer_and_the_store_agrees(web: Page, gateway: Gateway) -> None:
    page = web.sign_in()
    new_chat(page)
    words = [f"word{i} " for i in range(60)]
    gateway.fake.enqueue(slow_text("".join(words), chunks=60, delay=0.1))
    send(page, "Count slowly")
    expect(answer(page).locator(".answer > .md")).to_contain_text("word3")
    page.get_by_role("button", name="Stop").click()
    page.wait_for_selector("li.message.assistant[data-state=done] .stopped")
    shown = answer(page).locator(".answer > .md").inner_text()
    assert "word3" in shown and "word59" not in shown
    stored = gateway.get(f"/api/sessions/{session_id(page)}")["session"]["messages"][-1]
    assert stored["role"] == "assistant" and stored["aborted"] is True
    assert stored["content"].strip() == shown.strip()


def test_reload_mid_answer_resumes_once(web: Page, gateway: Gateway) -> None:
    page = web.sign_in()
    new_chat(page)
    full = "".join(f"part{i} " for i in range(30)).strip()
    gateway.fake.enqueue(slow_text(full, chunks=30, delay=0.1))
    send(page, "Tell me in parts")
    expect(answer(page).locator(".answer > .md")).to_contain_text("part2")
    page.reload()
    page.wait_for_selector("li.message.assistant[data-state=streaming]")  # resumed, still streaming
    page.wait_for_selector("li.message.assistant[data-state=done] .meta", timeout=20000)
    assert page.locator("li.message.assistant").count() == 1
    assert answer(page).locator(".answer > .md").inner_text().strip() == full
    assert gateway.get(f"/api/sessions/{session_id(page)}")["session"]["messages"][-1]["content"] == full


def test_sessions_rename_and_delete(web: Page, gateway: Gateway) -> None:
    page = web.sign_in()
    new_chat(page)
    gateway.fake.enqueue(text_response("Noted."))
    send(page, "Remember the milk")
    page.wait_for_selector("li.message.assistant[data-state=done] .meta")
    sid = session_id(page)
    item = page.locator(f"#sessions li[data-session='{sid}']")
    assert page.locator("#sessions li").first.get_attribute("data-session") == sid  # newest first
    item.get_by_role("button", name="Rename Remember the milk").click()
    page.get_by_label("New title").fill("Groceries")
    page.get_by_label("New title").press("Enter")
    item.get_by_role("link", name="Groceries").wait_for()
    assert gateway.get(f"/api/sessions/{sid}")["session"]["title"] == "Groceries"
    item.get_by_role("button", name="Delete Groceries").click()
    item.get_by_role("button", name="Confirm: delete Groceries").click()
    item.wait_for(state="detached")
    assert sid not in [s["id"] for s in gateway.get("/api/sessions")["sessions"]]


def _cli_usage(gateway: Gateway, since: str) -> dict[str, Any]:
    result = CliRunner().invoke(
        cli,
        ["--config", str(gateway.config), "usage", "--json", "--since", since],
        env={"AGENTSPACE_HOME": str(gateway.data_dir)},
    )
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.output))


def test_usage_page_totals_equal_the_cli_report_and_the_csv_has_its_rows(web: Page, gateway: Gateway) -> None:
    page = web.sign_in()
    new_chat(page)
    gateway.fake.enqueue(text_response("For the usage page.", usage={"input_tokens": 40, "cache_read_input_tokens": 7}))
    send(page, "Something to count")
    page.wait_for_selector("li.message.assistant[data-state=done] .meta")
    sid = session_id(page)
    page.get_by_role("link", name="Usage").click()
    page.get_by_label("Range", exact=True).select_option("today")
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    page.wait_for_selector("#usage-body:not([aria-busy]) #card-totalCost")
    report = _cli_usage(gateway, today)
    total = report["grandTotal"]
    for field in ("totalCost", "requestCount", "inputTokens", "outputTokens", "cacheReadTokens", "cacheWriteTokens"):
        assert float(page.locator(f"#card-{field}").get_attribute("data-value")) == pytest.approx(
            total[field], abs=1e-12
        ), field
    if "errorCount" in total:
        assert float(page.locator("#card-errorCount").get_attribute("data-value")) == total["errorCount"]
    rows = page.locator("table:has(caption:text('By model')) tbody tr")
    assert rows.evaluate_all("rs => rs.map(r => r.dataset.key)") == list(report["perModel"])
    assert page.locator("svg.chart rect").count() >= 1
    sessions = page.locator("table:has(caption:text('By session')) tbody a")
    assert sessions.count() >= 1
    screenshot(page, "usage")

    with page.expect_download() as download:
        page.get_by_role("button", name="Export CSV").click()
    parsed = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
    assert [r["model"] for r in parsed] == [*report["perModel"], "TOTAL"]
    for row in parsed:
        expected = report["perModel"].get(row["model"], total)
        assert (
            int(row["requestCount"]) == expected["requestCount"] and int(row["totalTokens"]) == expected["totalTokens"]
        )
        assert float(row["totalCost"]) == pytest.approx(expected["totalCost"], abs=1e-12)

    page.get_by_label("Range", exact=True).select_option("30d")
    page.wait_for_selector("#usage-body:not([aria-busy]) #card-totalCost")
    assert (
        int(page.locator("#card-requestCount").get_attribute("data-value"))
        == _cli_usage(gateway, "30d")["grandTotal"]["requestCount"]
    )
    page.locator(f"table:has(caption:text('By session')) tbody a[href='#/chat/{sid}']").click()
    expect(page.locator("li.message.user").last).to_have_text("Something to count")  # the link opens the session
    assert session_id(page) == sid


def test_phone_layout_and_keyboard(browser: Any, gateway: Gateway) -> None:
    web = Page(browser, gateway, PHONE)
    page = web.sign_in()
    page.wait_for_selector("#prompt")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    assert not page.locator("#sidebar").is_visible()
    page.get_by_role("button", name="Chats").click()
    assert page.locator("#sidebar").is_visible()
    screenshot(page, "chat-phone")
    page.get_by_role("button", name="Chats").click()
    # Keyboard: Tab reaches the message box; every control has a label.
    unlabeled = page.evaluate("""[...document.querySelectorAll('input, select, textarea, button')].filter(e =>
        !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim()).length""")
    assert unlabeled == 0
    page.get_by_role("link", name="Usage").click()
    page.wait_for_selector("#usage-body:not([aria-busy]) #card-totalCost")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    screenshot(page, "usage-phone")
    page.get_by_role("link", name="Clients").click()
    page.get_by_role("heading", name="New client").wait_for()
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    web.check()


def test_dark_theme_follows_the_system(browser: Any, gateway: Gateway) -> None:
    web = Page(browser, gateway, DESKTOP, color_scheme="dark")
    page = web.sign_in()
    page.wait_for_selector("#prompt")
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(21, 23, 28)"
    screenshot(page, "chat-dark")
    web.check()


def test_client_key_sees_only_its_own_sessions_and_no_clients_page(web: Page, gateway: Gateway) -> None:
    key = gateway.call("POST", "/api/clients", {"name": "web-reader"})["key"]
    gateway.fake.enqueue(
        text_response("Admin answer.", usage={"input_tokens": 11, "output_tokens": 3}),
        text_response("Client answer.", usage={"input_tokens": 23, "output_tokens": 5}),
    )
    gateway.chat("admin-only-session", "Admin secrets", key=gateway.token)
    gateway.chat("reader-session", "Reader question", key=key)
    assert "admin-only-session" not in [s["id"] for s in gateway.get("/api/sessions", key=key)["sessions"]]

    page = web.sign_in(key)
    page.locator("#sessions li[data-session='reader-session']").wait_for()
    listed = page.locator("#sessions li").evaluate_all("ls => ls.map(l => l.dataset.session)")
    assert listed == [s["id"] for s in gateway.get("/api/sessions", key=key)["sessions"]] == ["reader-session"]
    assert page.get_by_role("link", name="Clients").count() == 0
    page.goto(gateway.url + "/#/clients")
    page.wait_for_selector("#prompt")  # no clients page for a client key: the chat instead
    assert page.locator("#clients-list").count() == 0

    page.get_by_role("link", name="Usage").click()
    page.get_by_label("Range", exact=True).select_option("today")
    page.wait_for_selector("#usage-body:not([aria-busy]) #card-totalCost")
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    own = gateway.get(f"/api/usage?since={today}", key=key)
    everyone = gateway.get(f"/api/usage?since={today}")
    assert own["grandTotal"]["inputTokens"] == 23 and everyone["grandTotal"]["inputTokens"] > 23
    for field in ("totalCost", "requestCount", "inputTokens", "outputTokens"):
        shown = float(page.locator(f"#card-{field}").get_attribute("data-value"))
        assert shown == pytest.approx(own["grandTotal"][field], abs=1e-12), field
    clients = page.locator("table:has(caption:text('By client')) tbody tr")
    assert clients.evaluate_all("rs => rs.map(r => r.dataset.key)") == ["web-reader"]
    sessions = page.locator("table:has(caption:text('By session')) tbody tr")
    assert sessions.evaluate_all("rs => rs.map(r => r.dataset.key)") == ["reader-session"]


def test_clients_page_is_hidden_without_the_clients_api(web: Page, gateway: Gateway) -> None:
    page = web.sign_in()
    if gateway.has_route("/api/clients"):
        pytest.skip("this gateway has the clients API")
    assert page.get_by_role("link", name="Clients").count() == 0
    page.goto(gateway.url + "/#/clients")
    page.wait_for_selector("#prompt")  # falls back to the chat


def _refused(gateway: Gateway, key: str) -> bool:
    """Whether the gateway refuses ``key`` (401)."""
    try:
        gateway.get("/api/sessions", key=key)
    except urllib.error.HTTPError as error:
        return error.code == 401
    return False


def test_clients_page_creates_edits_rotates_and_removes_a_client(web: Page, gateway: Gateway) -> None:
    page = web.sign_in()
    page.get_by_role("link", name="Clients").click()
    page.get_by_role("heading", name="New client").wait_for()
    form = page.get_by_role("form", name="New client")
    form.get_by_label("Name").fill("team-app")
    form.get_by_label("Budget (USD, empty: none)").fill("2")
    form.get_by_label("Budget period").select_option("week")
    form.get_by_label("Requests per minute (empty: no limit)").fill("30")
    form.get_by_label("Models (patterns, comma-separated; empty: all)").fill("anthropic/*")
    form.get_by_role("button", name="Create").click()
    key = page.locator("#new-key").inner_text()
    assert key.startswith("as-")
    page.get_by_role("button", name="Copy the key of team-app").click()
    expect(page.get_by_role("button", name="Copy the key of team-app")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == key
    created = gateway.get("/api/clients/team-app")["client"]
    assert created["budget"] == {"usd": 2, "period": "week"}
    assert (created["rpm"], created["tpm"], created["models"]) == (30, None, ["anthropic/*"])
    assert not _refused(gateway, key)
    assert key not in json.dumps(gateway.get("/api/clients"))  # shown once: never in the list

    # A name taken: the gateway's message, nothing created.
    form.get_by_label("Name").fill("team-app")
    form.get_by_role("button", name="Create").click()
    expect(page.get_by_role("alert")).to_contain_text("exists already")
    assert [e for e in web.console_errors if "400" not in e] == []  # Chromium logs the refused request
    web.console_errors.clear()

    # Spend against budget: the gateway's figure for the current week.
    gateway.fake.enqueue(text_response("Spent.", usage={"input_tokens": 1000, "output_tokens": 200}))
    gateway.chat("team-app-session", "Spend something", key=key)
    page.reload()
    row = page.locator("tr[data-client='team-app']")
    spend = gateway.get("/api/clients/team-app")["client"]["spend"]["usd"]
    assert spend > 0
    assert float(row.locator("td[data-spend]").get_attribute("data-spend")) == pytest.approx(spend, abs=1e-12)
    assert row.locator("meter").get_attribute("max") == "2" and "of $2.00 / week" in row.inner_text()

    # Edit: a new budget and period, the rpm limit cleared, a tpm limit, every model.
    row.get_by_role("button", name="Edit team-app").click()
    edit = page.get_by_role("form", name="Edit team-app")
    assert edit.get_by_label("Requests per minute (empty: no limit)").input_value() == "30"
    edit.get_by_label("Budget (USD, empty: none)").fill("5")
    edit.get_by_label("Budget period").select_option("month")
    edit.get_by_label("Requests per minute (empty: no limit)").fill("")
    edit.get_by_label("Tokens per minute (empty: no limit)").fill("1000")
    edit.get_by_label("Models (patterns, comma-separated; empty: all)").fill("")
    edit.get_by_role("button", name="Save").click()
    expect(page.get_by_role("status")).to_contain_text("Saved team-app.")
    edited = gateway.get("/api/clients/team-app")["client"]
    assert edited["budget"] == {"usd": 5, "period": "month"}
    assert (edited["rpm"], edited["tpm"], edited["models"]) == (None, 1000, [])
    expect(row).to_contain_text("of $5.00 / month")
    screenshot(page, "clients")

    # Rotate: a new key, shown once; the old one is refused at once.
    row.get_by_role("button", name="Rotate the key of team-app").click()
    expect(page.locator("#new-key")).not_to_have_text(key)
    new_key = page.locator("#new-key").inner_text()
    assert new_key.startswith("as-") and _refused(gateway, key) and not _refused(gateway, new_key)

    # Remove, after a confirmation; the key dies, the usage stays.
    row.get_by_role("button", name="Remove team-app").click()
    assert gateway.get("/api/clients/team-app")["client"]["name"] == "team-app"  # one click removes nothing
    row.get_by_role("button", name="Confirm: remove team-app").click()
    row.wait_for(state="detached")
    assert "team-app" not in [c["name"] for c in gateway.get("/api/clients")["clients"]]
    assert _refused(gateway, new_key)
    assert "team-app" in gateway.get("/api/usage?by=client&since=30d")["perClient"]


def test_spend_before_a_budget_is_the_same_in_the_web_app_the_server_and_the_cli(web: Page, gateway: Gateway) -> None:
    """A client spends with no budget; the admin sets one: the spend made before counts, and the web app, the
    server and the CLI show the same figure (docs/accounting.md)."""
    key = gateway.call("POST", "/api/clients", {"name": "late-budget"})["key"]
    gateway.get("/api/clients")  # the spend is read (and kept) here, before the calls
    for i in range(2):
        gateway.fake.enqueue(text_response("Spent.", usage={"input_tokens": 2000}))
        gateway.chat(f"late-budget-{i}", "Spend something", key=key)
    spend = gateway.get("/api/clients/late-budget")["client"]["spend"]["usd"]
    recorded = gateway.get("/api/usage?by=client")["perClient"]["late-budget"]["totalCost"]
    assert spend == pytest.approx(recorded) and spend > 2 * 2000 * 3 / 1e6  # the records of its two calls
    gateway.call("PATCH", "/api/clients/late-budget", {"budgetUsd": round(spend * 1.01, 6)})

    result = CliRunner().invoke(
        cli,
        ["--config", str(gateway.config), "clients", "list", "--json"],
        env={"AGENTSPACE_HOME": str(gateway.data_dir)},
    )
    assert result.exit_code == 0, result.output
    listed = {c["name"]: c for c in json.loads(result.output)["clients"]}
    assert listed["late-budget"]["spend"]["usd"] == pytest.approx(spend)
    assert gateway.get("/api/clients/late-budget")["client"]["spend"]["usd"] == pytest.approx(spend)
    page = web.sign_in()
    page.get_by_role("link", name="Clients").click()
    row = page.locator("tr[data-client='late-budget']")
    assert float(row.locator("td[data-spend]").get_attribute("data-spend")) == pytest.approx(spend, abs=1e-12)
    with pytest.raises(urllib.error.HTTPError) as refused:  # the budget counts what was spent before it
        gateway.chat("late-budget-2", "One more", key=key)
    assert refused.value.code == 429


def test_markdown_tables_plain_titles_and_estimated_costs(web: Page, gateway: Gateway) -> None:
    page = web.sign_in()
    new_chat(page)
    table = "Prices:\n\n| model | input | output |\n|:---|---:|:-:|\n| haiku | $1 | $5 |\n| sonnet \\| 4.6 | $3 | $15 |\n\nDone."
    gateway.fake.enqueue(text_response(table, chunks=6))
    send(page, "**Compare** the `prices` of [Claude](https://example.com)")
    page.wait_for_selector("li.message.assistant[data-state=done] .meta")
    rendered = answer(page).locator(".md .table-wrap table")
    assert rendered.locator("thead th").all_inner_texts() == ["model", "input", "output"]
    assert rendered.locator("tbody tr").count() == 2
    assert rendered.locator("tbody tr").nth(1).locator("td").first.inner_text() == "sonnet | 4.6"
    assert rendered.locator("tbody td").nth(1).evaluate("e => getComputedStyle(e).textAlign") == "right"
    assert "Done." in answer(page).inner_text() and "|" not in answer(page).locator(".md > p").first.inner_text()
    # The session's title (its first message) is shown as text, not as Markdown source.
    link = page.locator("#sessions .session-link").first
    expect(link).to_have_text("Compare the prices of Claude")
    assert answer(page).locator(".meta .estimate").count() == 0  # a known price: no estimate marker

    # A model with no known price: the cost is marked as an estimate, in the chat and in the usage tables.
    new_chat(page)
    page.get_by_label("Model", exact=True).select_option(UNPRICED)
    gateway.fake.enqueue(text_response("Unpriced answer.", usage={"input_tokens": 1000, "output_tokens": 100}))
    send(page, "On the in-house model")
    page.wait_for_selector("li.message.assistant[data-state=done] .meta")
    marker = answer(page).locator(".meta .estimate")
    assert marker.inner_text() == "*" and "fallback price" in (marker.get_attribute("title") or "")
    page.get_by_role("link", name="Usage").click()
    page.get_by_label("Range", exact=True).select_option("today")
    page.wait_for_selector("#usage-body:not([aria-busy]) #card-totalCost")
    by_model = page.locator("table:has(caption:text('By model'))")
    assert by_model.locator(f"tr[data-key='{UNPRICED}'] .estimate").count() == 1
    assert by_model.locator("tr[data-key='anthropic/claude-sonnet-4-5'] .estimate").count() == 0
    assert "fallback price" in page.locator(".table-wrap:has(caption:text('By model')) .footnote").inner_text()


def test_phone_shows_the_chat_the_clients_actions_and_the_cost(browser: Any, gateway: Gateway) -> None:
    gateway.call("POST", "/api/clients", {"name": "phone-team", "budgetUsd": 3, "rpm": 10, "models": ["anthropic/*"]})
    gateway.chat("phone-session", "Something for the phone")
    web = Page(browser, gateway, PHONE)
    page = web.sign_in()
    page.goto(gateway.url + "/#/chat/phone-session")
    page.wait_for_selector("#context .stack .seg")
    # The chat's header (top bar, model, context bar) leaves most of the screen to the conversation.
    header = page.evaluate("document.getElementById('messages').getBoundingClientRect().top")
    assert header <= 160, header
    page.get_by_role("link", name="Usage").click()
    page.wait_for_selector("#usage-body:not([aria-busy]) #card-totalCost")
    for caption in ("By model", "By session"):
        cost = page.locator(f"table:has(caption:text('{caption}')) tbody td[data-field=totalCost]").first
        box = cost.bounding_box()
        assert box is not None and box["x"] + box["width"] <= PHONE["width"], (caption, box)
    page.get_by_role("link", name="Clients").click()
    row = page.locator("tr[data-client='phone-team']")
    row.wait_for()
    for name in ("Edit phone-team", "Rotate the key of phone-team", "Remove phone-team"):
        box = row.get_by_role("button", name=name).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], (name, box)
    limits = row.locator("td[data-label='Rate limits']")
    assert limits.inner_text() == "10 rpm"
    assert limits.evaluate("e => getComputedStyle(e, '::before').content") == '"Rate limits: "'  # a card's label
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    screenshot(page, "clients-phone")
    gateway.call("DELETE", "/api/clients/phone-team")
    web.check()


def test_attach_by_file_input_paste_and_drop_previews_and_inspect(web: Page, gateway: Gateway) -> None:
    attach_and_inspect(web, gateway)


def test_a_refused_file_in_a_stored_chat_keeps_its_error_on_screen(web: Page, gateway: Gateway) -> None:
    """A file the gateway refuses (a type it does not take, a size over the limit) is answered with an error
    before anything is stored: the chat shows it, and the reload of the stored session after the turn must
    not wipe it (nor the message the user wrote)."""
    page = web.sign_in()
    new_chat(page)
    gateway.fake.enqueue(text_response("Hello."))
    send(page, "hi")
    expect(page.locator("li.message.assistant[data-state=done]").last).to_contain_text("Hello.")
    before = len(gateway.fake.fake.requests)
    page.set_input_files(
        "#attach-input", files=[{"name": "scan.bmp", "mimeType": "image/bmp", "buffer": b"BM" + bytes(60)}]
    )
    expect(page.locator("#attachments li")).to_have_count(1)
    send(page, "What is in this scan?")
    error = page.locator("li.message.assistant .error").last
    expect(error).to_contain_text("image/bmp")
    # The turn's end reloads the stored session (which holds neither message): the error stays.
    page.wait_for_function("() => !document.getElementById('stop') || document.getElementById('stop').hidden")
    page.wait_for_load_state("networkidle")
    expect(error).to_contain_text("image/bmp")
    expect(page.locator("li.message.user").last).to_contain_text("What is in this scan?")
    assert len(gateway.fake.fake.requests) == before
    assert [e for e in web.console_errors if "415" not in e] == []  # Chromium logs the refused request
    web.console_errors.clear()


def attach_and_inspect(web: Page, gateway: Gateway) -> None:
    """A PNG by the file input, a PDF pasted, a PNG dropped (and removed): the upstream gets both, the history
    shows them after a reload, ``agentspace inspect`` their estimate (tests/test_web_attachments.py: PostgreSQL)."""
    from tests.test_attachments import pdf, png

    page = web.sign_in()
    new_chat(page)
    image, document, dropped = png(120, 60), pdf(2), png(30, 30, seed=9)
    page.set_input_files("#attach-input", files=[{"name": "chart.png", "mimeType": "image/png", "buffer": image}])
    expect(page.locator("#attachments img.file-preview")).to_have_count(1)
    # Paste a PDF into the prompt, then drop an image on the composer: what a browser dispatches.
    make_file = (
        "([b64, name, type]) => { const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));"
        " const dt = new DataTransfer(); dt.items.add(new File([bytes], name, { type })); return dt; }"
    )
    page.evaluate(
        f"(args) => document.getElementById('prompt').dispatchEvent(new ClipboardEvent('paste',"
        f" {{ clipboardData: ({make_file})(args), bubbles: true, cancelable: true }}))",
        [base64.b64encode(document).decode(), "report.pdf", "application/pdf"],
    )
    page.evaluate(
        f"(args) => document.querySelector('form.composer').dispatchEvent(new DragEvent('drop',"
        f" {{ dataTransfer: ({make_file})(args), bubbles: true, cancelable: true }}))",
        [base64.b64encode(dropped).decode(), "dot.png", "image/png"],
    )
    expect(page.locator("#attachments li")).to_have_count(3)
    # One is removed again before sending.
    page.get_by_role("button", name="Remove dot.png").click()
    expect(page.locator("#attachments li")).to_have_count(2)

    before = len(gateway.fake.fake.requests)
    gateway.fake.enqueue(text_response("A chart and a two-page report."))
    send(page, "What do these show?")
    expect(page.locator("li.message.assistant[data-state=done]").last).to_contain_text("two-page report")
    expect(page.locator("#attachments li")).to_have_count(0)
    [request] = gateway.fake.fake.requests[before:]
    content = request.body["messages"][-1]["content"]
    assert [b["type"] for b in content] == ["text", "image", "document"]
    assert base64.b64decode(content[1]["source"]["data"]) == image
    assert base64.b64decode(content[2]["source"]["data"]) == document

    # The history shows the previews after a reload (from GET /api/sessions/{id}).
    sid = session_id(page)
    page.reload()
    user = page.locator("li.message.user").last
    expect(user.locator("img.file-preview")).to_have_count(1)
    assert user.locator("img.file-preview").evaluate("img => img.naturalWidth") == 120
    expect(user.locator(".file-chip")).to_contain_text("report.pdf")
    page.locator("#context .seg[data-section=attachments]").wait_for()

    # The CLI in a process of its own: Playwright's loop runs in this thread.
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            "from agentspace.cli import main; main()",
            "--config",
            str(gateway.config),
            "inspect",
            sid,
        ],
        capture_output=True,
        text=True,
        env=child_env(gateway.data_dir),
        cwd=ROOT,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    result = run
    image_tokens, pdf_tokens = round(120 * 60 / 750), 2 * 4600
    assert f"chart.png image/png, {len(image)} bytes: {image_tokens} tokens" in result.stdout
    assert f"report.pdf application/pdf, {len(document):,} bytes, 2 pages: {pdf_tokens:,} tokens" in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.startswith("attachments"))
    assert f"{image_tokens + pdf_tokens:,}" in row


def test_a_file_dropped_anywhere_on_the_chat_is_attached_and_never_opened_in_place_of_the_app(
    web: Page, gateway: Gateway
) -> None:
    """Only the composer took a drop: a file let go over the messages (the larger target) or the sidebar was
    the browser's to handle, and it opens a dropped file in place of the app, losing the chat and its draft."""
    from tests.test_attachments import png

    page = web.sign_in()
    new_chat(page)
    make_file = (
        "([b64, name, type]) => { const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));"
        " const dt = new DataTransfer(); dt.items.add(new File([bytes], name, { type })); return dt; }"
    )
    # dispatchEvent answers false when a listener took the event (preventDefault): the browser leaves it alone.
    drop = (
        f"([selector, kind, args]) => !document.querySelector(selector).dispatchEvent(new DragEvent(kind,"
        f" {{ dataTransfer: ({make_file})(args), bubbles: true, cancelable: true }}))"
    )
    image = [base64.b64encode(png(20, 10)).decode(), "over-messages.png", "image/png"]
    assert page.evaluate(drop, ["#messages", "dragover", image])
    assert page.evaluate(drop, ["#messages", "drop", image])
    expect(page.locator("#attachments li")).to_have_count(1)
    expect(page.locator("#attachments img.file-preview")).to_have_attribute("alt", "over-messages.png")
    # Where nothing takes a file (the sidebar), the browser still does not open it.
    assert page.evaluate(drop, ["#sidebar", "dragover", image])
    assert page.evaluate(drop, ["#sidebar", "drop", image])
    expect(page.locator("#attachments li")).to_have_count(1)
    web.check()


def test_a_file_pasted_just_before_sending_goes_with_that_message(web: Page, gateway: Gateway) -> None:
    """A file is read (FileReader) after the paste: Enter pressed before the read ended sent the message without
    it, and the file turned up in the composer for the next message."""
    from tests.test_attachments import pdf

    page = web.sign_in()
    new_chat(page)
    document = pdf(3) + b"%" * (3 * 1024 * 1024)  # a few MB: read after this task, as any file is
    page.fill("#prompt", "Summarise this")
    before = len(gateway.fake.fake.requests)
    gateway.fake.enqueue(text_response("Three pages."))
    # The paste and the Enter in one task: the read cannot have ended when the form is submitted.
    page.evaluate(
        "([b64]) => { const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));"
        " const dt = new DataTransfer(); dt.items.add(new File([bytes], 'report.pdf', { type: 'application/pdf' }));"
        " const prompt = document.getElementById('prompt');"
        " prompt.dispatchEvent(new ClipboardEvent('paste', { clipboardData: dt, bubbles: true, cancelable: true }));"
        " document.querySelector('form.composer').requestSubmit(); }",
        [base64.b64encode(document).decode()],
    )
    expect(page.locator("li.message.assistant[data-state=done]").last).to_contain_text("Three pages.")
    [request] = gateway.fake.fake.requests[before:]
    content = request.body["messages"][-1]["content"]
    assert [b["type"] for b in content] == ["text", "document"], content
    assert base64.b64decode(content[1]["source"]["data"]) == document
    expect(page.locator("#attachments li")).to_have_count(0)
    web.check()
