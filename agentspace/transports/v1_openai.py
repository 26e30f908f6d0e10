"""``POST /v1/chat/completions``: the OpenAI Chat Completions API, drop-in, for every model."""

from __future__ import annotations

from aiohttp import web

from ..protocols import openai_chat


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return web.json_response(openai_chat.error_body(501, "not yet"), status=501)
