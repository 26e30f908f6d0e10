"""The data types every part of agentspace shares: messages, usage, models, tools, context sections.

Wire and store formats are camelCase JSON (docs/protocol.md); Python code uses these typed objects
and converts at the edges (``to_dict``, ``part_to_dict``/``part_from_dict``).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

# Compact JSON (no spaces, non-ASCII kept) from one encoder: json.dumps with options builds a new encoder per
# call, about 1.5 µs, and the transports encode every delta.
compact_json: Callable[[Any], str] = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def json_bytes(value: Any) -> bytes:
    """``compact_json`` as UTF-8 bytes (a stream's frame). A lone surrogate (an upstream's JSON that cut an emoji
    between its halves) cannot be encoded as UTF-8: it is escaped (``\\ud83d``), as JSON allows and as ``json.dumps``
    writes the whole answers, instead of stopping the stream with no end."""
    text = compact_json(value)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":")).encode()


LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """``text`` with every lone surrogate (``\\ud800``-``\\udfff``) replaced by U+FFFD.

    A JavaScript string cut mid-emoji serialises as a lone surrogate (and an upstream's JSON may cut one the same
    way); it cannot be encoded as UTF-8, so it could be neither stored nor sent. Message text is kept with the
    replacement character instead, the same on every transport, as a UTF-8 decoder would show it."""
    return LONE_SURROGATE.sub("\ufffd", text) if LONE_SURROGATE.search(text) else text


def new_id(prefix: str = "") -> str:
    return prefix + uuid.uuid4().hex


def now_iso() -> str:
    """UTC timestamp with millisecond precision, sortable as a string."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


# --- message parts ------------------------------------------------------------------------------
# A message is a role plus ordered parts. Providers convert parts to their own wire format, so the
# same history can be sent to Anthropic or through litellm.


@dataclass(slots=True)
class TextPart:
    text: str
    type: Literal["text"] = "text"


@dataclass(slots=True)
class ReasoningPart:
    text: str
    # Anthropic signs thinking blocks; they must go back unchanged in the tool loop.
    signature: str | None = None
    redacted_data: str | None = None
    type: Literal["reasoning"] = "reasoning"


@dataclass(slots=True)
class SourcePart:
    url: str
    title: str | None = None
    type: Literal["source"] = "source"


@dataclass(slots=True)
class ToolCallPart:
    tool_call_id: str
    name: str
    input: Any
    type: Literal["tool-call"] = "tool-call"


@dataclass(slots=True)
class ToolResultPart:
    tool_call_id: str
    name: str
    output: Any
    is_error: bool = False
    type: Literal["tool-result"] = "tool-result"


@dataclass(slots=True)
class FilePart:
    """An image or a document (``image/*``, ``application/pdf``): base64 ``data`` or a ``url``. Each provider
    sends it in its API's own block.

    In a session (docs/attachments.md) the part is stored with its ``size`` and ``sha256`` and without its
    data: the bytes are kept once in the blob store and put back in ``data`` when a call sends them."""

    media_type: str
    data: str | None = None
    url: str | None = None
    filename: str | None = None
    size: int | None = None
    sha256: str | None = None
    type: Literal["file"] = "file"

    @property
    def is_image(self) -> bool:
        return self.media_type.startswith("image/")

    def data_url(self) -> str:
        """The file as a URL: its own, or a ``data:`` URL of the base64 data."""
        return self.url or f"data:{self.media_type};base64,{self.data or ''}"


Part = TextPart | ReasoningPart | SourcePart | ToolCallPart | ToolResultPart | FilePart

_PART_KEYS: dict[str, tuple[type, dict[str, str]]] = {
    "text": (TextPart, {"text": "text"}),
    "reasoning": (ReasoningPart, {"text": "text", "signature": "signature", "redacted_data": "redactedData"}),
    "source": (SourcePart, {"url": "url", "title": "title"}),
    "tool-call": (ToolCallPart, {"tool_call_id": "toolCallId", "name": "name", "input": "input"}),
    "tool-result": (
        ToolResultPart,
        {"tool_call_id": "toolCallId", "name": "name", "output": "output", "is_error": "isError"},
    ),
    "file": (
        FilePart,
        {
            "media_type": "mediaType",
            "data": "data",
            "url": "url",
            "filename": "filename",
            "size": "size",
            "sha256": "sha256",
        },
    ),
}


def part_to_dict(part: Part) -> dict[str, Any]:
    _, keys = _PART_KEYS[part.type]
    out: dict[str, Any] = {"type": part.type}
    for attr, key in keys.items():
        value = getattr(part, attr)
        if value is not None:
            out[key] = value
    return out


