"""``agentspace inspect``: what the next call of a session would send, section by section."""

from __future__ import annotations

import json
from typing import Any

import click

from .common import CliState, config_options, count, money, new_id, pass_state, printable, table


def _format(result: dict[str, Any]) -> str:
    rows = [
        (
            s.get("name"),
            count(s.get("byteCount")),
            count(s.get("tokenEstimate")),
            money(float(s.get("costEstimate") or 0.0)),
            s.get("cache", ""),
        )
        for s in result.get("sections", [])
    ]
    totals = result.get("totals") or {}
    rows.append(
        (
            "TOTAL",
            count(totals.get("byteCount")),
            count(totals.get("tokenEstimate")),
            money(float(totals.get("costEstimate") or 0.0)),
            "",
        )
    )
    head = f"Session {printable(result.get('sessionId'))} · {printable(result.get('model'))} · context of the next call\n\n"
    out = head + table(("section", "bytes", "tokens", "input cost", "prompt cache"), rows, right=(1, 2, 3))
    if "costWithCache" in totals:
        out += (
            f"\n\nPrompt cache {totals.get('promptCache')}: {count(totals.get('cacheReadTokens'))} tokens read, "
            f"{count(totals.get('cacheWriteTokens'))} written, {count(totals.get('uncachedTokens'))} uncached."
            # Not the TOTAL row's figures: the estimate scaled by what the provider reported for the last call.
            f"\nExpected input cost of {count(totals.get('calibratedTokens'))} tokens (the estimate scaled by the "
            f"last call's reported input): {money(float(totals['costWithCache']))} with the cache, "
            f"{money(float(totals.get('costWithoutCache') or 0.0))} without."
        )
    if totals.get("overWindow"):
        out += (
            f"\nPast the model's input window ({count(totals.get('inputWindow'))} tokens): the next turn runs "
            "[chat] context_policy before its call."
        )
    files = [f for s in result.get("sections", []) if s.get("name") == "attachments" for f in s.get("files") or ()]
    if files:  # images by (width x height) / 750 tokens, PDFs by pages (docs/attachments.md)
        out += "\n\nAttachments:\n" + "\n".join(
            f"  {printable(f.get('name') or '(unnamed)')} {printable(f.get('mediaType'))}, {count(f.get('byteCount'))} bytes"
            + (f", {count(f.get('pages'))} pages" if f.get("pages") else "")
            + f": {count(f.get('tokenEstimate'))} tokens"
            for f in files
        )
    return out


async def _inspect(url: str, token: str, session_id: str, model: str | None) -> dict[str, Any]:
    from .client import GatewayConnection

    frame: dict[str, Any] = {"type": "context.inspect", "id": new_id(), "sessionId": session_id}
    if model:
        frame["model"] = model
    async with GatewayConnection(url, token) as gateway:
        return await gateway.request(frame)


@click.command()
@config_options
@click.argument("session_id", metavar="SESSION")
@click.option("--model", "-m", help="Measure for this model instead of the session's.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the context.inspection message).")
@click.option("--url", envvar="AGENTSPACE_URL", help="Gateway WebSocket URL (default: from [server] of the config).")
@click.option("--token", envvar="AGENTSPACE_TOKEN", help="Gateway token (default: the data directory's).")
@pass_state
def inspect(
    state: CliState, session_id: str, model: str | None, as_json: bool, url: str | None, token: str | None
) -> None:
    """Bytes, tokens and cost of each context section of SESSION (asks the running gateway)."""
    import asyncio

    from .client import default_url, resolve_token

    result = asyncio.run(_inspect(url or default_url(state), resolve_token(state, token), session_id, model))
    if as_json:
        click.echo(json.dumps({k: v for k, v in result.items() if k not in ("type", "requestId")}, indent=2))
    else:
        click.echo(_format(result))
