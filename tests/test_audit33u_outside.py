"""Images and documents in the gateway's own sessions (docs/attachments.md), tried from outside once more (audit
33u): what the inspector says an image costs a model of another provider, and what the upstream bills."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from tests.fakes.anthropic_upstream import text_response
from tests.support.ui_stream import post_chat
from tests.support.ws import chat, connect
from tests.test_attachments import file_message, pdf, png
from tests.test_cli_e2e import run_cli

OPENAI_KEY = "sk-openai-test-0123456789"


async def answered(resp: Any) -> str:
    """The whole UI stream of a turn (this loaded machine may take longer than ``read_all``'s 10 s a chunk)."""
    assert resp.status == 200, await resp.text()
    text: str = await resp.text()
    assert text.endswith("data: [DONE]\n\n") and '"type":"error"' not in text, text[-500:]
    return text


async def openai_served(make_client: Any, fake_openai: Any, monkeypatch: Any, **sections: Any) -> TestClient:
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    client: TestClient = await make_client(providers={"openai": {"base_url": fake_openai.url}}, **sections)
    return client


async def test_the_inspector_counts_an_image_as_openai_bills_it(
    make_client: Any, auth_headers: dict[str, str], fake_anthropic: Any, fake_openai: Any, monkeypatch: Any
) -> None:
    # An OpenAI model bills an image by OpenAI's formulas (platform.openai.com/docs/guides/images-vision,
    # "Calculating costs"), not Anthropic's: the inspector said 1,398 tokens for a 1024 x 1024 image on gpt-4o (it
    # bills 765) and on gpt-4o-mini (25,501: its tiles are priced to cost what gpt-4o's do), so the context bar
    # showed an image on gpt-4o-mini at 1/18 of its price, and the window policy took it for as little.
    client = await openai_served(make_client, fake_openai, monkeypatch)
    fake_anthropic.enqueue(text_response("Two squares."))
    square, tall = png(1024, 1024), png(2048, 4096, seed=1)
    message = file_message("look", ("image/png", square), ("image/png", tall))
    await answered(await post_chat(client, auth_headers, "pics", message))

    async def estimates(model: str) -> list[int]:
        resp = await client.get(f"/api/sessions/pics/context?model={model}", headers=auth_headers)
        assert resp.status == 200, await resp.text()
        [row] = [s for s in (await resp.json())["sections"] if s["name"] == "attachments"]
        return [f["tokenEstimate"] for f in row["files"]]

    # The documented examples: tiles of 512 px after fitting 2048 x 2048 and 768 px on the short side.
    assert await estimates("openai/gpt-4o") == [85 + 4 * 170, 85 + 6 * 170]
    assert await estimates("openai/gpt-4o-mini") == [2833 + 4 * 5667, 2833 + 6 * 5667]
    # The patch-based models: 32-px patches times the model's multiplier; past 1536 patches the image is scaled
    # down to fit, then to whole patches on its narrower side (2048 x 4096 -> 864 x 1728: 27 x 54 patches).
    assert await estimates("openai/gpt-4.1-mini") == [round(1024 * 1.62), round(27 * 54 * 1.62)]
    # Claude's stay Anthropic's: (width x height) / 750 after fitting 1568 px, at most 1,600.
    assert await estimates("anthropic/claude-sonnet-4-5") == [round(1024 * 1024 / 750), 1600]


async def test_a_chat_send_field_the_gateway_does_not_read_is_refused_by_name_not_dropped(
    client: TestClient, token: str, fake_anthropic: Any
) -> None:
    # A client that put its image in ``files`` (or ``attachment``) rather than ``attachments`` was answered, and
    # billed, by a model that never saw it: the frame's other fields were ignored, the image dropped unseen.
    fake_anthropic.enqueue(text_response("Here is the answer."))
    ws = await connect(client, token)
    image = [{"mediaType": "image/png", "data": base64.b64encode(png(8, 8)).decode()}]
    for field in ("files", "attachment"):
        frames = await chat(ws, "What is in this image?", **{field: image})
        assert [f["type"] for f in frames] == ["error"], frames
        assert frames[0]["code"] == "INVALID_MESSAGE"
        assert frames[0]["message"].startswith(f"{field}: is not a field of chat.send"), frames[0]
    assert fake_anthropic.requests == []
    # The connection stays usable, and the documented fields still work.
    frames = await chat(ws, "What is in this image?", attachments=image, model="anthropic/claude-sonnet-4-5")
    assert frames[-1]["type"] == "chat.stream.end", frames[-1]
    assert len(fake_anthropic.requests) == 1
    await ws.close()


async def test_files_in_ai_sdk_4s_experimental_attachments_are_refused_by_name_not_dropped(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    # AI SDK 4's useChat (and clients written from its docs) attach files as the message's
    # ``experimental_attachments``, next to its parts. The gateway answered 200 from the text alone and dropped
    # the image unseen: the very failure issue 33 was filed for.
    url = "data:image/png;base64," + base64.b64encode(png(8, 8)).decode()
    message = {
        "id": "u1",
        "role": "user",
        "content": "What is in this image?",
        "parts": [{"type": "text", "text": "What is in this image?"}],
        "experimental_attachments": [{"name": "chart.png", "contentType": "image/png", "url": url}],
    }
    resp = await post_chat(client, auth_headers, "v4", message)
    assert resp.status == 400, await resp.text()
    error = (await resp.json())["error"]
    assert error["code"] == "INVALID_MESSAGE"
    assert error["message"].startswith("messages[0].experimental_attachments: "), error
    assert "file parts" in error["message"]
    assert fake_anthropic.requests == []
    assert (await client.get("/api/sessions/v4", headers=auth_headers)).status == 404
    # An empty list attaches nothing: still answered (AI SDK 4 sends none when no file is attached).
    fake_anthropic.enqueue(text_response("Nothing attached."))
    await answered(await post_chat(client, auth_headers, "v4", {**message, "experimental_attachments": []}))


async def test_sessions_show_names_the_files_a_message_attaches(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any, isolated_env: Path
) -> None:
    # `agentspace sessions show` printed a message's text only: a message of files alone showed as nothing, and
    # a question about an image gave no sign that one was attached (the Markdown export names them).
    fake_anthropic.enqueue(text_response("A chart and a report."))
    image, document = png(8, 8), pdf(2)
    message = file_message("", ("image/png", image), ("application/pdf", document))
    message["parts"] = message["parts"][1:]
    message["parts"][0]["filename"] = "chart.png"
    await answered(await post_chat(client, auth_headers, "files", message))
    shown = await run_cli(["sessions", "show", "files"], isolated_env)
    assert shown.exit_code == 0, shown.output
    assert f"Attached: `chart.png` (image/png, {len(image)} bytes)" in shown.output, shown.output
    assert f"Attached: `f1` (application/pdf, {len(document)} bytes)" in shown.output, shown.output
    assert "A chart and a report." in shown.output


async def test_a_session_begun_with_files_only_is_titled_by_their_names(
    client: TestClient, auth_headers: dict[str, str], fake_anthropic: Any
) -> None:
    # An image sent without a word (the web app's attach and send, useChat with file parts only) left the session
    # untitled: the sidebar and `agentspace sessions list` showed "New chat" for every such session.
    fake_anthropic.enqueue(text_response("A small square."))
    message = file_message("", ("image/png", png(8, 8)), ("application/pdf", pdf(1)))
    message["parts"] = [p for p in message["parts"] if p["type"] == "file"]
    await answered(await post_chat(client, auth_headers, "files-only", message))
    resp = await client.get("/api/sessions/files-only", headers=auth_headers)
    assert (await resp.json())["session"]["title"] == "f0, f1"