def part_from_dict(data: dict[str, Any]) -> Part:
    cls, keys = _PART_KEYS[data["type"]]
    return cls(**{attr: data.get(key) for attr, key in keys.items() if key in data})


@dataclass(slots=True)
class ChatMessage:
    """One message of a conversation as providers see it.

    ``role`` is "user" or "assistant"; tool results travel as a "user" message of ToolResultParts,
    which both the Anthropic API and our litellm adapter understand.
    """

    role: Literal["user", "assistant"]
    parts: list[Part]

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.parts if isinstance(p, TextPart))

    @classmethod
    def user(cls, text: str) -> ChatMessage:
        return cls("user", [TextPart(text)])


# --- usage and cost ------------------------------------------------------------------------------

# The figures a usage record may name in ``estimatedFields`` (counted here, not reported by the upstream), in the
# one order it lists them (docs/accounting.md, "What estimated means").
ESTIMABLE_FIELDS = ("inputTokens", "outputTokens", "serverToolUse")
_ESTIMABLE_RANK = {name: n for n, name in enumerate(ESTIMABLE_FIELDS)}


def in_estimated_order(fields: Iterable[str]) -> tuple[str, ...]:
    """``fields`` once each, in ``ESTIMABLE_FIELDS``' order (a name it lacks last, as given)."""
    return tuple(sorted(dict.fromkeys(fields), key=lambda name: _ESTIMABLE_RANK.get(name, len(_ESTIMABLE_RANK))))


# The largest token count an upstream's report is taken at: far above any call, and small enough that a cost
# priced from it stays a finite float and a PostgreSQL bigint holds the sums.
MAX_REPORTED_COUNT = 2**31 - 1


