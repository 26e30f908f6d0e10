"""Issue 25 (the embedded store at the physical limit) tried from outside once more: what the disk keeps of the
writes that must be durable before a call leaves, and of the files a crash leaves behind."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anthropic
import pytest
from aiohttp.test_utils import TestClient

from tests.fakes.anthropic_upstream import FakeAnthropic, text_response


class _Arrivals(list[Any]):
    """The fake upstream's request list, noting in ``events`` when a request arrived."""

    def __init__(self, events: list[tuple[str, str]]) -> None:
        super().__init__()
        self.events = events

    def append(self, item: Any) -> None:
        self.events.append(("upstream", item.path))
        super().append(item)


async def test_the_ledger_journal_is_named_durably_before_the_first_call_leaves(
    client: TestClient,
    token: str,
    fake_anthropic: FakeAnthropic,
    isolated_env: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """docs/accounting.md: the pending entry is synced before the request leaves, so that a server that stops
    mid-call leaves what it owes. A server's first call makes its journal (and the ``ledger`` folder): an
    ``fdatasync`` of the new file makes its lines durable, not its name in the folder, so after a power cut the
    journal, and the call's entry with it, may be gone. The folders are synced before the call goes out."""
    events: list[tuple[str, str]] = []

    def spy(name: str) -> Any:
        real = getattr(os, name)

        def call(fd: int) -> None:
            events.append((name, os.readlink(f"/proc/self/fd/{fd}")))
            real(fd)

        return call

    for name in ("fsync", "fdatasync"):
        monkeypatch.setattr(os, name, spy(name))
    real_rename = os.rename

    def rename(src: Any, dst: Any) -> None:
        events.append(("rename", os.fspath(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    real_mkdir = os.mkdir

    def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        events.append(("mkdir", os.fspath(path)))
        real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    fake_anthropic.requests = _Arrivals(events)
    fake_anthropic.enqueue(text_response("counted"))

    sdk = anthropic.AsyncAnthropic(api_key=token, base_url=str(client.make_url("")), max_retries=0)
    message = await sdk.messages.create(
        model="claude-sonnet-4-5", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.content[0].text == "counted"  # type: ignore[union-attr]

    ledger = isolated_env.resolve() / "ledger"
    sent = events.index(("upstream", "/v1/messages"))
    made = events.index(("mkdir", str(ledger)))
    named = next(n for n, (kind, path) in enumerate(events) if kind == "rename" and Path(path).parent == ledger)
    assert made < named < sent, events
    assert ("fsync", str(isolated_env.resolve())) in events[made:sent], events[made:sent]  # the folder's name
    assert ("fsync", str(ledger)) in events[named:sent], events[named:sent]  # the journal's
