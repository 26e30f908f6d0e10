"""One door (issue 31) tried from outside once more: the same request answered alike wherever it comes in."""

from __future__ import annotations

from aiohttp.test_utils import TestClient

from tests.fakes.anthropic_upstream import FakeAnthropic

MESSAGES = [{"role": "user", "content": "Hi"}]


async def test_count_tokens_of_an_unknown_bare_model_name_is_refused_as_the_messages_call_refuses_it(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: FakeAnthropic
) -> None:
    """A name that is no claude-* id and no provider/model: both answer the same 404, the hint included."""
    body = {"model": "nosuch-model", "messages": MESSAGES}
    async with client.post("/v1/messages", json={**body, "max_tokens": 16}, headers=auth_headers) as resp:
        call = await resp.json()
        assert resp.status == 404 and call["error"]["type"] == "not_found_error", call
    async with client.post("/v1/messages/count_tokens", json=body, headers=auth_headers) as resp:
        count = await resp.json()
        assert resp.status == 404, count
        assert count == call, count
    assert fake_anthropic.requests == []