def reported_count(value: Any) -> int | None:
    """A token count as an upstream reported it, or None when it is not one (negative, fractional, a bool, a
    string, past ``MAX_REPORTED_COUNT``): such a figure is not taken, as if not reported, so that it can neither
    refund a budget, price a call at infinity nor write a record the store cannot read back."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_REPORTED_COUNT:
        return value
    return None


@dataclass(slots=True)
class TokenUsage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    # True when some numbers were counted locally because the provider did not report them;
    # ``estimated_fields`` names which (wire names, e.g. "outputTokens").
    estimated: bool = False
    estimated_fields: tuple[str, ...] = ()
    # Of cache_write_tokens, those written for an hour (``ttl: "1h"``), priced higher than 5-minute writes.
    cache_write_1h_tokens: int = 0
    # Server tools the upstream ran and bills per use (Anthropic's ``server_tool_use``): {"web_search": 3}.
    server_tool_use: dict[str, int] | None = None
    # The service tier the upstream says served the call (OpenAI's ``service_tier``: "priority", "flex"), priced
    # at that tier's rates (``ModelInfo.service_tiers``); None or another tier: the standard rates.
    service_tier: str | None = None
    # Where the upstream says the call ran (Anthropic's ``inference_geo``: "us", "global"): a geography the model
    # charges more in (``ModelInfo.geo_multipliers``) multiplies its token prices.
    inference_geo: str | None = None

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens + self.cache_read_tokens + self.cache_write_tokens

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cache_read_tokens=self.cache_read_tokens + other.cache_read_tokens,
            cache_write_tokens=self.cache_write_tokens + other.cache_write_tokens,
            reasoning_tokens=self.reasoning_tokens + other.reasoning_tokens,
            estimated=self.estimated or other.estimated,
            estimated_fields=in_estimated_order(self.estimated_fields + other.estimated_fields),
            cache_write_1h_tokens=self.cache_write_1h_tokens + other.cache_write_1h_tokens,
            server_tool_use=_merge_counts(self.server_tool_use, other.server_tool_use),
            service_tier=other.service_tier or self.service_tier,
            inference_geo=other.inference_geo or self.inference_geo,
        )


def _merge_counts(a: dict[str, int] | None, b: dict[str, int] | None) -> dict[str, int] | None:
    if not a or not b:
        return dict(a or b or {}) or None
    return {k: a.get(k, 0) + b.get(k, 0) for k in {**a, **b}}


@dataclass(slots=True)
class Cost:
    input_cost: float = 0.0  # input + cache read + cache write
    output_cost: float = 0.0
    # False when a model without a known price was costed at the configured fallback price (an estimate).
    price_known: bool = True
    server_tool_cost: float = 0.0  # fees per use of server tools (web search), on top of the tokens

    @property
    def total_cost(self) -> float:
        return self.input_cost + self.output_cost + self.server_tool_cost

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            input_cost=self.input_cost + other.input_cost,
            output_cost=self.output_cost + other.output_cost,
            price_known=self.price_known and other.price_known,
            server_tool_cost=self.server_tool_cost + other.server_tool_cost,
        )


def usage_to_wire(usage: TokenUsage, cost: Cost) -> dict[str, Any]:
    """The ``usage`` object of ``chat.stream.end`` and of the SSE ``finish`` metadata."""
    return {
        "inputTokens": usage.input_tokens,
        "outputTokens": usage.output_tokens,
        "totalTokens": usage.total_tokens,
        "cacheReadTokens": usage.cache_read_tokens,
        "cacheWriteTokens": usage.cache_write_tokens,
        "reasoningTokens": usage.reasoning_tokens,
        "inputCost": round(cost.input_cost, 10),
        "outputCost": round(cost.output_cost, 10),
        "totalCost": round(cost.total_cost, 10),
        "priceKnown": cost.price_known,
        **({"serverToolCost": round(cost.server_tool_cost, 10)} if cost.server_tool_cost else {}),
    }


@dataclass(slots=True)
class UsageRecord:
    """Exactly one per provider call (docs/accounting.md). Stored and sent to every usage sink."""

    id: str
    timestamp: str
    model: str
    provider: str
    session_id: str | None
    client: str | None
    usage: TokenUsage
    cost: Cost
    latency_ms: float
    finish_reason: str
    # False when the model had no known price and the configured fallback was used.
    price_known: bool = True
    # The error code when the call ended in an error (refused, failed, cut mid-stream; "ABORTED" when it was stopped
    # before its end: finish reason "aborted"), else None.
    error: str | None = None
    # False when the upstream never answered (no key, refused, 5xx after retries): the record counts
    # under ``errorCount`` only, never as a request, and carries no tokens.
    answered: bool = True
    # Upstream attempts this call took (retries after 429/5xx included).
    attempts: int = 1
    # Where the call came in: "ws", "http", "anthropic" (/v1/messages), "openai" (/v1/chat/completions).
    endpoint: str | None = None
    # Milliseconds from the call's start to its first streamed output; None when nothing was streamed.
    ttft_ms: float | None = None
    # Why the gateway made the call when it was not the client's own request: "compact" (a session's summary).
    purpose: str | None = None
    # Posted after a restart from what the ledger had noted of a call its process did not finish
    # (docs/accounting.md): the reported usage kept, the rest estimated (``estimatedFields``).
    recovered: bool = False
    # The deployment of a model group that served the call (``group/name``, agentspace/routing.py).
    deployment: str | None = None

    def to_dict(self) -> dict[str, Any]:
        u = self.usage
        return {
            "id": self.id,
            "timestamp": self.timestamp,
            "model": self.model,
            "provider": self.provider,
            "sessionId": self.session_id,
            "client": self.client,
            "inputTokens": u.input_tokens,
            "outputTokens": u.output_tokens,
            "cacheReadTokens": u.cache_read_tokens,
            "cacheWriteTokens": u.cache_write_tokens,
            "reasoningTokens": u.reasoning_tokens,
            "totalTokens": u.total_tokens,
            "inputCost": self.cost.input_cost,
            "outputCost": self.cost.output_cost,
            "totalCost": self.cost.total_cost,
            "serverToolUse": dict(u.server_tool_use or {}),
            "serverToolCost": self.cost.server_tool_cost,
            "latencyMs": round(self.latency_ms, 3),
            "finishReason": self.finish_reason,
            "estimated": u.estimated,
            "estimatedFields": list(u.estimated_fields),
            "priceKnown": self.price_known,
            "error": self.error,
            "answered": self.answered,
            "attempts": self.attempts,
            "endpoint": self.endpoint,
            "ttftMs": None if self.ttft_ms is None else round(self.ttft_ms, 3),
            "purpose": self.purpose,
            "recovered": self.recovered,
            "deployment": self.deployment,
        }


# --- models -------------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class PriceTier:
    """Long-context prices: once a call's input (input and cache tokens) exceeds ``above_input_tokens``, the
    whole call is priced at these (as Anthropic and Google bill prompts above 200k tokens)."""

    above_input_tokens: int
    input_per_mtok: float
    output_per_mtok: float
    cache_read_per_mtok: float | None = None  # None: the tier's input price
    cache_write_per_mtok: float | None = None


@dataclass(slots=True)
class ModelInfo:
    """Price and capabilities of one ``provider/model`` id: the litellm cost map, then what the provider
    says of its models (its ``model_info`` method), then the config's ``[pricing]`` (docs/plugins.md)."""

    id: str
    provider: str
    input_per_mtok: float
    output_per_mtok: float
    cache_read_per_mtok: float
    cache_write_per_mtok: float
    context_window: int | None = None
    max_output_tokens: int | None = None
    supports_reasoning: bool = False
    adaptive_thinking_only: bool = False
    supports_tools: bool = False
    deprecation_date: str | None = None
    price_known: bool = True
    supports_vision: bool = False
    supports_pdf_input: bool = False
    long_context: tuple[PriceTier, ...] = ()  # ascending ``above_input_tokens``
    # The price of a one-hour cache write (None: as a 5-minute one); the shortest prefix the model caches.
    cache_write_1h_per_mtok: float | None = None
    prompt_cache_min_tokens: int | None = None
    # Dollars per use of a server tool ("web_search", "web_fetch", "code_execution") set by [pricing] or the
    # provider; a tool not here is priced by calls.server_tool_price's defaults.
    server_tool_per_use: dict[str, float] = field(default_factory=dict)
    # Prices of the service tiers an upstream may serve a call at (OpenAI's "priority" and "flex", from the cost
    # map): tier -> (input, output, cache read) per million tokens.
    service_tiers: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    # What running the call in a geography costs on top (Anthropic's US-only inference: {"us": 1.1}, the cost
    # map's ``provider_specific_entry``): every token price times it.
    geo_multipliers: dict[str, float] = field(default_factory=dict)

    def geo_multiplier(self, geo: str | None) -> float:
        return self.geo_multipliers.get((geo or "").lower(), 1.0)

    def tier(self, input_tokens: int) -> PriceTier | None:
        """The long-context tier a call with ``input_tokens`` (input and cache tokens) is priced at, if any."""
        chosen = None
        for tier in self.long_context:
            if input_tokens > tier.above_input_tokens:
                chosen = tier
        return chosen

    def cost(self, usage: TokenUsage) -> Cost:
        m = 1_000_000
        prices = (self.input_per_mtok, self.output_per_mtok, self.cache_read_per_mtok, self.cache_write_per_mtok)
        tier = self.tier(usage.input_tokens + usage.cache_read_tokens + usage.cache_write_tokens)
        if tier is not None:
            read = tier.cache_read_per_mtok if tier.cache_read_per_mtok is not None else tier.input_per_mtok
            write = tier.cache_write_per_mtok if tier.cache_write_per_mtok is not None else tier.input_per_mtok
            prices = (tier.input_per_mtok, tier.output_per_mtok, read, write)
        served = self.service_tiers.get(usage.service_tier or "")
        if served is not None:  # the tier the upstream served the call at (OpenAI bills no cache writes)
            prices = (served[0], served[1], served[2], served[0])
        input_price, output_price, read_price, write_price = prices
        hour = min(usage.cache_write_1h_tokens, usage.cache_write_tokens)
        hour_price = write_price if self.cache_write_1h_per_mtok is None else self.cache_write_1h_per_mtok
        geo = self.geo_multiplier(usage.inference_geo)
        return Cost(
            input_cost=(
                usage.input_tokens * input_price
                + usage.cache_read_tokens * read_price
                + (usage.cache_write_tokens - hour) * write_price
                + hour * hour_price
            )
            * geo
            / m,
            output_cost=usage.output_tokens * output_price * geo / m,
            price_known=self.price_known,
        )


