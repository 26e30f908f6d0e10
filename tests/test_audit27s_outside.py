"""Bad input on every way in (issue 27's hardening round), tried from outside a third time: what the earlier
rounds (test_audit27_outside, test_audit27r_outside) left."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

import tests.fakes.anthropic_upstream as fa
from tests.support.ws import chat, connect
from tests.test_cli_e2e import run_cli, ws_url
from tests.test_hardening import EVIL, assert_inert


async def test_sessions_compact_escapes_the_summary_it_prints(
    client: TestClient, token: str, fake_anthropic: fa.FakeAnthropic, isolated_env: Path
) -> None:
    # The summary is a model's text, stored in the session: `sessions show` escapes it, `compact` printed it raw
    socket = await connect(client, token)
    session_id = (await chat(socket, "first", "r1"))[0]["sessionId"]
    await chat(socket, "second", "r2", sessionId=session_id)
    await socket.close()
    fake_anthropic.enqueue(fa.text_response("Summary " + EVIL, chunks=1))
    compacted = await run_cli(["sessions", "compact", session_id, "--url", ws_url(client)], isolated_env)
    assert compacted.exit_code == 0, compacted.output
    assert_inert(compacted.output, lines=True)
    assert "Summary \\x1b]0;PWNED\\x07" in compacted.output
