"""The fake upstreams as pytest fixtures (``fake_anthropic``, ``fake_openai``), kept apart from the fakes
themselves so that the benchmarks run them without pytest installed."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from .anthropic_upstream import FakeAnthropic, started_fake_anthropic
from .openai_upstream import FakeOpenAI, started_fake_openai


@pytest.fixture
async def fake_anthropic() -> AsyncIterator[FakeAnthropic]:
    """A started fake for one test: ``fake_anthropic.enqueue(...)``, ``fake_anthropic.url``, ``.requests``."""
    async with started_fake_anthropic() as fake:
        yield fake


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    """A started fake for one test: ``fake_openai.enqueue(...)``, ``fake_openai.url``, ``.requests``."""
    async with started_fake_openai() as fake:
        yield fake
