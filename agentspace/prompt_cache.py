"""Automatic prompt caching for the sessions the gateway keeps (WebSocket, ``/api/chat``, each tool-loop step).

A session resends its whole history on every call; the provider can cache that prefix. Anthropic caches
what ends at a ``cache_control`` breakpoint (at most four per request, prefixes shorter than the model's
minimum are not cached) and bills a read at 0.1x the input price, a 5-minute write at 1.25x. The breakpoints
go where the prefix is stable:

- the last tool definition and the end of the system prompt (they change only with the configuration);
- the end of the previous call's last message (the user message, or the tool results, before the newest
  answer): the prefix the previous call wrote, read back by this one whatever the length of the turn;
- the end of the newest message: written now, read by the next call.

``/v1`` requests are the client's own (they do not go through the pipeline): a Messages API body keeps its own
``cache_control``; an OpenAI-shaped one translated for Claude gets these breakpoints when it asks for the cache
OpenAI would give it (``translated_cache_ttl``).
This module also predicts, for the inspector, what the next call will read from and write to the cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

# Anthropic's limit on cache_control breakpoints per request.
MAX_BREAKPOINTS = 4
TTL_SECONDS = {"5m": 300.0, "1h": 3600.0}
# OpenAI's automatic caching: prompts of at least 1,024 tokens, cached in blocks of 128.
AUTOMATIC_MIN_TOKENS = 1024
AUTOMATIC_BLOCK = 128

# The shortest prefix each model caches (Anthropic's documentation); others: 1024 tokens.
_MIN_TOKENS = (
    ("claude-opus-4-5", 4096),
    ("claude-haiku-4-5", 4096),
    ("claude-3-5-haiku", 2048),
    ("claude-3-haiku", 2048),
)


def cache_ttl(config: Any) -> str | None:
    """The TTL to mark prefixes with, or None when ``[chat] prompt_cache = "off"``."""
    chat = config["chat"]
    return None if chat["prompt_cache"] == "off" else str(chat["prompt_cache_ttl"])


def translated_cache_ttl(config: Any, asked: str | None, models: list[str]) -> str | None:
    """The breakpoints' TTL for an OpenAI-shaped ``/v1`` request translated for ``models`` (a model group's
    deployments, or the one model), None for none: only Claude needs them (OpenAI and the others cache on their
    own). ``[v1] prompt_cache``: "requested" (the default) marks what the client asked to cache (``asked``:
    ``prompt_cache_key``, ``cache_control``), "always" every request, "off" none."""
    policy = config["v1"]["prompt_cache"]
    if policy == "off" or not models or not all(anthropic_family(m) for m in models):
        return None
    if policy == "always":
        default = str(config["chat"]["prompt_cache_ttl"])
        return "1h" if "1h" in (asked, default) else default
    return asked


def min_cacheable_tokens(model: str) -> int:
    name = model.split("/", 1)[-1]
    for prefix, tokens in _MIN_TOKENS:
        if name.startswith(prefix):
            return tokens
    return 1024


def _marker(ttl: str) -> dict[str, str]:
    # 5 minutes is the API's default; naming it anyway keeps the request explicit.
    return {"type": "ephemeral", "ttl": ttl}


def _mark_last_block(message: dict[str, Any], ttl: str) -> bool:
    """Mark the message's last block that can be marked; False when it has none, or when that block already
    carries a mark (kept as it is)."""
    content = message.get("content")
    if isinstance(content, str):
        message["content"] = content = [{"type": "text", "text": content}]
    for block in reversed(content or []):
        if block.get("type") not in ("thinking", "redacted_thinking"):  # thinking blocks cannot be marked
            if "cache_control" in block:
                return False
            block["cache_control"] = _marker(ttl)
            return True
    return False


def _marks(params: dict[str, Any]) -> list[dict[str, Any]]:
    """The breakpoints a request already has (a plugin's tool definition may carry its own)."""
    marks = [t["cache_control"] for t in params.get("tools") or () if "cache_control" in t]
    system = params.get("system")
    if isinstance(system, list):
        marks += [b["cache_control"] for b in system if "cache_control" in b]
    for m in params.get("messages") or ():
        if isinstance(m.get("content"), list):
            marks += [b["cache_control"] for b in m["content"] if isinstance(b, dict) and "cache_control" in b]
    return marks


def add_breakpoints(params: dict[str, Any], ttl: str) -> None:
    """Mark a Messages API request's stable prefix (in place), within ``MAX_BREAKPOINTS`` counting the marks
    it already has. When they do not all fit, the messages' marks come first: a prefix that ends in the
    messages covers the tools and the system prompt too."""
    marks = _marks(params)
    budget = MAX_BREAKPOINTS - len(marks)
    if any(not isinstance(m, dict) or m.get("ttl", "5m") != "1h" for m in marks):
        # A plugin's tool marked for 5 minutes (the API's default) comes before every mark added here, and the API
        # refuses a 1-hour mark after a 5-minute one (the longer-lived entry must come first).
        ttl = "5m"
    messages = params.get("messages") or []
    targets = []
    if messages:
        targets.append(len(messages) - 1)
        # The previous call ended with the user message before the newest assistant message.
        last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last_assistant is not None and last_assistant > 0 and messages[last_assistant - 1]["role"] == "user":
            targets.append(last_assistant - 1)
    for index in targets:
        if budget > 0 and _mark_last_block(messages[index], ttl):
            budget -= 1
    system = params.get("system")
    if system and budget > 0:
        if isinstance(system, str):
            params["system"] = [{"type": "text", "text": system, "cache_control": _marker(ttl)}]
            budget -= 1
        elif "cache_control" not in system[-1]:
            system[-1] = {**system[-1], "cache_control": _marker(ttl)}
            budget -= 1
    tools = params.get("tools")
    if tools and budget > 0 and "cache_control" not in tools[-1]:
        tools[-1] = {**tools[-1], "cache_control": _marker(ttl)}


def add_chat_breakpoints(messages: list[dict[str, Any]], ttl: str) -> None:
    """The same breakpoints in the Chat Completions messages litellm takes, for Anthropic-family models behind
    litellm (Bedrock, Vertex AI, OpenRouter): litellm carries ``cache_control`` on content blocks and on tool
    messages to those APIs. Tools come before the system prompt in their cache, so its mark covers them."""
    system = next((m for m in messages if m.get("role") == "system"), None)
    if system is not None and isinstance(system.get("content"), str):
        system["content"] = [{"type": "text", "text": system["content"], "cache_control": _marker(ttl)}]
    if not messages or messages[-1].get("role") == "system":
        return
    targets = [len(messages) - 1]
    last_assistant = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last_assistant and messages[last_assistant - 1].get("role") in ("user", "tool"):
        targets.append(last_assistant - 1)
    for index in targets:
        message = messages[index]
        if message.get("role") == "tool":
            message["cache_control"] = _marker(ttl)
        elif isinstance(message.get("content"), str):
            message["content"] = [{"type": "text", "text": message["content"], "cache_control": _marker(ttl)}]
        elif isinstance(message.get("content"), list) and message["content"]:
            # A message with files is a list of parts (text, image_url, file): its last part ends the prefix.
            last = message["content"][-1]
            if isinstance(last, dict) and "cache_control" not in last:
                message["content"][-1] = {**last, "cache_control": _marker(ttl)}


def anthropic_family(model: str) -> bool:
    """Claude behind another provider's API (litellm): it caches only what is marked."""
    return "claude" in model.lower()


def prefix_key(system: str, tools: list[dict[str, Any]]) -> str:
    """A short fingerprint of the system prompt and tools: the next call reads nothing if they changed."""
    data = json.dumps([system, tools], ensure_ascii=False, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def first_key(role: str, text: str) -> str:
    """A short fingerprint of the first message a call sends: when ``[chat] history_limit``'s window moves, or
    the context-window policy cuts, the next call sends another and reads none of the previous call's cache."""
    return hashlib.sha256(f"{role}\0{text}".encode("utf-8", "surrogatepass")).hexdigest()[:16]


@dataclass(slots=True)
class CachePlan:
    """What the next call will do with the cache, in (calibrated) tokens."""

    total: int
    read: int
    write: int

    @property
    def uncached(self) -> int:
        return max(0, self.total - self.read - self.write)


def plan(
    *,
    total: int,
    model: str,
    ttl: str | None,
    last_call: dict[str, Any] | None,
    key: str,
    age_seconds: float | None,
    min_tokens: int | None = None,
    automatic: bool = False,
    first_key: str | None = None,
) -> CachePlan:
    """The next call's reads and writes: it reads what the previous call cached (same model, system, tools and
    first message: ``first_key``, within the TTL) and writes the rest up to its newest message, if that prefix
    is long enough to be cached.

    ``automatic``: a provider that caches every prompt on its own (OpenAI): nothing is written at a price,
    and the next call reads the previous prompt, in blocks of 128 tokens, for about 5 minutes."""
    if last_call and last_call.get("model", model) != model:
        last_call = None  # a provider keeps a cache per model (lastCall stored before it named one: the same)
    if last_call and first_key is not None and last_call.get("firstKey", first_key) != first_key:
        # Another first message (``[chat] history_limit``'s window moved, a cut): the prefix differs from its start.
        last_call = None
    if automatic:
        if total < AUTOMATIC_MIN_TOKENS or not last_call or last_call.get("prefixKey") != key:
            return CachePlan(total, 0, 0)
        if age_seconds is None or age_seconds >= TTL_SECONDS["5m"]:
            return CachePlan(total, 0, 0)
        previous = min(int(last_call.get("promptTokens") or 0), total)
        return CachePlan(total, previous // AUTOMATIC_BLOCK * AUTOMATIC_BLOCK, 0)
    if ttl is None or total < (min_tokens or min_cacheable_tokens(model)):
        return CachePlan(total, 0, 0)
    read = 0
    if (
        last_call
        and last_call.get("prefixKey") == key
        and age_seconds is not None
        and age_seconds < TTL_SECONDS.get(ttl, 300.0)
    ):
        read = min(int(last_call.get("cachedTokens") or 0), total)
    return CachePlan(total, read, total - read)
