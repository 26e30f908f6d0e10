"""``agentspace ask "..."``: one question to a running gateway, the answer streamed to stdout.

Like ``llm "..."``: text piped on stdin is part of the prompt (after the argument, when both are given),
``--model`` and ``--system`` choose the model and the system prompt, and the exit code is 1 when the call
failed. It goes through the gateway's OpenAI-compatible ``/v1/chat/completions`` (streamed): a one-shot
question needs no session, and that API takes a system prompt; the call is recorded like any other
(``agentspace usage``, endpoint ``openai``). The token line goes to stderr, so ``> answer.md`` keeps only
the answer.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from .common import CliState, config_options, pass_state, printable, wait_note

TIMEOUT_SECONDS = 600.0  # a long answer, not a stuck one


def http_base(ws_url: str) -> str:
    """``ws://host:port/gateway`` -> ``http://host:port`` (a URL given as http(s) is kept, minus a path)."""
    from urllib.parse import urlsplit

    parts = urlsplit(ws_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme or "http")
    path = parts.path.removesuffix("/gateway").rstrip("/")
    return f"{scheme}://{parts.netloc}{path}"


def _prompt(words: tuple[str, ...]) -> str:
    text = " ".join(words).strip()
    if not sys.stdin.isatty():
        piped = sys.stdin.read().strip()
        if piped:
            text = f"{text}\n\n{piped}" if text else piped
    return text


async def _gateway_default(http: Any, base: str, headers: dict[str, str]) -> str | None:
    """The model the gateway marks as its default (``GET /api/models``), or None."""
    async with http.get(f"{base}/api/models", headers=headers) as response:
        if response.status != 200:
            raise click.ClickException(_failure(f"{base}/api/models", response.status, await response.text()))
        models = (await response.json()).get("models") or []
    return next((str(m["id"]) for m in models if m.get("default")), None)


async def _ask(base: str, token: str, body: dict[str, Any], fallback_model: str) -> int:
    import aiohttp

    from .client import untrusted

    url = f"{base}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {token}"}
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_SECONDS)
    wrote = False
    terminal = sys.stdout.isatty()
    async with aiohttp.ClientSession(timeout=timeout) as http:
        try:
            if not body.get("model"):  # the gateway's default, as `chat` gets it
                body["model"] = await _gateway_default(http, base, headers) or fallback_model
            async with http.post(url, json=body, headers=headers) as response:
                if response.status != 200:
                    wait = response.headers.get("Retry-After")
                    raise click.ClickException(_failure(url, response.status, await response.text()) + wait_note(wait))
                usage: dict[str, Any] = {}
                finish = None
                async for raw in response.content:
                    line = raw.decode("utf-8", "replace").strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:  # failed after the stream began
                        if wrote:
                            click.echo()
                        raise click.ClickException(str(chunk["error"].get("message") or chunk["error"]))
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        delta = (choice.get("delta") or {}).get("content")
                        if delta:
                            # On a terminal, escapes in the answer are shown, not obeyed (as `chat` does);
                            # into a file or a pipe, the text as it is.
                            click.echo(printable(delta, lines=True) if terminal else delta, nl=False)
                            wrote = True
                        finish = choice.get("finish_reason") or finish
        except aiohttp.ClientConnectorCertificateError as e:
            raise click.ClickException(untrusted(base, e)) from None
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise click.ClickException(
                f"Cannot reach the gateway at {base} ({e or type(e).__name__}). Start it with: agentspace serve"
            ) from None
    if wrote:
        click.echo()
    note = f" · {finish}" if finish and finish != "stop" else ""
    click.secho(
        f"[{usage.get('prompt_tokens', 0)} in / {usage.get('completion_tokens', 0)} out tokens{note}]",
        err=True,
        dim=True,
    )
    return 0


def _failure(url: str, status: int, text: str) -> str:
    try:
        message = str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = text.strip()[:500] or f"HTTP {status}"
    if status == 401:
        return (
            f"The gateway refused the token ({message}). Use the token the server accepts "
            "(agentspace token), or pass --token / AGENTSPACE_TOKEN."
        )
    return f"HTTP {status} from {url}: {message}"


@click.command()
@config_options
@click.argument("prompt", nargs=-1)
@click.option("--model", "-m", help="Model id, e.g. anthropic/claude-sonnet-4-6 (default: the gateway's).")
@click.option("--system", "-s", "system", help="System prompt for this question.")
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    help="The most tokens the answer may use (default: the model's own limit, which a budget reserves).",
)
@click.option("--url", envvar="AGENTSPACE_URL", help="Gateway URL, ws:// or http:// (default: where `serve` listens).")
@click.option("--token", envvar="AGENTSPACE_TOKEN", help="Gateway token or client key (default: the server's).")
@pass_state
def ask(
    state: CliState,
    prompt: tuple[str, ...],
    model: str | None,
    system: str | None,
    max_tokens: int | None,
    url: str | None,
    token: str | None,
) -> None:
    """Ask one question and stream the answer to stdout (stdin, when piped, is added to the prompt)."""
    import asyncio

    from .client import default_url, resolve_token

    text = _prompt(prompt)
    if not text:
        raise click.UsageError('Nothing to ask: give a prompt (agentspace ask "...") or pipe text in.')
    messages: list[dict[str, str]] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": text})
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if max_tokens is not None:  # what a refusal of a client's budget advises lowering
        body["max_tokens"] = max_tokens
    base, key = http_base(url or default_url(state)), resolve_token(state, token)
    code = asyncio.run(_ask(base, key, body, str(state.config()["models"]["default"])))
    if code:
        raise SystemExit(code)
