"""Sessions that last, in the web app (Chromium through Playwright against a real ``agentspace serve``, the
fixtures of tests/test_web_app.py): the context bar's prompt-cache line and marks, the Compact button, the
export downloads and the sidebar's search box."""

from __future__ import annotations

import json
from pathlib import Path

from tests.fakes.anthropic_upstream import text_response
from tests.test_prompt_cache import turn_text
from tests.test_web_app import PHONE, Gateway, Page, browser, expect, gateway, new_chat, send, session_id, web

__all__ = ["browser", "gateway", "web"]  # the module's fixtures, as tests/test_web_app.py defines them


def done_answers(page: object, n: int) -> None:
    expect(page.locator("li.message.assistant[data-state=done] .meta")).to_have_count(n)  # type: ignore[attr-defined]


def test_context_bar_shows_the_cache_and_compact_summarises(web: Page, gateway: Gateway) -> None:
    gateway.fake.fake.caching = True
    try:
        page = web.sign_in()
        new_chat(page)
        gateway.fake.enqueue(text_response("First answer."), text_response("Second answer."))
        send(page, turn_text(1, 6000))
        done_answers(page, 1)
        send(page, turn_text(2, 6000))
        done_answers(page, 2)
        sid = session_id(page)
        line = page.locator("#cache-line")
        expect(line).to_contain_text("Prompt cache:")
        expect(line).to_contain_text("with the cache")
        inspection = gateway.get(f"/api/sessions/{sid}/context?model=anthropic/claude-sonnet-4-5")
        history = next(s for s in inspection["sections"] if s["name"] == "history")
        assert history["cache"] in ("read", "read+write")
        expect(page.locator("#context .seg[data-section=history]")).to_have_attribute("data-cache", history["cache"])
        assert f"{inspection['totals']['cacheReadTokens']:,} tokens read" in line.inner_text()

        gateway.fake.enqueue(text_response("The user sent two long passages of prose."))
        page.get_by_role("button", name="Compact").click()
        expect(page.locator("#notice")).to_have_text("Compacted: 2 messages summarised.")
        expect(page.locator("#context .seg[data-section=summary]")).to_have_count(1)
        stored = gateway.get(f"/api/sessions/{sid}")["session"]["messages"]
        assert stored[1]["summary"]["text"] == "The user sent two long passages of prose."
    finally:
        gateway.fake.fake.caching = False


def test_export_downloads_markdown_and_json(web: Page, gateway: Gateway, tmp_path: Path) -> None:
    page = web.sign_in()
    new_chat(page)
    gateway.fake.enqueue(text_response("Exported answer."))
    send(page, "Please export me")
    done_answers(page, 1)
    sid = session_id(page)
    with page.expect_download() as info:
        page.get_by_role("button", name="Export Markdown").click()
    download = info.value
    assert download.suggested_filename == f"{sid}.md"
    path = tmp_path / "chat.md"
    download.save_as(path)
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Please export me") and "Exported answer." in text
    with page.expect_download() as info:
        page.get_by_role("button", name="Export JSON").click()
    info.value.save_as(tmp_path / "chat.json")
    assert json.loads((tmp_path / "chat.json").read_text())["session"]["id"] == sid


def test_a_phone_shows_the_inspectors_details_and_exports_on_a_tap(
    browser: object, gateway: Gateway, tmp_path: Path
) -> None:
    """On a phone the chat's header shows the context bar and its total only; the sections' names, the cache
    line and the export buttons were hidden with no way to show them (the segments' titles need a mouse)."""
    web = Page(browser, gateway, PHONE)
    page = web.sign_in()
    page.get_by_role("button", name="Chats").click()  # (the sidebar, closed on a phone)
    new_chat(page)  # not the chat an earlier test of the module left open
    gateway.fake.enqueue(text_response("Phone answer."))
    send(page, "Export me from a phone")
    done_answers(page, 1)
    sid = session_id(page)
    export = page.get_by_role("button", name="Export Markdown")
    legend = page.locator("#context .legend")
    expect(page.locator("#context .seg[data-section=history]")).to_have_count(1)
    expect(export).to_be_hidden()
    expect(legend).to_be_hidden()
    details = page.get_by_role("button", name="Details")
    details.click()
    expect(details).to_have_attribute("aria-expanded", "true")
    expect(legend).to_be_visible()
    expect(legend).to_contain_text("history")
    expect(page.locator("#cache-line")).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    with page.expect_download() as info:
        export.click()
    assert info.value.suggested_filename == f"{sid}.md"
    info.value.save_as(tmp_path / "phone.md")
    assert "Phone answer." in (tmp_path / "phone.md").read_text(encoding="utf-8")
    gateway.fake.enqueue(text_response("Still open."))
    send(page, "One more")
    done_answers(page, 2)
    expect(legend).to_be_visible()  # the bar is drawn again after a turn: the details stay shown
    details.click()
    expect(legend).to_be_hidden()
    web.check()


def test_sidebar_search_finds_message_text(web: Page, gateway: Gateway) -> None:
    page = web.sign_in()
    new_chat(page)
    gateway.fake.enqueue(text_response("Noted."))
    send(page, "The pelican ledger balances on Tuesdays")
    done_answers(page, 1)
    sid = session_id(page)
    new_chat(page)
    gateway.fake.enqueue(text_response("Sure."))
    send(page, "Something else entirely")
    done_answers(page, 1)
    search = page.get_by_label("Search chats")
    search.fill("PELICAN LEDGER")
    expect(page.locator("#sessions li")).to_have_count(1)
    found = page.locator("#sessions li.found")
    expect(found).to_have_attribute("data-session", sid)
    expect(found.locator(".match")).to_contain_text("pelican ledger balances")
    search.fill("no chat says this")
    expect(page.locator("#sessions li")).to_have_text("No chat contains “no chat says this”.")
    search.fill("")
    expect(page.locator("#sessions li.muted")).to_have_count(0)  # the whole list is back
    expect(page.locator("#sessions li.found")).to_have_count(0)
    assert page.locator("#sessions li").count() >= 2


def test_the_web_apps_search_says_when_older_chats_match_too(web: Page, gateway: Gateway) -> None:
    """A search answers the 50 most recent matches: the sidebar says when older chats match too."""
    for n in range(51):
        gateway.chat(f"walrus{n}", f"The walrus minutes, part {n}")
    page = web.sign_in()
    page.get_by_label("Search chats").fill("walrus minutes")
    expect(page.locator("#sessions li.found")).to_have_count(50)
    expect(page.locator("#search-more")).to_contain_text("these are the 50 most recent")
    page.get_by_label("Search chats").fill("walrus minutes, part 7")
    expect(page.locator("#sessions li.found")).to_have_count(1)
    expect(page.locator("#search-more")).to_have_count(0)
