"""``GET /v1/models``: the models the caller may use, in OpenAI's list shape or Anthropic's."""

from __future__ import annotations

from aiohttp import web


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": []})
