"""The web app's attachments on the PostgreSQL backend: ``tests/test_web_app.py``'s attach test against an
``agentspace serve`` whose sessions and files are in a fresh database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scripts.harness import write_config
from tests.test_web_app import CHROMIUM, Gateway, Page, ThreadedFake, attach_and_inspect, playwright_api, served

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium not found")


@pytest.fixture
def pg_gateway(tmp_path: Path, pg_dsn: str) -> Iterator[Gateway]:
    fake = ThreadedFake()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    config = tmp_path / "agentspace.toml"
    write_config(
        config,
        {
            "storage": {"data_dir": str(data_dir), "backend": "postgres", "dsn": pg_dsn},
            "models": {"default": "anthropic/claude-sonnet-4-5"},
            "thinking": {"enabled": False},
            "providers.anthropic": {"base_url": fake.fake.url},
        },
    )
    try:
        with served(tmp_path, config, data_dir, fake) as gateway:
            yield gateway
    finally:
        fake.close()


def test_attach_on_postgres(pg_gateway: Gateway) -> None:
    with playwright_api.sync_playwright() as p:
        browser: Any = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            web = Page(browser, pg_gateway)
            attach_and_inspect(web, pg_gateway)
            web.check()
        finally:
            browser.close()
    # The files are in the database, not the data directory.
    assert not (pg_gateway.data_dir / "blobs").exists()