# --- tools --------------------------------------------------------------------------------------

ToolHandler = Callable[[dict[str, Any]], Awaitable[Any]]


@dataclass(slots=True)
class Tool:
    """A tool the model may call. Registered by plugins through ``register_tools``."""

    name: str
    description: str
    input_schema: dict[str, Any]
    handler: ToolHandler
    # A /v1 client's strict flag (OpenAI's function.strict, Anthropic's strict tool use): the model's
    # arguments then follow the schema exactly. None: not said, sent as the provider's default.
    strict: bool | None = None

    def definition(self) -> dict[str, Any]:
        """What is sent to the model (and measured as the ``tools`` section)."""
        definition: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "input_schema": self.input_schema,
        }
        if self.strict:  # (false is the Messages API's default: not sent, as the client may not have)
            definition["strict"] = True
        return definition


# --- context sections ---------------------------------------------------------------------------


@dataclass(slots=True)
class ContextRequest:
    """What a context section builder may look at."""

    session_id: str | None
    model: str
    config: Any  # agentspace.config.Config; Any to keep this module import-light
    user_message: str | None = None


class ContextSectionBuilder(Protocol):
    """A named piece of the system prompt. ``build`` returns its text ('' leaves it out)."""

    name: str

    def build(self, request: ContextRequest) -> str | Awaitable[str]: ...


@dataclass(slots=True)
class ContextSection:
    """A function-backed ContextSectionBuilder, the easy way for plugins to add a section."""

    name: str
    build: Callable[[ContextRequest], str | Awaitable[str]]
