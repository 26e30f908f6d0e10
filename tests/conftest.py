"""Shared fixtures: an isolated data directory, fake upstreams, and the real app behind aiohttp's test client.

Nothing here replaces our own code: the app is ``create_app`` as served, providers talk to fake upstreams
over HTTP through the real SDKs, and test tools or sections are registered as plugins.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pluggy
import pytest
from aiohttp.test_utils import TestClient, TestServer

from agentspace.config import Config, parse_config
from agentspace.gateway_token import load_or_create_token
from agentspace.plugins import create_plugin_manager
from agentspace.server import create_app, event_loop_factory

# The fakes' own fixtures: ``fake_anthropic`` and ``fake_openai`` (started upstreams on 127.0.0.1); real
# PostgreSQL and Redis servers for the storage tests (``pg_server``, ``pg_dsn``, ``redis_srv``).
pytest_plugins = ("tests.fakes.fixtures", "tests.scale_servers")

TEST_KEY = "sk-ant-test-0123456789abcdef"


@pytest.fixture(scope="session")
def event_loop_policy() -> asyncio.AbstractEventLoopPolicy:
    """The suite runs on the event loop that ``agentspace serve`` runs by default (``[server] event_loop``)."""
    if event_loop_factory("auto")[0] == "uvloop":
        import uvloop

        return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()


# Budget periods, "today" in reports and the rollups by day all turn at midnight UTC (weeks and months too): a
# test that starts this close to it waits for it to pass, so that none runs across it (spent on one day, read
# on the next).
MIDNIGHT_MARGIN_SECONDS = 120.0


@pytest.fixture(autouse=True)
def clear_of_midnight() -> None:
    now = datetime.now(UTC)
    left = (now.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1) - now).total_seconds()
    if left < MIDNIGHT_MARGIN_SECONDS:
        time.sleep(left + 1)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own data directory, no real keys, and no installed plugins unless it asks."""
    home = tmp_path / "agentspace-home"
    monkeypatch.setenv("AGENTSPACE_HOME", str(home))
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    monkeypatch.setenv("AGENTSPACE_LOAD_PLUGINS", "")
    for name in ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "GEMINI_API_KEY", "AGENTSPACE_CONFIG", "AGENTSPACE_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return home


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@pytest.fixture
def make_config(tmp_path: Path, isolated_env: Path, fake_anthropic: Any) -> Callable[..., Config]:
    """A config whose data dir is the test's, with the Anthropic provider pointed at the fake upstream."""

    def make(raw: dict[str, Any] | None = None, **sections: Any) -> Config:
        base = {
            "storage": {"data_dir": str(isolated_env)},
            "models": {"default": "anthropic/claude-sonnet-4-5"},
            "providers": {"anthropic": {"base_url": fake_anthropic.url}},
        }
        return parse_config(_merge(base, {**(raw or {}), **sections}), "<test>")

    return make


@pytest.fixture
def plugin_manager() -> pluggy.PluginManager:
    """A fresh plugin manager (built-ins only: AGENTSPACE_LOAD_PLUGINS is empty in tests)."""
    return create_plugin_manager()


@pytest.fixture
async def make_client(
    make_config: Callable[..., Config], plugin_manager: pluggy.PluginManager, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[..., Awaitable[TestClient]]]:
    """Start the real app on 127.0.0.1 and return an aiohttp TestClient for it."""
    clients: list[TestClient] = []
    monkeypatch.setenv("ANTHROPIC_API_KEY", TEST_KEY)

    async def make(
        raw: dict[str, Any] | None = None, *, pm: pluggy.PluginManager | None = None, **sections: Any
    ) -> TestClient:
        config = make_config(raw, **sections)
        client = TestClient(TestServer(create_app(config, pm or plugin_manager), host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
async def client(make_client: Callable[..., Awaitable[TestClient]]) -> TestClient:
    return await make_client()


@pytest.fixture
def token(isolated_env: Path) -> str:
    return load_or_create_token(isolated_env)


@pytest.fixture
def auth_headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll an async condition (for work that finishes after the client has gone)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)
