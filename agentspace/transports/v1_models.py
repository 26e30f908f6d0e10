"""``GET /v1/models``: the models the caller may use (usable keys, provider plugins, the config), in
OpenAI's list shape, or Anthropic's when the request carries ``anthropic-version``; ``GET /v1/models/{id}``
one of them (the SDKs' ``models.retrieve``), or a 404 in the same shape.

The ids are the ones the /v1 endpoints take: ``provider/model`` for OpenAI clients; for Anthropic clients
a bare ``claude-*`` id for Anthropic's models (what Claude Code and the SDK expect) and ``provider/model``
for the others.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from . import state
from .v1_common import anthropic_model, client_name, openai_model
from .v1_errors import error_response

# A fixed creation time: the catalog does not know when a model was released.
CREATED = 1_700_000_000
CREATED_AT = "2023-11-14T22:13:20Z"


async def list_models(request: web.Request) -> web.Response:
    models = await state.service(request.app, client_name(request)).models()  # a client's: its allowlist only
    if "anthropic-version" in request.headers:
        try:
            return web.json_response(anthropic_page(anthropic_models(models), request.query))
        except ValueError as e:
            return error_response(request, 400, str(e))
    return web.json_response(openai_list(models))


async def get_model(request: web.Request) -> web.Response:
    """One model, named as the client asked for it, by any id the /v1 endpoints take for it (a bare
    ``claude-*`` or ``gpt-*`` id too)."""
    models = await state.service(request.app, client_name(request)).models()
    wanted = request.match_info["id"]
    anthropic = "anthropic-version" in request.headers
    # A model group is named as it is, as the /v1 endpoints take it ("claude" is no bare model id).
    groups = [m for m in models if m["provider"] == "group" and m["id"] == wanted]
    ours = anthropic_model(wanted) if anthropic else openai_model(wanted)
    found = groups or [m for m in models if m["id"] == ours]
    if not found:
        message = f"The model `{wanted}` does not exist here. Run: agentspace models"
        return error_response(request, 404, message, code="model_not_found")
    if anthropic:
        return web.json_response({**anthropic_models(found)[0], "id": wanted, "display_name": wanted})
    return web.json_response({**openai_list(found)["data"][0], "id": wanted})


def lifecycle(deprecation_date: str | None, retired: bool) -> dict[str, Any]:
    """Anthropic's ``lifecycle``: a model with a retirement date ahead is ``deprecated`` (it still answers),
    past it ``retired`` (only the configured default is listed then); ``retires_at`` is that date."""
    if not deprecation_date:
        return {"lifecycle": "active", "retires_at": None}
    return {"lifecycle": "retired" if retired else "deprecated", "retires_at": f"{deprecation_date}T00:00:00Z"}


def _shadowed(models: list[dict[str, Any]], listed_id: Callable[[dict[str, Any]], str]) -> list[dict[str, Any]]:
    """``models`` without the ones listed under a model group's name (a group named ``claude-sonnet-4-5``, as
    LiteLLM users name theirs): the /v1 endpoints take that id for the group, so it is listed once, as the group."""
    groups = {m["id"] for m in models if m["provider"] == "group"}
    return [m for m in models if m["provider"] == "group" or listed_id(m) not in groups]


def openai_list(models: list[dict[str, Any]]) -> dict[str, Any]:
    models = _shadowed(models, lambda m: m["id"])
    return {
        "object": "list",
        "data": [{"id": m["id"], "object": "model", "created": CREATED, "owned_by": m["provider"]} for m in models],
    }


def _anthropic_id(model: dict[str, Any]) -> str:
    return model["id"].split("/", 1)[1] if model["id"].startswith("anthropic/") else model["id"]


def anthropic_models(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    data = []
    for m in _shadowed(models, _anthropic_id):
        model_id = _anthropic_id(m)
        data.append(
            {
                "type": "model",
                "id": model_id,
                "display_name": model_id,
                "created_at": CREATED_AT,
                "max_input_tokens": m.get("contextWindow"),
                "max_tokens": m.get("maxOutputTokens"),
                **lifecycle(m.get("deprecationDate"), bool(m.get("deprecated"))),
            }
        )
    return data


# Anthropic's paging of list endpoints: ``limit`` (1 to 1000, 20 when not given), and one of ``after_id`` (the
# page after that id) or ``before_id`` (the page before it); ``has_more`` says whether more lie that way.
DEFAULT_PAGE = 20
MAX_PAGE = 1000


def anthropic_page(data: list[dict[str, Any]], query: Mapping[str, str]) -> dict[str, Any]:
    """One page of ``data`` as Anthropic's list endpoints answer it; ValueError for a query they refuse."""
    raw = query.get("limit", str(DEFAULT_PAGE))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE:
        raise ValueError(f"limit: must be a whole number from 1 to {MAX_PAGE}")
    limit = int(raw)
    after, before = query.get("after_id"), query.get("before_id")
    if after is not None and before is not None:
        raise ValueError("after_id, before_id: give one of them, not both")
    ids = [m["id"] for m in data]
    for name, cursor in (("after_id", after), ("before_id", before)):
        if cursor is not None and cursor not in ids:
            raise ValueError(f"{name}: no model {cursor[:100]!r} in this list")
    if before is not None:
        end = ids.index(before)
        start = max(0, end - limit)
        page, more = data[start:end], start > 0
    else:
        start = ids.index(after) + 1 if after is not None else 0
        page, more = data[start : start + limit], start + limit < len(data)
    return {
        "data": page,
        "has_more": more,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
    }
