"""The built-in Anthropic provider: the official SDK's streaming Messages API, mapped to agentspace events.

A plugin like any other (``register_providers``). The SDK is imported on the first call, because every CLI
command imports this module and most of them never talk to Anthropic.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple

from ..events import (
    CONTEXT_LENGTH_EXCEEDED,
    ProviderError,
    ProviderEvent,
    ProviderFinish,
    ReasoningDelta,
    SourceEvent,
    TextDelta,
    ToolCallEvent,
    UsageReport,
)
from ..hookspecs import hookimpl
from ..lru import LRU
from ..pricing import accepts_adaptive_thinking
from ..prompt_cache import add_breakpoints
from ..protocols.anthropic_messages import server_tool_ran, update_usage, with_seen_server_tools
from ..types import (
    ChatMessage,
    Part,
    ReasoningPart,
    SourcePart,
    TextPart,
    TokenUsage,
    ToolCallPart,
)
from ..vault import missing_key_message
from .base import (
    INCOMPLETE_MESSAGE,
    LEAST_THINKING_BUDGET,
    Provider,
    ProviderRequest,
    ThinkingSettings,
    budget_max_tokens,
    retry_after_seconds,
)
from .sse import sse_events

if TYPE_CHECKING:
    from anthropic import APIStatusError, AsyncAnthropic

    from ..config import Config

log = logging.getLogger(__name__)

PREFIX = "anthropic/"
NO_KEY_MESSAGE = missing_key_message("anthropic")
REJECTED_KEY_MESSAGE = "Anthropic rejected the API key. Run: agentspace keys add anthropic"
UNREADABLE_MESSAGE = "Anthropic sent data that could not be read"

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "tool_use": "tool-calls",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "refusal": "content-filter",
}

# The HTTP status each API error type stands for, for errors that arrive as an `error` event after HTTP 200.
ERROR_TYPE_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}


@hookimpl
def register_providers(register: Callable[[Provider], None], config: Config) -> None:
    register(AnthropicProvider(config))


@hookimpl
def server_startup(app: Any, config: Config) -> None:
    # The SDK takes about a second to import: load it in the background while the server starts
    # listening, instead of in the first chat (and never in CLI commands, which do not run this hook).
    threading.Thread(target=_import_sdk, name="agentspace-import-anthropic", daemon=True).start()


def _import_sdk() -> None:
    importlib.import_module("anthropic")
    gc.freeze()  # the SDK's modules live as long as the server, like the rest of start-up (see server.py)


_sdk: ModuleType | None = None


async def _load_sdk() -> ModuleType:
    """The SDK, its import waited for off the event loop: a first call may come while ``server_startup``'s thread
    still imports it (seconds on a loaded machine, beside litellm's import), and an ``import`` on the loop would
    wait for that thread's module lock with every other client, lock renewal and health check waiting too."""
    global _sdk
    if _sdk is None:
        _sdk = await asyncio.to_thread(importlib.import_module, "anthropic")
    return _sdk


class AnthropicProvider:
    """Serves ``anthropic/...`` model ids with the official ``anthropic`` SDK."""

    name = "anthropic"

    def __init__(self, config: Config) -> None:
        self._timeout = float(config.provider_settings("anthropic")["timeout_seconds"])
        # One client (one connection pool) per key and endpoint, reused across calls.
        self._clients: dict[tuple[str, str | None], AsyncAnthropic] = {}
        # Thinking forms each model accepts, from the Models API, None if unknown.
        # Bounded (an LRU): model names come from clients.
        self._thinking_forms: LRU[tuple[str | None, str], ThinkingForms | None] = LRU()

    def claims(self, model: str) -> bool:
        return model.startswith(PREFIX)

    async def missing_key(self, model: str, api_key: str | None, base_url: str | None) -> bool:
        # Every call goes with the key the gateway resolved; the SDK gets no other source of one.
        return not api_key

    def _client(self, anthropic: ModuleType, api_key: str, base_url: str | None) -> AsyncAnthropic:
        client = self._clients.get((api_key, base_url))
        if client is None:
            client = anthropic.AsyncAnthropic(
                api_key=api_key,
                base_url=base_url,
                # The pipeline retries (only before the first token reached the client); the SDK must not.
                max_retries=0,
                timeout=anthropic.Timeout(self._timeout, connect=min(10.0, self._timeout)),
                # The SDK's aiohttp transport (the server's own HTTP library) instead of httpcore: about 0.6
                # CPU-ms and 0.5 ms to first token less per streamed call (benchmarks/bench.py).
                http_client=anthropic.DefaultAioHttpClient(),
                # The telemetry plugin makes one span per provider call, whatever the provider; the SDK's own span
                # would double it for Claude (and its attributes cost a twentieth of a millisecond per call
                # even when nothing traces).
                open_telemetry=False,
            )
            self._clients[(api_key, base_url)] = client
        return client

    async def _thinking_for(self, client: AsyncAnthropic, request: ProviderRequest) -> ThinkingSettings | None:
        """The thinking form for the model: adaptive wherever it accepts it (the budget form is deprecated for
        those models, and the SDK warns), else the budget. The Models API says which forms a model accepts
        (asked once per model); without it, the cost map."""
        key = (request.base_url, request.model_name)
        if key not in self._thinking_forms:
            self._thinking_forms[key] = await _thinking_forms(client, request.model_name)
        forms = self._thinking_forms[key]
        thinking = request.thinking
        assert thinking is not None
        if forms is None:  # the Models API did not answer
            if not request.model_info.supports_reasoning:
                return None
            adaptive = thinking.adaptive or accepts_adaptive_thinking(request.model)
            return ThinkingSettings(thinking.budget_tokens, adaptive=adaptive, summarized=thinking.summarized)
        if forms.adaptive:
            # A /v1 client's reasoning_effort is the adaptive thinking's effort where the model takes that level
            # (its budget, used for the other form, means nothing to adaptive thinking).
            effort = EFFORT_LEVELS.get(str(request.params.get("reasoning_effort")))
            effort = effort if effort in forms.efforts else None
            return ThinkingSettings(thinking.budget_tokens, True, effort, thinking.summarized)
        if not forms.budget:
            return None
        return ThinkingSettings(thinking.budget_tokens, adaptive=False, summarized=thinking.summarized)

    async def aclose(self) -> None:
        """Close the pooled HTTP connections."""
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.close()

    async def stream(self, request: ProviderRequest) -> AsyncIterator[ProviderEvent]:
        if not request.api_key:
            raise ProviderError("NO_API_KEY", NO_KEY_MESSAGE)
        anthropic = await _load_sdk()
        import httpx2  # the SDK's HTTP client (imported by it); its errors surface unwrapped while a stream is read

        client = self._client(anthropic, request.api_key, request.base_url)
        if request.thinking is not None:
            request.thinking = await self._thinking_for(client, request)
        params = request_params(request)
        state = _StreamState()
        try:
            # The SDK sends the request and maps its errors; the body's SSE events are decoded here: the SDK's
            # pydantic event objects and its line-by-line SSE decoder cost several times the CPU of
            # ``sse_events`` and ``_StreamState`` per streamed answer, and this is the hot path.
            async with client.messages.with_streaming_response.create(**params) as response:
                async for batch in sse_events(response.http_response.aiter_bytes()):
                    for name, data in batch:
                        for event in state.handle(name, data):
                            yield event
        except anthropic.APIStatusError as e:
            raise _status_error(e, request.api_key) from e
        except anthropic.APITimeoutError as e:
            raise ProviderError("LLM_ERROR", "Anthropic did not answer in time. Try again.", retryable=True) from e
        except anthropic.APIConnectionError as e:
            raise ProviderError(
                "LLM_ERROR",
                "Could not connect to Anthropic. Check the network and [providers.anthropic] base_url.",
                retryable=True,
            ) from e
        except httpx2.TimeoutException as e:
            raise ProviderError("LLM_ERROR", "Anthropic stopped sending (timed out). Try again.", retryable=True) from e
        except httpx2.TransportError as e:
            raise ProviderError("LLM_ERROR", INCOMPLETE_MESSAGE) from e
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            # Broken JSON, or JSON without the fields every event of its type has.
            raise ProviderError("LLM_ERROR", UNREADABLE_MESSAGE) from e
        yield state.finish()


class ThinkingForms(NamedTuple):
    budget: bool  # accepts ``{"type": "enabled", budget_tokens}``
    adaptive: bool  # accepts ``{"type": "adaptive"}``
    efforts: frozenset[str]  # the output_config.effort levels it takes


# A /v1 client's reasoning_effort -> Anthropic's effort level.
EFFORT_LEVELS = {"minimal": "low", "low": "low", "medium": "medium", "high": "high", "xhigh": "xhigh"}


async def _thinking_forms(client: AsyncAnthropic, model_name: str) -> ThinkingForms | None:
    """The thinking forms and effort levels the model accepts, from models.retrieve."""
    try:
        info = await client.models.retrieve(model_name, timeout=5.0)
        capabilities = info.capabilities
        if capabilities is None:
            return None
        thinking = capabilities.thinking
        effort = capabilities.effort
        # (an older API may leave effort or a level out: then the model is not sent that level)
        levels = effort.model_dump() if effort is not None and effort.supported else {}
        efforts = frozenset(
            level for level, support in levels.items() if isinstance(support, dict) and support.get("supported")
        )
        if not thinking.supported:
            return ThinkingForms(False, False, efforts)
        return ThinkingForms(bool(thinking.types.enabled.supported), bool(thinking.types.adaptive.supported), efforts)
    except Exception as e:  # unreachable, unknown model, older API: fall back to the cost map
        log.info("Models API gave no capabilities for %s (%s); using the cost map", model_name, type(e).__name__)
        return None


# --- request ------------------------------------------------------------------------------------


# A /v1 client's OpenAI parameters that the Messages API has no counterpart for: refused, not dropped.
NOT_MESSAGES_PARAMS = frozenset(
    {"seed", "frequency_penalty", "presence_penalty", "logit_bias", "verbosity", "web_search_options"}
)


def request_params(request: ProviderRequest) -> dict[str, Any]:
    """The Messages API parameters for ``request`` (always streamed; never a temperature)."""
    params: dict[str, Any] = {
        "model": request.model_name,
        "messages": to_api_messages(request.messages),
        "max_tokens": request.max_tokens,
        "stream": True,
    }
    if request.system:
        params["system"] = request.system
    refused = sorted(name for name in request.params if name in NOT_MESSAGES_PARAMS)
    if refused:
        raise ProviderError(
            "INVALID_MESSAGE",
            f"{', '.join(refused)}: not supported by Anthropic's Messages API.",
            status=400,
            param=refused[0],
        )
    if request.params.get("stop"):  # (a /v1 client's temperature and top_p: the Messages API takes neither)
        params["stop_sequences"] = request.params["stop"]
    if request.tools:
        params["tools"] = [_claude_tool(tool.definition()) for tool in request.tools]
        tool_choice = _tool_choice(request.params.get("tool_choice"), request.params.get("parallel_tool_calls"))
        if tool_choice is not None:
            params["tool_choice"] = tool_choice
    response_format = request.params.get("response_format")
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    schema = ((response_format or {}).get("json_schema") or {}).get("schema") if kind == "json_schema" else None
    if kind == "json_schema" and isinstance(schema, dict) and not _any_object(schema):
        # Structured outputs: the answer's text is JSON valid against the schema.
        params["output_config"] = {"format": {"type": "json_schema", "schema": claude_schema(schema)}}
    elif kind in ("json_object", "json_schema"):
        # (A schema of any object: structured outputs can only close it, which would force the answer "{}".)
        # The Messages API has no free-form JSON mode: the model is told to answer with one JSON object.
        note = "Answer with one JSON object only: no prose, no code fence."
        params["system"] = f"{request.system}\n\n{note}" if request.system else note
    thinking = request.thinking
    if thinking is not None and not thinking.adaptive and _tool_turn_without_thinking(params["messages"]):
        # The API refuses budget thinking after tool calls whose signed thinking did not come back (a /v1 client
        # on Chat Completions has nowhere to put it): this step of the tool loop is answered without thinking.
        # (Adaptive thinking may call tools without thinking first: it needs nothing back.)
        thinking = None
    if thinking is not None and not thinking.adaptive and budget_max_tokens(request)[1] < LEAST_THINKING_BUDGET:
        # A model whose output limit leaves less than the API's least budget (a small local or described
        # model) answers without thinking: with a smaller budget every call would be refused.
        thinking = None
    if thinking is not None:
        if thinking.adaptive:
            params["thinking"] = {"type": "adaptive"}
            if thinking.effort is not None:
                params["output_config"] = {**params.get("output_config", {}), "effort": thinking.effort}
        else:
            max_tokens, budget = budget_max_tokens(request)  # the reservation counts the same (calls.py)
            params["thinking"] = {"type": "enabled", "budget_tokens": budget}
            params["max_tokens"] = max_tokens
        if thinking.summarized:  # every model with thinking takes it (Claude 4 models' default before Opus 4.7)
            params["thinking"]["display"] = "summarized"
    if request.cache_ttl is not None:
        add_breakpoints(params, request.cache_ttl)
    return params


def _any_object(schema: dict[str, Any]) -> bool:
    """Whether a response_format's schema asks for any JSON object (an object without properties)."""
    return schema.get("type") == "object" and not schema.get("properties")


def _claude_tool(definition: dict[str, Any]) -> dict[str, Any]:
    """A tool as sent: a strict one's schema in the form strict tool use takes (the grammar of structured
    outputs, ``claude_schema``)."""
    if definition.get("strict") and isinstance(definition["input_schema"], dict):
        return {**definition, "input_schema": claude_schema(definition["input_schema"])}
    return definition


def claude_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A client's JSON schema in the form Claude's structured outputs take: every object closed
    (``additionalProperties: false``, which OpenAI's non-strict schemas leave out) and the bounds the API refuses
    (``minimum``, ``maxLength``, ...) moved into the description, as the anthropic SDK's own ``.parse()`` sends
    them. A schema the SDK cannot read goes as it is, for the API to say what is wrong with it."""
    from anthropic import transform_schema  # imported by the time a call is made (_load_sdk)

    try:
        return transform_schema(schema)
    except (ValueError, TypeError, AttributeError, AssertionError):  # the SDK asserts on a type it does not know
        return schema


def _tool_turn_without_thinking(messages: list[dict[str, Any]]) -> bool:
    """Whether the last assistant turn calls tools without starting with its (signed) thinking."""
    assistant = [m for m in messages if m["role"] == "assistant"]
    blocks = assistant[-1]["content"] if assistant else []
    if not any(block["type"] == "tool_use" for block in blocks):
        return False
    return blocks[0]["type"] not in ("thinking", "redacted_thinking")


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    """A /v1 client's OpenAI-shaped ``tool_choice`` and ``parallel_tool_calls`` as the Messages API's."""
    out: dict[str, Any] | None = None
    if choice == "auto":
        out = {"type": "auto"}
    elif choice == "required":
        out = {"type": "any"}
    elif choice == "none":
        return {"type": "none"}
    elif isinstance(choice, dict):
        out = {"type": "tool", "name": str((choice.get("function") or {}).get("name") or choice.get("name") or "")}
    if parallel is False:
        out = {**(out or {"type": "auto"}), "disable_parallel_tool_use": True}
    return out


def to_api_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Our messages as Messages API turns.

    Tool results always go in a user turn, wherever they are stored, and consecutive turns of one role are
    merged (the API requires alternation). Source parts are for display only and are not sent.
    """
    out: list[dict[str, Any]] = []
    for message in messages:
        for part in message.parts:
            block = _to_api_block(part)
            if block is None:
                continue
            role = "user" if part.type == "tool-result" else message.role
            if out and out[-1]["role"] == role:
                out[-1]["content"].append(block)
            else:
                out.append({"role": role, "content": [block]})
    return out


def _to_api_block(part: Part) -> dict[str, Any] | None:
    if part.type == "text":
        # The API rejects empty text blocks.
        return {"type": "text", "text": part.text} if part.text else None
    if part.type == "reasoning":
        if part.redacted_data:
            return {"type": "redacted_thinking", "data": part.redacted_data}
        if part.signature:
            return {"type": "thinking", "thinking": part.text, "signature": part.signature}
        return None  # unsigned reasoning (e.g. from another provider) would be rejected
    if part.type == "tool-call":
        return {"type": "tool_use", "id": part.tool_call_id, "name": part.name, "input": part.input or {}}
    if part.type == "tool-result":
        output = part.output if isinstance(part.output, str) else json.dumps(part.output)
        return {"type": "tool_result", "tool_use_id": part.tool_call_id, "content": output, "is_error": part.is_error}
    if part.type == "file":
        source = (
            {"type": "url", "url": part.url}
            if part.url
            else {"type": "base64", "media_type": part.media_type, "data": part.data or ""}
        )
        if part.is_image:
            return {"type": "image", "source": source}
        # The file's name as the document's title (the API takes up to 500 characters): Claude can name it.
        titled = {"title": part.filename[:DOCUMENT_TITLE_CHARS]} if part.filename else {}
        return {"type": "document", "source": source, **titled}
    return None


DOCUMENT_TITLE_CHARS = 500


# --- response -----------------------------------------------------------------------------------


class _Block:
    """A content block being streamed: its start payload and the text or JSON pieces received so far."""

    __slots__ = ("type", "start", "pieces", "signature")

    def __init__(self, start: dict[str, Any]) -> None:
        self.type: str = start["type"]
        self.start = start
        self.pieces: list[str] = []
        self.signature: str | None = None


class _StreamState:
    """Turns the Messages API's SSE events into our events and assembles the assistant message."""

    __slots__ = ("blocks", "parts", "seen_urls", "usage", "stop_reason", "complete", "server_tools_seen")

    def __init__(self) -> None:
        self.blocks: dict[int, _Block] = {}
        self.parts: list[Part] = []
        self.seen_urls: set[str] = set()
        self.usage: TokenUsage | None = None
        self.stop_reason: str | None = None
        self.complete = False
        self.server_tools_seen: dict[str, int] = {}  # result blocks of server tools that ran, by tool

    def finish(self) -> ProviderFinish:
        """The stream's last event, once the body has ended; ProviderError if the answer was cut short."""
        if not self.complete:
            raise ProviderError("LLM_ERROR", INCOMPLETE_MESSAGE)
        return ProviderFinish(
            FINISH_REASONS.get(self.stop_reason or "", "other"), self.usage, ChatMessage("assistant", self.parts)
        )

    def handle(self, name: str | None, data: str) -> list[ProviderEvent]:
        """The events for one SSE event (mostly none or one)."""
        if name == "content_block_delta":  # by far the most frequent: checked first
            return self._delta(json.loads(data))
        if name == "content_block_start":
            return self._start_block(json.loads(data))
        if name == "content_block_stop":
            return self._stop_block(self.blocks[json.loads(data)["index"]])
        if name == "message_delta":
            event = json.loads(data)
            stop_reason = event["delta"].get("stop_reason")
            if stop_reason is not None:
                self.stop_reason = stop_reason
            usage = event.get("usage")
            return self._update_usage(usage) if usage else []
        if name == "message_start":
            usage = json.loads(data)["message"].get("usage")
            return self._update_usage(usage) if usage else []
        if name == "message_stop":
            self.complete = True
            return []
        if name == "error":
            raise _stream_error(json.loads(data).get("error") or {})
        return []  # ping, and event types added to the API later

    def _delta(self, event: dict[str, Any]) -> list[ProviderEvent]:
        delta = event["delta"]
        kind = delta["type"]
        if kind == "text_delta":
            text = delta["text"]
            self.blocks[event["index"]].pieces.append(text)
            return [TextDelta(text)]
        if kind == "thinking_delta":
            text = delta["thinking"]
            self.blocks[event["index"]].pieces.append(text)
            return [ReasoningDelta(text)]
        if kind == "input_json_delta":
            self.blocks[event["index"]].pieces.append(delta["partial_json"])
        elif kind == "signature_delta":
            self.blocks[event["index"]].signature = delta["signature"]
        elif kind == "citations_delta":
            citation = delta["citation"]
            # Only web citations have a URL; document citations (char_location, ...) point into the request.
            if citation["type"] == "web_search_result_location":
                return self._source(citation["url"], citation.get("title"))
        return []

    def _start_block(self, event: dict[str, Any]) -> list[ProviderEvent]:
        block = _Block(event["content_block"])
        self.blocks[event["index"]] = block
        events: list[ProviderEvent] = []
        tool = server_tool_ran(block.start) if block.type.endswith("_tool_result") else None
        if tool is not None:
            # Billed as it ran; the count comes with the final message_delta. Until then a copy of the usage
            # with the uses seen, marked estimated, is what a stream cut short bills (the pipeline's last report).
            self.server_tools_seen[tool] = self.server_tools_seen.get(tool, 0) + 1
            if self.usage is not None:
                seen = replace(self.usage)
                if with_seen_server_tools(seen, self.server_tools_seen):
                    seen.estimated_fields = (*seen.estimated_fields, "serverToolUse")
                events.append(UsageReport(seen))
        if block.type == "web_search_tool_result" and isinstance(block.start["content"], list):
            # (On a failed search, content is an error object instead of a list of results.)
            events += [e for r in block.start["content"] for e in self._source(r["url"], r.get("title"))]
        return events

    def _source(self, url: str, title: str | None) -> list[ProviderEvent]:
        if url in self.seen_urls:
            return []
        self.seen_urls.add(url)
        self.parts.append(SourcePart(url, title))
        return [SourceEvent(url, title)]

    def _stop_block(self, block: _Block) -> list[ProviderEvent]:
        kind = block.type
        if kind == "text":
            text = "".join(block.pieces)
            if text:
                self.parts.append(TextPart(text))
        elif kind == "thinking":
            self.parts.append(ReasoningPart("".join(block.pieces), signature=block.signature or None))
        elif kind == "redacted_thinking":
            self.parts.append(ReasoningPart("", redacted_data=block.start["data"]))
        elif kind == "tool_use":
            arguments = "".join(block.pieces)
            tool_input = json.loads(arguments) if arguments else (block.start.get("input") or {})
            call = ToolCallPart(block.start["id"], block.start["name"], tool_input)
            self.parts.append(call)
            return [ToolCallEvent(call.tool_call_id, call.name, call.input)]
        return []

    def _update_usage(self, usage: dict[str, Any]) -> list[ProviderEvent]:
        """Take a usage report; the pipeline gets a copy, to bill if the stream breaks off before its end."""
        # The wire format is the Messages API's, which the /v1/messages transport reads too.
        current = self.usage = update_usage(self.usage, usage)
        report = replace(current)
        if with_seen_server_tools(report, self.server_tools_seen):  # a report before the final one
            report.estimated_fields = (*report.estimated_fields, "serverToolUse")
        return [UsageReport(report)]


# --- errors -------------------------------------------------------------------------------------


def _upstream_message(message: Any, api_key: str | None = None) -> str:
    """The upstream's own explanation, bounded, and never echoing the key."""
    text = str(message or "").strip()[:500]
    return text.replace(api_key, "***") if api_key else text


def _status_error(e: APIStatusError, api_key: str) -> ProviderError:
    """An HTTP error status (before streaming) as a ProviderError that tells the user what to do."""
    status = e.status_code
    detail = _upstream_message(e.api_message, api_key)
    if status in (401, 403):  # the gateway's key refused (or not allowed this model): never the caller's fault
        return ProviderError("NO_API_KEY", REJECTED_KEY_MESSAGE, status=status)
    if status == 429:
        return ProviderError(
            "RATE_LIMITED",
            f"Anthropic rate limit reached: {detail.rstrip('.') or 'too many requests'}. Try again shortly.",
            retryable=True,
            retry_after=retry_after_seconds(e.response.headers),
            status=429,
        )
    if status == 404:
        return ProviderError(
            "MODEL_NOT_FOUND", f"Anthropic does not know this model: {detail or 'not found'}", status=404
        )
    # An overloaded or failing upstream may say when to come back, as a rate limit does: a model group cools
    # the deployment for that long (docs/routing.md), and a retry waits for it.
    if status == 529:
        return ProviderError(
            "LLM_ERROR",
            "Anthropic is overloaded right now. Try again shortly.",
            retryable=True,
            retry_after=retry_after_seconds(e.response.headers),
            status=529,
        )
    if status >= 500 or status in (408, 409):
        return ProviderError(
            "LLM_ERROR",
            f"Anthropic had a temporary problem (HTTP {status}). Try again shortly.",
            retryable=True,
            retry_after=retry_after_seconds(e.response.headers),
            status=status,
        )
    too_long = status == 400 and detail.startswith("prompt is too long")  # Anthropic's words for it
    return ProviderError(
        "LLM_ERROR",
        f"Anthropic rejected the request: {detail or f'HTTP {status}'}",
        status=status,
        upstream_code=CONTEXT_LENGTH_EXCEEDED if too_long else None,
    )


def _stream_error(error: dict[str, Any]) -> ProviderError:
    """An ``error`` event sent after HTTP 200 (e.g. the model became overloaded mid-answer)."""
    error_type = str(error.get("type") or "api_error")
    detail = _upstream_message(error.get("message")) or error_type
    status = ERROR_TYPE_STATUS.get(error_type)
    if error_type == "rate_limit_error":
        return ProviderError("RATE_LIMITED", f"Anthropic rate limit reached: {detail}", retryable=True, status=status)
    retryable = error_type in ("overloaded_error", "api_error")
    return ProviderError(
        "LLM_ERROR", f"Anthropic stopped with an error ({error_type}): {detail}", retryable=retryable, status=status
    )
