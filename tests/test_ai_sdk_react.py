"""The AI SDK's React ``useChat`` (``@ai-sdk/react``, pinned in tests/js) in Chromium against ``POST /api/chat``:
a PNG attached as ``useChat`` attaches files reaches the fake upstream as an image block with the same bytes, the
answer streams, and after a reload (the app starts from ``GET /api/sessions/{id}``) the image is shown again.
``tests/js/usechat_app.jsx`` is the app, bundled with esbuild and served from an origin of its own (CORS
allowed by ``[server] allowed_origins``); on both storage backends."""

from __future__ import annotations

import base64
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from aiohttp import web

from tests.fakes.anthropic_upstream import text_response
from tests.test_attachments import BACKENDS, blocks, png
from tests.test_web_app import CHROMIUM

playwright_async = pytest.importorskip("playwright.async_api", reason="playwright is not installed")

JS_DIR = Path(__file__).parent / "js"
NPM = shutil.which("npm")
pytestmark = pytest.mark.skipif(CHROMIUM is None or NPM is None, reason="Chromium and npm are needed")

PAGE = b'<!doctype html><meta charset="utf-8"><title>useChat</title><div id="root"></div><script type="module" src="/app.js"></script>'


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The app bundled (tests/js's node_modules installed first when they lack the React packages)."""
    if not (JS_DIR / "node_modules" / "@ai-sdk" / "react").is_dir():
        result = subprocess.run(
            [str(NPM), "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0:
            pytest.skip(f"npm ci failed in tests/js (offline?): {result.stderr.strip()[-500:]}")
    out = tmp_path_factory.mktemp("usechat") / "app.js"
    subprocess.run(
        [
            str(JS_DIR / "node_modules" / ".bin" / "esbuild"),
            "usechat_app.jsx",
            "--bundle",
            "--format=esm",
            "--jsx=automatic",
            f"--outfile={out}",
            "--define:process.env.NODE_ENV='production'".replace("'", '"'),
            "--log-level=warning",
        ],
        cwd=JS_DIR,
        check=True,
        timeout=120,
    )
    return out


@pytest.fixture
async def app_origin(bundle: Path) -> AsyncIterator[str]:
    """The app's page and bundle on 127.0.0.1, an origin other than the gateway's."""

    async def page(request: web.Request) -> web.Response:
        return web.Response(body=PAGE, content_type="text/html")

    async def script(request: web.Request) -> web.Response:
        return web.Response(body=bundle.read_bytes(), content_type="text/javascript")

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_get("/app.js", script)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_use_chat_sends_a_png_and_shows_it_after_a_reload(
    backend: str,
    request: pytest.FixtureRequest,
    make_client: Any,
    token: str,
    fake_anthropic: Any,
    app_origin: str,
    tmp_path: Path,
) -> None:
    sections: dict[str, Any] = {"server": {"allowed_origins": [app_origin]}}
    if backend == "postgres":
        sections["storage"] = {"backend": "postgres", "dsn": request.getfixturevalue("pg_dsn")}
    client = await make_client(**sections)
    gateway_url = str(client.make_url("")).rstrip("/")
    image = png(96, 48, seed=5)
    picture = tmp_path / "picture.png"
    picture.write_bytes(image)
    fake_anthropic.enqueue(text_response("A striped picture.", chunks=4).with_delay(0.05))

    url = f"{app_origin}/?" + urlencode({"gateway": gateway_url, "token": token, "chat": "react-chat"})
    async with playwright_async.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(url)
            await page.locator("#status", has_text="ready").wait_for()
            await page.set_input_files("#file", str(picture))
            await page.fill("#text", "What is in this picture?")
            await page.click("button[type=submit]")
            answer = page.locator("#messages li.assistant")
            await answer.filter(has_text="A striped picture.").wait_for(timeout=20_000)
            await page.locator("#status", has_text="ready").wait_for()
            assert await page.locator("#error").count() == 0

            [sent] = blocks(fake_anthropic.requests[0], "image")
            assert sent["source"] == {
                "type": "base64",
                "media_type": "image/png",
                "data": base64.b64encode(image).decode(),
            }
            assert blocks(fake_anthropic.requests[0], "text")[-1]["text"] == "What is in this picture?"

            await page.reload()
            shown = page.locator("#messages li.user img")
            await shown.wait_for()
            assert await shown.get_attribute("src") == "data:image/png;base64," + base64.b64encode(image).decode()
            assert await shown.evaluate("img => img.complete && img.naturalWidth") == 96
            assert "A striped picture." in await page.locator("#messages li.assistant").inner_text()
            assert errors == []
        finally:
            await browser.close()
