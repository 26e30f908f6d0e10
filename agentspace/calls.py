"""Every provider call's one lifecycle (docs/accounting.md), whatever the endpoint.

A ``ProviderCall`` is the only thing that admits, reserves, writes ahead and records a call to an upstream:
the pipeline's steps (WebSocket and ``/api/chat``), the translated ``/v1`` calls (``direct_call.DirectCall``),
the Anthropic relay (``providers/anthropic_relay.py``) and ``count_tokens`` (admission only)::

    call = ProviderCall(gw, model, session_id=..., client=caller, endpoint="openai")
    await call.admit(lambda: request_ceiling(request)) # ApiError: refused; nothing was sent, nothing is held
    ... the request goes upstream; call.begin() when it leaves
    call.note(usage)                                  # usage the upstream reported mid-stream (message_start)
    call.relayed(text)                                # output relayed so far (for a recovery's estimate)
    await call.record(usage, "stop")                  # the call's one usage record, durable once awaited
    await call.release()                              # in a finally: a call that made no record gives back
                                                      # its reservation and closes its ledger entry

The accounting rules live here only: a call the upstream never answered bills nothing; usage the upstream
reported is kept as reported and ``estimated_fields`` names what was counted locally; the reservation is
the most the request as sent upstream can cost (``Ceiling``), priced at the model's rates.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from . import attachments, tokens
from .attachments import IMAGE_TOKENS, PDF_PAGE_TOKENS
from .errors import ApiError, StorageError
from .observe import CallInfo, notify
from .pricing import accepts_adaptive_thinking, cost_map
from .prompt_cache import anthropic_family
from .providers.base import ProviderRequest, upstream_output_tokens
from .tokens import count_ceiling_tokens, count_tokens
from .types import (
    ChatMessage,
    Cost,
    FilePart,
    ModelInfo,
    PriceTier,
    ReasoningPart,
    TextPart,
    TokenUsage,
    ToolCallPart,
    ToolResultPart,
    UsageRecord,
    in_estimated_order,
    new_id,
    now_iso,
)

if TYPE_CHECKING:
    from .clients import Client
    from .limits import Reservation
    from .registry import Registry
    from .storage.shapes import LedgerEntry

log = logging.getLogger(__name__)

# How often the output relayed is noted in the ledger while a call streams (written with the ledger's next batch).
RELAYED_NOTE_SECONDS = 0.5
# The usage fields a record may have counted locally, in UsageRecord.to_dict's names (``in_estimated_order``).
ALL_FIELDS = ("inputTokens", "outputTokens")

# What an uncountable input may cost when neither the config nor the model says (a common context window).
LONG_CONTEXT_TOKENS = 200_000
# What a request with tools is billed beyond their definitions: the system prompt the provider adds for tool use
# (Anthropic's figure, the largest: 346 tokens), and the definitions of Anthropic's own tools, which the request
# names in a few bytes (its tool-use docs, "Pricing"). By type prefix.
TOOL_PROMPT_TOKENS = 346
ANTHROPIC_TOOL_TOKENS = (("bash_", 245), ("text_editor_", 700), ("computer_", 735 + 499))
# The models served by Anthropic's own provider (providers/anthropic.py), which sends thinking in the budget form
# on top of max_tokens; litellm's provider sends it so to Claude behind other APIs (``anthropic_family``).
ANTHROPIC_PREFIX = "anthropic/"
# Anthropic's web search: $10 per 1,000 searches, when the cost map does not say.
WEB_SEARCH_USD = 0.01


# --- reservations -------------------------------------------------------------------------------


@dataclass
class Ceiling:
    """The most a request as sent upstream can use: what its reservation prices."""

    input_tokens: int
    # The output tokens asked for as ``max_tokens`` (what litellm's providers are sent: a thinking budget or an
    # effort goes within it, litellm capping a budget below it).
    output_tokens: int
    # Server tools the request lets the model use, and how often at most (``max_uses`` or the configured
    # ceiling): {"web_search": 5}.
    server_tool_uses: dict[str, int] = field(default_factory=dict)
    # Documents behind a URL, which the upstream fetches and bills and nothing here can count: each is priced
    # at ``uncountable_tokens`` of input.
    uncountable: int = 0
    # The TTL ("5m", "1h") of the prompt-cache breakpoints the request carries: its input may be billed as cache
    # writes, dearer than plain input (1.25 and 2 times at Anthropic), so it is priced at the dearer rate.
    cache_write: str | None = None
    # Images, counted at ``IMAGE_TOKENS`` each in ``input_tokens``: a model that bills images at more
    # (``attachments.image_ceiling``) is reserved the difference.
    images: int = 0
    # The output tokens Claude is sent (Anthropic's provider, or litellm's for Claude behind another API), the budget
    # form of thinking on top of ``max_tokens`` (``providers.base.budget_max_tokens``); None: ``output_tokens``.
    anthropic_output_tokens: int | None = None
    # The request carries a /v1 client's ``reasoning_effort`` (litellm translates it itself: ``adaptive_thinking_sent``).
    reasoning_effort: bool = False
    # The service tier the request asks for (OpenAI's ``service_tier``): "priority" is billed at dearer rates.
    service_tier: str | None = None
    # The request lets the provider search the web with no bound on the searches (OpenAI's
    # ``web_search_options``): reserved at ``[limits] server_tool_max_uses`` of them.
    web_search: bool = False
    # Where the request asks to run (Anthropic's ``inference_geo``): a geography that costs more is reserved so.
    inference_geo: str | None = None


def request_input_tokens(request: ProviderRequest, ceiling: bool = False) -> int:
    """A local count of a request's input: system, messages and tool definitions; with ``ceiling`` (a
    reservation) the most they may be billed as (``tokens.count_ceiling_tokens``)."""
    pieces = [request.system]
    files = 0
    for message in request.messages:
        for part in message.parts:
            if isinstance(part, (TextPart, ReasoningPart)):
                pieces.append(part.text)
            elif isinstance(part, ToolCallPart):
                pieces.append(json.dumps(part.input, default=str))
            elif isinstance(part, ToolResultPart):
                output = part.output
                pieces.append(output if isinstance(output, str) else json.dumps(output, default=str))
            elif isinstance(part, FilePart):  # images and PDFs by Anthropic's formulas (agentspace/attachments.py)
                files += attachments.tokens(part, ceiling=True)
    if request.tools:
        pieces.append(json.dumps([t.definition() for t in request.tools]))
    # Piece by piece: a conversation sent again with each call (as agents do) has its earlier pieces' counts
    # remembered (``tokens.count_tokens``).
    count = count_ceiling_tokens if ceiling else count_tokens
    return sum(count(p) for p in pieces if p) + files


def output_limit(request: ProviderRequest) -> int:
    """The output limit of a request that sets none: the model's own, as OpenAI's API gives it (and as Codex
    expects: the gateway's ``[chat] max_tokens`` would cut a long answer or its reasoning short), within the
    context window the input leaves (an upstream refuses input plus limit past the window); never below the
    gateway's default, already in ``request.max_tokens``."""
    info = request.model_info
    default = request.max_tokens
    if not info.max_output_tokens:
        return default
    limit = info.max_output_tokens
    if info.context_window and info.context_window - _most_input_tokens(request) < limit:
        # Maybe tight: counted (tokenizing a long input costs milliseconds; most inputs never get here).
        used = request_input_tokens(request, ceiling=True) + (TOOL_PROMPT_TOKENS if request.tools else 0)
        limit = min(limit, info.context_window - used)
    return max(limit, min(default, info.max_output_tokens))


def _most_input_tokens(request: ProviderRequest) -> int:
    """A bound on the input's tokens without tokenizing it: a token is at least one UTF-8 byte, a character
    at most four; files (counted by their own formulas) make the bound unknown (the window's size)."""
    chars = len(request.system)
    for message in request.messages:
        for part in message.parts:
            if isinstance(part, (TextPart, ReasoningPart)):
                chars += len(part.text)
            elif isinstance(part, ToolResultPart) and isinstance(part.output, str):
                chars += len(part.output)
            elif isinstance(part, ToolCallPart):
                chars += len(json.dumps(part.input, default=str))
            else:
                return request.model_info.context_window or 0
    if request.tools:
        chars += len(json.dumps([t.definition() for t in request.tools]))
    return 4 * chars + (TOOL_PROMPT_TOKENS if request.tools else 0)


def request_ceiling(request: ProviderRequest, input_tokens: int | None = None) -> Ceiling:
    """A ProviderRequest's ceiling: its input counted (or ``input_tokens`` when the caller counted it), its
    documents behind a URL, and the output tokens the provider will ask for, the thinking budget included."""
    tokens = request_input_tokens(request, ceiling=True) if input_tokens is None else input_tokens
    if request.tools:
        tokens += TOOL_PROMPT_TOKENS
    files = [part for message in request.messages for part in message.parts if isinstance(part, FilePart)]
    behind_urls = sum(1 for part in files if part.url and not part.data and not part.is_image)
    # The provider places breakpoints at ``cache_ttl`` (agentspace/prompt_cache.py) where its model needs them.
    return Ceiling(
        tokens,
        request.max_tokens,
        uncountable=behind_urls,
        cache_write=request.cache_ttl,
        images=sum(1 for part in files if part.is_image),
        anthropic_output_tokens=upstream_output_tokens(request),
        reasoning_effort="reasoning_effort" in request.params,
        service_tier=tier if isinstance(tier := request.params.get("service_tier"), str) else None,
        web_search="web_search_options" in request.params,
    )


def uncountable_tokens(gw: Registry, model: str) -> int:
    """What an input that cannot be counted here (a document or image behind a URL) may cost at most:
    ``[limits] uncountable_input_tokens``, else the model's whole context window."""
    configured = gw.config["limits"]["uncountable_input_tokens"]
    if configured is not None:
        return int(configured)
    return int(gw.model_info(model).context_window or LONG_CONTEXT_TOKENS)


def messages_body_ceiling(gw: Registry, model: str, body: dict[str, Any]) -> Ceiling:
    """The ceiling of a Messages API body as it goes upstream (the pass-through): text counted, images and
    PDFs by Anthropic's formulas, URL sources at the configured ceiling, ``max_tokens`` as sent (the thinking
    budget is part of it), server tools at ``max_uses``."""
    tally = _BlockTally()
    tally.cache(body.get("cache_control"))  # automatic caching: one breakpoint for the whole request
    tally.block(body.get("system") or "")
    for message in body.get("messages") or ():
        if isinstance(message, dict):
            tally.block(message.get("content") or "")
    tools = body.get("tools")
    if tools:
        tally.texts.append(json.dumps(tools, default=str))
        tally.extra += TOOL_PROMPT_TOKENS + sum(_anthropic_tool_tokens(t) for t in tools if isinstance(t, dict))
        for tool in tools if isinstance(tools, list) else ():
            if isinstance(tool, dict):
                tally.cache(tool.get("cache_control"))
    input_tokens = sum(count_ceiling_tokens(t) for t in tally.texts if t) + tally.extra
    if tally.uncountable:
        input_tokens += tally.uncountable * uncountable_tokens(gw, model)
    input_tokens += fetched_tokens(gw, model, tools)
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        max_tokens = int(gw.config["chat"]["max_tokens"])
    geo = body.get("inference_geo")
    return Ceiling(
        input_tokens,
        max_tokens,
        server_tool_uses(gw, tools),
        cache_write=tally.cache_write,
        images=tally.images,
        inference_geo=geo if isinstance(geo, str) else None,
    )


def fetched_tokens(gw: Registry, model: str, tools: Any) -> int:
    """The input a request's web fetches and web searches may add: what the upstream fetches, and the results
    of its searches, are billed as input tokens -- at most ``max_content_tokens`` a fetch, else (a search has
    no such bound) the ceiling of an uncountable input -- and all of it at most that ceiling, the context the
    pages must fit in."""
    if not isinstance(tools, list):
        return 0
    ceiling = uncountable_tokens(gw, model)
    total = 0
    for tool in tools:
        kind = tool.get("type") if isinstance(tool, dict) else None
        if not (isinstance(kind, str) and kind.startswith(("web_fetch_", "web_search_"))):
            continue
        uses = sum(server_tool_uses(gw, [tool]).values())
        most = tool.get("max_content_tokens") if kind.startswith("web_fetch_") else None
        each = most if isinstance(most, int) and not isinstance(most, bool) and most > 0 else ceiling
        total += uses * each
    return min(total, ceiling)


def _anthropic_tool_tokens(tool: dict[str, Any]) -> int:
    kind = tool.get("type")
    if isinstance(kind, str):
        for prefix, tokens in ANTHROPIC_TOOL_TOKENS:
            if kind.startswith(prefix):
                return tokens
    return 0


class _BlockTally:
    """What Messages API content costs: its texts (to count), the tokens of images and PDFs, and how many
    sources are behind a URL or a file id."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.extra = 0
        self.uncountable = 0
        self.images = 0
        self.cache_write: str | None = None  # the longest TTL of the ``cache_control`` breakpoints seen

    def cache(self, control: Any) -> None:
        if isinstance(control, dict) and self.cache_write != "1h":
            self.cache_write = "1h" if control.get("ttl") == "1h" else "5m"

    def block(self, value: Any) -> None:
        if isinstance(value, str):
            self.texts.append(value)
            return
        if isinstance(value, list):
            for item in value:
                self.block(item)
            return
        if not isinstance(value, dict):
            self.texts.append(str(value))
            return
        self.cache(value.get("cache_control"))
        kind = value.get("type")
        source = value.get("source")
        if kind == "image":
            self.extra += IMAGE_TOKENS
            self.images += 1  # a model that reads images at more is reserved the difference (``ceiling_cost``)
        elif kind == "document" and isinstance(source, dict):
            self._document(source)
        elif kind in ("text", "thinking"):
            self.texts.append(str(value.get("text") or value.get("thinking") or ""))
        elif kind == "tool_result":
            self.block(value.get("content") or "")
        else:  # tool_use, server tool blocks and the like: their JSON
            self.texts.append(json.dumps(value, default=str))

    def _document(self, source: dict[str, Any]) -> None:
        source_type = source.get("type")
        if source_type == "text":
            self.texts.append(str(source.get("data") or ""))
        elif source_type == "content":
            self.block(source.get("content"))
        elif source_type == "base64":
            self.extra += PDF_PAGE_TOKENS * _pdf_pages(str(source.get("data") or ""))
        else:  # a URL or a file id: not here to count
            self.uncountable += 1


def _pdf_pages(data: str) -> int:
    import base64
    import binascii

    try:
        raw = base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError):
        return 1
    return attachments.pdf_pages(raw)


def server_tool_uses(gw: Registry, tools: Any) -> dict[str, int]:
    """The server tools of a Messages request (``web_search_*``, ``web_fetch_*``, ``code_execution_*``) and their
    most uses: ``max_uses``, else ``[limits] server_tool_max_uses``."""
    uses: dict[str, int] = {}
    if not isinstance(tools, list):
        return uses
    ceiling = int(gw.config["limits"]["server_tool_max_uses"])
    for tool in tools:
        kind = tool.get("type") if isinstance(tool, dict) else None
        if not isinstance(kind, str):
            continue
        for name in ("web_search", "web_fetch", "code_execution"):
            if kind.startswith(name + "_"):
                most = tool.get("max_uses")
                count = most if isinstance(most, int) and not isinstance(most, bool) and most >= 0 else ceiling
                # At most 2**31-1 (JSON's integers have no bound): priced, the reservation must stay a float.
                uses[name] = uses.get(name, 0) + min(count, 2**31 - 1)
    return uses


def server_tool_price(gw: Registry, model: str, tool: str) -> float:
    """Dollars per use of a server tool: ``[pricing."MODEL"] <tool>_per_use`` (or the provider's model info),
    else for web search the cost map's ``search_context_cost_per_query`` (its highest tier), else Anthropic's
    list price; web fetch and code execution bill their tokens only unless priced so."""
    configured = gw.model_info(model).server_tool_per_use.get(tool)
    if configured is not None:
        return configured
    if tool != "web_search":
        return 0.0
    entry = cost_map().get(model.split("/", 1)[1] if "/" in model else model) or {}
    tiers = entry.get("search_context_cost_per_query")
    if isinstance(tiers, dict) and tiers:
        return max(float(v) for v in tiers.values())
    return WEB_SEARCH_USD


def server_tool_cost(gw: Registry, model: str, uses: dict[str, int]) -> float:
    return sum(server_tool_price(gw, model, tool) * n for tool, n in uses.items())


def adaptive_thinking_sent(model: str, reasoning_effort: bool) -> bool:
    """Whether thinking goes to ``model`` in the adaptive form, within ``max_tokens``: the providers send it to every
    model that takes it (the budget form is deprecated there), but litellm given a /v1 client's ``reasoning_effort``
    translates that itself, so such a call is counted at the budget form."""
    return accepts_adaptive_thinking(model) and (model.startswith(ANTHROPIC_PREFIX) or not reasoning_effort)


def ceiling_cost(gw: Registry, model: str, ceiling: Ceiling) -> float:
    """The reservation: a ceiling priced at the model's rates, long-context tiers and cache writes included."""
    info = gw.model_info(model)
    input_tokens = ceiling.input_tokens + ceiling.uncountable * uncountable_tokens(gw, model)
    input_tokens += ceiling.images * (attachments.image_ceiling(model) - IMAGE_TOKENS)
    # The tier the record would be priced at (ModelInfo.cost): the cost map's, the provider's or [pricing]'s.
    tier = info.tier(input_tokens)
    input_price, output_price, write_price = info.input_per_mtok, info.output_per_mtok, info.cache_write_per_mtok
    if tier is not None:
        input_price, output_price = tier.input_per_mtok, tier.output_per_mtok
        write_price = tier.cache_write_per_mtok if tier.cache_write_per_mtok is not None else tier.input_per_mtok
    if ceiling.cache_write is not None:  # any of the input may be written to the cache, at its TTL's price
        if ceiling.cache_write == "1h" and info.cache_write_1h_per_mtok is not None:
            write_price = info.cache_write_1h_per_mtok
        input_price = max(input_price, write_price)
    served = info.service_tiers.get(ceiling.service_tier or "")
    if served is not None:  # the tier asked for, when dearer (flex is cheaper, and may be served as standard)
        input_price, output_price = max(input_price, served[0]), max(output_price, served[1])
    output_tokens = ceiling.output_tokens
    if ceiling.anthropic_output_tokens is not None and (model.startswith(ANTHROPIC_PREFIX) or anthropic_family(model)):
        output_tokens = ceiling.anthropic_output_tokens
        if adaptive_thinking_sent(model, ceiling.reasoning_effort):
            output_tokens = ceiling.output_tokens  # adaptive thinking stays within max_tokens
    uses = dict(ceiling.server_tool_uses)
    if ceiling.web_search:
        uses["web_search"] = uses.get("web_search", 0) + int(gw.config["limits"]["server_tool_max_uses"])
    geo = info.geo_multiplier(ceiling.inference_geo)
    tokens = (input_tokens * input_price + output_tokens * output_price) * geo / 1e6
    return tokens + server_tool_cost(gw, model, uses)


def reachable_models(gw: Registry, model: str, fallbacks: bool = False) -> list[tuple[str, bool]]:
    """The models a call to ``model`` may end up on, each with whether it is a plain fallback (skipped for a
    client whose allowlist does not have it): a model group's deployments and its fallbacks (groups in turn),
    and with ``fallbacks`` the ``[models] fallbacks`` of a plain model (chat turns fall back along them)."""
    out: list[tuple[str, bool]] = []
    seen: set[str] = set()

    def walk(name: str, top: bool) -> None:
        if name in seen:
            return
        seen.add(name)
        group = gw.router.group(name)
        if group is None:
            out.append((name, not top))
            if top and fallbacks:
                for fallback in gw.config["models"]["fallbacks"].get(name, []):
                    walk(fallback, False)  # a group among them: its deployments
            return
        out.extend((d.model, False) for d in group.deployments)
        for fallback in group.fallbacks:
            walk(fallback, False)

    walk(model, True)
    return out


async def priced_models(gw: Registry, client: str, model: str, fallbacks: bool = False) -> list[str]:
    """The models a call's reservation is priced at (the dearest of them): ``reachable_models`` but the plain
    fallbacks the client may not use, which are skipped."""
    out: list[str] = []
    for name, fallback in reachable_models(gw, model, fallbacks):
        if fallback:
            try:
                await gw.guard.check_model(client, name)
            except ApiError:
                continue
        out.append(name)
    return list(dict.fromkeys(out))


def reservation_cost(gw: Registry, models: list[str], ceiling: Ceiling) -> float:
    """A call's reservation: its ceiling priced at the dearest model it may end up on (``priced_models``) -- a
    group's attempt or a fallback is paid at its own model's rates."""
    return max(ceiling_cost(gw, m, ceiling) for m in models)


# --- the record ---------------------------------------------------------------------------------


def price(gw: Registry, model: str, usage: TokenUsage, info: ModelInfo | None = None) -> Cost:
    """What ``usage`` costs at the model's rates (``info``'s when given), server-tool fees included."""
    cost = (info or gw.model_info(model)).cost(usage)
    if usage.server_tool_use:
        cost.server_tool_cost = server_tool_cost(gw, model, usage.server_tool_use)
    return cost


def cut_short_usage(
    reported: TokenUsage | None,
    count_input: Callable[[], int],
    count_output: Callable[[], int],
    *,
    output_after_report: bool = True,
) -> TokenUsage:
    """The usage of a call the upstream answered that ended without its final usage report (cut, failed, left by
    its client, a process that died, or a provider that reports none): the rule every path records by -- the
    pipeline's steps, ``/v1`` (``DirectCall``), the Anthropic relay, a compaction, and a recovery
    (``recovered_record``). docs/accounting.md, "What estimated means".

    - ``reported``, the upstream's last report (``message_start``, a usage chunk), is kept as reported, with the
      fields it names already (``serverToolUse``: the server tools seen to run, not reported yet);
    - the output is counted here (``count_output``: all the output relayed) and replaces the reported one only
      when it is more and came after the report (``output_after_report``; True when unknown, False after a final
      report): then ``outputTokens`` is named;
    - with no report at all, the input (``count_input``) and the output are both counted here, and both named --
      an output of 0 too: the upstream wrote (or began) an answer it did not report.

    ``estimated_fields`` lists them in ``in_estimated_order``. A call the upstream never answered bills nothing:
    the caller records it with ``answered=False``."""
    if reported is None:
        return TokenUsage(count_input(), count_output(), estimated=True, estimated_fields=ALL_FIELDS)
    usage = replace(reported)
    fields = list(reported.estimated_fields)
    if output_after_report:
        counted = count_output()
        if counted > usage.output_tokens:
            usage.output_tokens = counted
            fields.append("outputTokens")
    usage.estimated_fields = in_estimated_order(fields)
    usage.estimated = bool(usage.estimated_fields)
    return usage


def _usage_record(
    gw: Registry,
    *,
    record_id: str,
    model: str,
    usage: TokenUsage,
    latency_ms: float,
    finish_reason: str,
    session_id: str | None,
    client: str | None,
    endpoint: str | None,
    error: str | None = None,
    answered: bool = True,
    attempts: int = 1,
    estimated_fields: Iterable[str] = (),
    ttft_ms: float | None = None,
    recovered: bool = False,
    timestamp: str | None = None,
    purpose: str | None = None,
    deployment: str | None = None,
    info: ModelInfo | None = None,
) -> UsageRecord:
    """The priced record of one provider call: the only place a UsageRecord is made (priced at ``info``'s
    rates when given: a recovered call's, as they were when it was made)."""
    if not answered:
        usage = TokenUsage()  # the upstream never answered: nothing to bill, whatever was counted
        estimated_fields = ()
    if finish_reason == "aborted" and error is None:
        # Stopped before its end (its client stopped it or left, the server shut down): said so in the error too,
        # which the reports count, on every transport.
        error = "ABORTED"
    fields = tuple(estimated_fields) or usage.estimated_fields
    if not fields and usage.estimated:
        fields = ALL_FIELDS  # counted locally as a whole
    fields = in_estimated_order(fields)  # whoever named them, in the one order
    usage = replace(usage, estimated=bool(fields), estimated_fields=fields)
    info = info or gw.model_info(model)
    cost = price(gw, model, usage, info)
    return UsageRecord(
        id=record_id,
        timestamp=timestamp or now_iso(),
        model=model,
        provider=model.split("/", 1)[0],
        session_id=session_id,
        client=client,
        usage=usage,
        cost=cost,
        latency_ms=latency_ms,
        finish_reason=finish_reason,
        price_known=info.price_known,
        error=error,
        answered=answered,
        attempts=attempts,
        endpoint=endpoint,
        ttft_ms=ttft_ms,
        recovered=recovered,
        purpose=purpose,
        deployment=deployment,
    )


def recovered_record(gw: Registry, entry: dict[str, Any]) -> UsageRecord:
    """The record of a call whose process died before it was posted (``storage/ledger.py``): a record spooled
    because the store refused it, as it was; else the usage the upstream reported kept, the output counted
    from what was relayed, a call never answered voided."""
    spooled = entry.get("record")
    if isinstance(spooled, dict):
        return _from_dict(spooled)
    noted = entry.get("usage")
    answered = bool(entry.get("answered")) or noted is not None
    reported = None
    if isinstance(noted, dict):
        reported = TokenUsage(
            input_tokens=int(noted.get("inputTokens") or 0),
            output_tokens=int(noted.get("outputTokens") or 0),
            cache_read_tokens=int(noted.get("cacheReadTokens") or 0),
            cache_write_tokens=int(noted.get("cacheWriteTokens") or 0),
            reasoning_tokens=int(noted.get("reasoningTokens") or 0),
            server_tool_use=noted.get("serverToolUse") or None,
            # The server tools seen to run and not reported yet.
            estimated_fields=tuple(f for f in noted.get("estimatedFields") or () if isinstance(f, str)),
        )
    # The output relayed is noted every half second, so whether it came after the last report is not known; none
    # replaces a final report.
    final = isinstance(noted, dict) and bool(noted.get("final"))
    usage = cut_short_usage(
        reported,
        lambda: int(entry.get("inputTokens") or 0),
        lambda: int(entry.get("relayedTokens") or 0),
        output_after_report=not final,
    )
    # The tier the upstream reported, else the one the request asked for (and was reserved at).
    tier = noted.get("serviceTier") if isinstance(noted, dict) else None
    tier = tier or entry.get("serviceTier")
    usage.service_tier = tier if isinstance(tier, str) else None
    geo = noted.get("inferenceGeo") if isinstance(noted, dict) else None
    geo = geo or entry.get("inferenceGeo")  # where it ran, else where the request asked to run
    usage.inference_geo = geo if isinstance(geo, str) else None
    return _usage_record(
        gw,
        record_id=str(entry["id"]),
        model=str(entry["model"]),
        usage=usage,
        latency_ms=0.0,
        finish_reason="error",
        session_id=entry.get("sessionId"),
        client=entry.get("client"),
        endpoint=entry.get("endpoint"),
        error="INTERRUPTED",
        answered=answered,
        recovered=True,
        timestamp=str(entry.get("time") or now_iso()),
        purpose=entry.get("purpose"),
        deployment=entry.get("deployment"),
        info=rates_info(gw, str(entry["model"]), entry.get("rates")),
    )


def entry_rates(info: ModelInfo) -> dict[str, Any]:
    """The rates a call is priced at, kept in its pending entry: a recovery after a restart prices the call as it
    was priced when it was made, whatever ``[pricing]`` (or the cost map) says by then."""
    rates: dict[str, Any] = {
        "input": info.input_per_mtok,
        "output": info.output_per_mtok,
        "cacheRead": info.cache_read_per_mtok,
        "cacheWrite": info.cache_write_per_mtok,
    }
    if info.cache_write_1h_per_mtok is not None:
        rates["cacheWrite1h"] = info.cache_write_1h_per_mtok
    if info.long_context:
        rates["tiers"] = [asdict(tier) for tier in info.long_context]
    if info.service_tiers:
        rates["serviceTiers"] = {tier: list(prices) for tier, prices in info.service_tiers.items()}
    if info.geo_multipliers:
        rates["geoMultipliers"] = dict(info.geo_multipliers)
    if not info.price_known:
        rates["known"] = False
    return rates


def rates_info(gw: Registry, model: str, rates: Any) -> ModelInfo:
    """The model priced at ``rates`` (``entry_rates``), even when no provider serves it any more; the rates of now
    when the entry has none (written by an older version) or they do not read."""
    if not isinstance(rates, dict):
        return gw.model_info(model)
    try:
        return ModelInfo(
            id=model,
            provider=model.split("/", 1)[0],
            input_per_mtok=float(rates["input"]),
            output_per_mtok=float(rates["output"]),
            cache_read_per_mtok=float(rates["cacheRead"]),
            cache_write_per_mtok=float(rates["cacheWrite"]),
            cache_write_1h_per_mtok=None if rates.get("cacheWrite1h") is None else float(rates["cacheWrite1h"]),
            long_context=tuple(PriceTier(**tier) for tier in rates.get("tiers") or ()),
            service_tiers={
                str(tier): (float(p[0]), float(p[1]), float(p[2]))
                for tier, p in (rates.get("serviceTiers") or {}).items()
            },
            geo_multipliers={str(geo): float(m) for geo, m in (rates.get("geoMultipliers") or {}).items()},
            price_known=rates.get("known") is not False,
        )
    except (KeyError, TypeError, ValueError):
        log.warning("the pending entry of a %s call has rates that do not read; priced at today's", model)
        return gw.model_info(model)


def _from_dict(d: dict[str, Any]) -> UsageRecord:
    """A record from its ``to_dict()`` form (the spool)."""
    usage = TokenUsage(
        int(d.get("inputTokens") or 0),
        int(d.get("outputTokens") or 0),
        int(d.get("cacheReadTokens") or 0),
        int(d.get("cacheWriteTokens") or 0),
        int(d.get("reasoningTokens") or 0),
        bool(d.get("estimated")),
        tuple(d.get("estimatedFields") or ()),
        server_tool_use=d.get("serverToolUse") or None,
    )
    cost = Cost(
        input_cost=float(d.get("inputCost") or 0.0),
        output_cost=float(d.get("outputCost") or 0.0),
        price_known=d.get("priceKnown") is not False,
        server_tool_cost=float(d.get("serverToolCost") or 0.0),
    )
    return UsageRecord(
        id=str(d["id"]),
        timestamp=str(d["timestamp"]),
        model=str(d["model"]),
        provider=str(d.get("provider") or str(d["model"]).split("/", 1)[0]),
        session_id=d.get("sessionId"),
        client=d.get("client"),
        usage=usage,
        cost=cost,
        latency_ms=float(d.get("latencyMs") or 0.0),
        finish_reason=str(d.get("finishReason") or "other"),
        price_known=d.get("priceKnown") is not False,
        error=d.get("error"),
        answered=d.get("answered") is not False,
        attempts=int(d.get("attempts") or 1),
        endpoint=d.get("endpoint"),
        ttft_ms=d.get("ttftMs"),
        recovered=bool(d.get("recovered")),
        purpose=d.get("purpose"),
        deployment=d.get("deployment"),
    )


def usage_to_note(usage: TokenUsage, final: bool = False) -> dict[str, Any]:
    return {
        "inputTokens": usage.input_tokens,
        "outputTokens": usage.output_tokens,
        "cacheReadTokens": usage.cache_read_tokens,
        "cacheWriteTokens": usage.cache_write_tokens,
        "reasoningTokens": usage.reasoning_tokens,
        "serverToolUse": usage.server_tool_use,
        "final": final,
        **({"serviceTier": usage.service_tier} if usage.service_tier else {}),
        **({"inferenceGeo": usage.inference_geo} if usage.inference_geo else {}),
        **({"estimatedFields": list(usage.estimated_fields)} if usage.estimated_fields else {}),
    }


# --- the call -----------------------------------------------------------------------------------


class ProviderCall:
    """One provider call: admitted, reserved, written ahead, observed, recorded once, settled."""

    __slots__ = (
        "gw",
        "continues",
        "id",
        "model",
        "requested",
        "session_id",
        "client",
        "endpoint",
        "credential",
        "identity",
        "purpose",
        "started",
        "attempts",
        "recorded",
        "first_at",
        "call",
        "reservation",
        "ceiling",
        "failure",
        "deployment",
        "fallbacks",
        "_open",
        "_relayed_chars",
        "_relayed_noted",
        "_relayed_count",
        "_relayed_timer",
        "_input_timer",
        "_reported",
        "_count_input",
    )

    def __init__(
        self,
        gw: Registry,
        model: str,
        *,
        session_id: str | None,
        client: str | None,
        endpoint: str | None,
        credential: str | None = None,
        call: CallInfo | None = None,
        purpose: str | None = None,
        fallbacks: bool = False,
    ) -> None:
        self.gw = gw
        self.purpose = purpose  # a call the gateway made on its own account ("compact"), in the record
        self.id = new_id("usage_")  # the ledger entry's id, and the record's
        self.model = model
        # The model the client asked for: the observation hooks' call names it when a fallback answers (route).
        self.requested = model
        self.session_id = session_id
        self.client = client
        self.endpoint = endpoint
        self.credential = credential  # the SHA-256 of the client key the caller authenticated with
        self.identity: str | None = None  # the creation of the client the call was admitted as
        self.started = time.monotonic()
        self.attempts = 1
        self.recorded: UsageRecord | None = None
        self.reservation: Reservation | None = None  # the budget held for this call, settled by the record
        self.ceiling: Ceiling | None = None
        self.first_at: float | None = None  # when the first output was streamed (``first_output``)
        self.call = call  # for the observation hooks, from ``begin`` (the pipeline makes its own)
        self.failure: BaseException | None = None  # a sink's store refused the record (kept for a retry)
        self.deployment: str | None = None  # the model group's deployment this attempt went to (routing.py)
        # The call may fall back along ``[models] fallbacks`` (a chat turn's step): reserved at the dearest of them.
        self.fallbacks = fallbacks
        # Another attempt at a request admitted already (a group's next deployment, a fallback, a retry): checked
        # and reserved like any call, but not another of the client's requests in its rpm.
        self.continues = False
        self._open = False  # a pending entry is in the ledger
        self._relayed_chars = 0
        self._relayed_noted = 0
        self._relayed_count: Callable[[], int] | None = None  # the caller's count of the output relayed
        self._relayed_timer: asyncio.TimerHandle | None = None
        self._input_timer: asyncio.TimerHandle | None = None
        self._reported = False  # the upstream reported usage (noted)
        self._count_input: Callable[[], Ceiling] | None = None  # the request's ceiling, as ``admit`` was given it

    # --- admission ---

    async def admit(self, ceiling: Callable[[], Ceiling] | None) -> None:
        """The checks at the moment of the call (``limits.Guard.admit``: the server is not shutting down, the
        credential is still valid, the model allowlist, rpm/tpm, the budget with this call's reservation), then
        the pending entry written ahead. ``ceiling`` gives the request's ceiling, counted only when a budget
        needs it (counting a long body costs milliseconds); None: admission only (count_tokens) -- nothing
        reserved, no entry. Raises ApiError; then nothing is held."""
        await tokens.loaded()
        guard = self.gw.guard
        amount: float | None = None
        models = [self.model]
        if ceiling is not None and (self.fallbacks or self.gw.router.group(self.model) is not None):
            models = await priced_models(self.gw, self.client or "admin", self.model, self.fallbacks)

        def cost() -> float:
            nonlocal amount
            assert ceiling is not None
            self.ceiling = ceiling()
            amount = reservation_cost(self.gw, models, self.ceiling)
            return amount

        self.reservation = await guard.admit(
            self.client or "admin",
            self.model,
            cost=None if ceiling is None else cost,
            credential=self.credential,
            continues=self.continues,
            admitted=self._admitted,
        )
        if ceiling is None:
            return
        self._count_input = ceiling
        entry: LedgerEntry = {
            "id": self.id,
            "time": now_iso(),
            "client": self.client,
            "sessionId": self.session_id,
            "model": self.model,
            "endpoint": self.endpoint,
            "deployment": self.deployment,
            "reservation": amount,
            "inputTokens": None if self.ceiling is None else self.ceiling.input_tokens,
            "rates": entry_rates(self.gw.model_info(self.model)),
        }
        if self.purpose:
            entry["purpose"] = self.purpose
        if self.ceiling is not None and self.ceiling.service_tier:  # reserved at its rates: a recovery prices at them
            entry["serviceTier"] = self.ceiling.service_tier
        if self.ceiling is not None and self.ceiling.inference_geo:  # likewise where it asked to run
            entry["inferenceGeo"] = self.ceiling.inference_geo
        pending = self.gw.ledger.pending(entry)
        # The turn's user message (pipeline.start_turn), its sync under way: durable too before the request leaves.
        message = self.gw.sessions.awaiting_sync(self.session_id)
        what = "call's ledger entry"
        try:
            if message is None:
                await pending
            else:
                outcomes = await asyncio.gather(pending, message, return_exceptions=True)
                for outcome, name in zip(outcomes, ("call's ledger entry", "message"), strict=True):
                    if isinstance(outcome, BaseException):
                        what = name
                        raise outcome
        except (StorageError, OSError) as e:
            self.gw.ledger.closed(self.id, void=True)  # when the message failed, the entry was written
            await guard.release(self.reservation)
            self.reservation = None
            problem = "the gateway's disk may be full"
            if isinstance(e, StorageError) and e.message:  # it names its store (the database)
                problem = e.message.rstrip(".")
                problem = problem[0].lower() + problem[1:]
            raise ApiError("STORAGE_ERROR", f"The {what} could not be stored ({problem}); nothing was sent.") from None
        except BaseException:  # cancelled (the client left) while the entry was written
            self.gw.ledger.closed(self.id, void=True)
            await guard.release(self.reservation)
            self.reservation = None
            raise
        self._open = True
        if self.ceiling is None:  # no budget needed the count: a call still running soon has it noted (below)
            self._input_timer = asyncio.get_running_loop().call_later(RELAYED_NOTE_SECONDS, self._note_input, ceiling)

    def _admitted(self, client: Client) -> None:
        self.identity = client.created_at

    # --- observation ---

    def begin(self, system: str | None = None, messages: list[ChatMessage] | None = None) -> None:
        """The call goes to the upstream now: the observation hooks see it start, with its prompt when known
        (once; ``record`` calls it too, so every record has a started call)."""
        if self.call is None:
            self.call = CallInfo(
                self.requested,
                self.session_id,
                self.client,
                self.endpoint,
                system=system,
                messages=messages,
                started=self.started,
            )
            notify(self.gw.pm.hook.provider_call_started, call=self.call)

    def first_output(self) -> None:
        """The call's first output reached the client: its time to first token."""
        if self.first_at is None:
            self.first_at = time.monotonic()

    def answered(self) -> None:
        """The upstream took the call (its first byte): a recovery bills its input even with no report."""
        if self._open:
            self.gw.ledger.note(self.id, answered=True)

    def route(self, model: str, deployment: str | None) -> None:
        """This attempt goes to ``model`` (a model group's ``deployment``, or a fallback), chosen after the entry
        was written ahead for the model asked for: noted, so that a recovery records the model that was called,
        at its rates."""
        self.model, self.deployment = model, deployment
        if self._open:
            rates = entry_rates(self.gw.model_info(model))
            self.gw.ledger.note(self.id, model=model, deployment=deployment, rates=rates)

    def sent_whole(self) -> None:
        """The request goes upstream now and its answer comes whole, at its end (a non-streamed call: no first byte
        before then). The upstream bills it once it has it: a recovery bills its input, counted here, as for a
        call that answered, rather than voiding it as a call never sent."""
        if self._open:
            self.gw.ledger.note(self.id, answered=True)

    def note(self, usage: TokenUsage, final: bool = False) -> None:
        """Usage the upstream reported as it arrives (``message_start``, usage chunks): kept in the ledger,
        written with the next batch, for a recovery."""
        if self._open:
            self._reported = True
            self.gw.ledger.note(self.id, usage=usage_to_note(usage, final), answered=True)

    def relayed(self, text: str) -> None:
        """Output relayed to the client: its size is noted within a second (a recovery's output estimate)."""
        self._relayed_chars += len(text)
        if self._relayed_timer is None and self._open:
            self._relayed_timer = asyncio.get_running_loop().call_later(RELAYED_NOTE_SECONDS, self._note_relayed)

    def relayed_tokens(self, count: Callable[[], int]) -> None:
        """Output relayed so far, counted by ``count`` (the Anthropic relay counts its deltas) when it is noted."""
        self._relayed_count = count
        if self._relayed_timer is None and self._open:
            self._relayed_timer = asyncio.get_running_loop().call_later(RELAYED_NOTE_SECONDS, self._note_relayed)

    def _note_input(self, ceiling: Callable[[], Ceiling]) -> None:
        # The input of a call no budget counted, counted once it has run a while (a short call never pays for it):
        # what a recovery bills when the upstream reports nothing before the process dies (a whole answer awaited,
        # a provider that reports usage at the end only).
        self._input_timer = None
        if not self._open or self._reported:  # the upstream reported the input already (message_start)
            return
        try:
            counted = self.ceiling or ceiling()  # counted already (a group's tpm check): not again
        except Exception:
            log.exception("counting the input of call %s failed", self.id)
            return
        tier = {"serviceTier": counted.service_tier} if counted.service_tier else {}  # as the entry's (admit)
        self.gw.ledger.note(self.id, inputTokens=counted.input_tokens, soon=False, **tier)

    def _note_relayed(self) -> None:
        # On a timer rather than every so many tokens: the last output before the upstream went quiet (or the
        # process was killed) is noted too, and counting once per interval keeps a long stream's cost flat.
        self._relayed_timer = None
        if not self._open:
            return
        tokens = self._relayed_count() if self._relayed_count is not None else self._relayed_chars // 4 + 1
        if tokens != self._relayed_noted:
            self._relayed_noted = tokens
            self.gw.ledger.note(self.id, relayedTokens=tokens, answered=True, soon=False)

    # --- the one record ---

    def record(
        self,
        usage: TokenUsage,
        finish_reason: str,
        *,
        error: str | None = None,
        answered: bool = True,
        estimated_fields: Iterable[str] = (),
        model: str | None = None,
        ttft_ms: float | None = None,
    ) -> Awaitable[UsageRecord]:
        """Make the call's record, post it to the sinks (the store of record first) and close the ledger entry;
        await the result for durability. Once per call."""
        if self.recorded is not None:
            raise RuntimeError("a provider call makes exactly one usage record")
        self.begin()
        if ttft_ms is None and self.first_at is not None:
            ttft_ms = (self.first_at - self.started) * 1000
        self.recorded = record = _usage_record(
            self.gw,
            record_id=self.id,
            model=model or self.model,
            usage=usage,
            latency_ms=(time.monotonic() - self.started) * 1000,
            finish_reason=finish_reason,
            session_id=self.session_id,
            client=self.client,
            endpoint=self.endpoint,
            error=error,
            answered=answered,
            attempts=self.attempts,
            estimated_fields=estimated_fields,
            ttft_ms=ttft_ms,
            purpose=self.purpose,
            deployment=self.deployment,
        )
        notify(self.gw.pm.hook.provider_call_finished, call=self.call, record=record)
        if self._relayed_timer is not None:
            self._relayed_timer.cancel()
            self._relayed_timer = None
        if self._input_timer is not None:
            self._input_timer.cancel()
            self._input_timer = None
        gw, was_open = self.gw, self._open
        # A record the store refused is spooled below and retried: once a retry stores it, its entry closes.
        stored_later = functools.partial(gw.ledger.closed, record.id) if was_open else None
        posted = gw.recorder.record(record, self.reservation, stored_later=stored_later, identity=self.identity)
        self._open = False

        async def post() -> UsageRecord:
            self.failure = await posted
            if not was_open:
                return record
            if self.failure is None:
                gw.ledger.closed(record.id)
                return record
            # The store refused it (kept in memory for a retry, ``gw.pending``): the local spool keeps it
            # durably before the client sees the end, and the next start posts it if no retry did.
            try:
                await gw.ledger.spool(record.id, record.to_dict())
            except Exception:
                log.exception("spooling usage record %s failed; it is kept in memory only", record.id)
            return record

        return post()

    async def left_whole(self) -> None:
        """The client left (its handler cancelled) while a whole answer was awaited (``sent_whole``): the upstream
        has the request and bills it, so the call is recorded as its recovery would record it (``recovered_record``)
        -- its input, counted here as the entry's was, billed as a call that answered; its output none relayed, but
        the upstream wrote an answer it did not report, so both are estimates -- aborted, and stored although the
        caller is being cancelled."""
        if self.recorded is None:
            usage = cut_short_usage(None, self.input_tokens, lambda: 0)
            pending = self.record(usage, "aborted", error="ABORTED")
            await asyncio.shield(asyncio.ensure_future(pending))

    def input_tokens(self) -> int:
        """The input counted here: the entry's ``inputTokens`` (the ceiling's, at admission or noted while the
        call ran), what a recovery bills when the upstream reported none, and what a group's tpm check counts
        (``routing.Router.order``). Counted once: a ceiling no budget counted at admission is kept when counted."""
        if self.ceiling is None and self._count_input is not None:  # (None: admitted without an entry, count_tokens)
            try:
                self.ceiling = self._count_input()
            except Exception:
                log.exception("counting the input of call %s failed", self.id)
        return self.ceiling.input_tokens if self.ceiling is not None else 0

    async def release(self) -> None:
        """In a finally: a call that made no record (stopped before it was sent) gives back its reservation
        and voids its ledger entry."""
        if self._input_timer is not None:
            self._input_timer.cancel()
            self._input_timer = None
        if self.recorded is None:
            await self.gw.guard.release(self.reservation)
            if self._open:
                self._open = False
                self.gw.ledger.closed(self.id, void=True)
