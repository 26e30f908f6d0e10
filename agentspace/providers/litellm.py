"""Built-in plugin: every model id not claimed by another provider, served through litellm.

litellm takes seconds to import, and this module is imported by every CLI command, so litellm is imported
on the first ``stream()`` call only, in a worker thread so the event loop keeps serving meanwhile.
The model id goes to litellm as is: ``openai/gpt-4o-mini`` is already litellm's ``provider/model`` form.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import importlib
import json
import logging
import os
import re
import struct
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ..events import (
    CONTEXT_LENGTH_EXCEEDED,
    ProviderError,
    ProviderEvent,
    ProviderFinish,
    ReasoningDelta,
    ResponseStarted,
    SourceEvent,
    TextDelta,
    ToolCallEvent,
)
from ..hookspecs import hookimpl
from ..pricing import accepts_adaptive_thinking
from ..prompt_cache import add_chat_breakpoints, anthropic_family
from ..types import (
    ChatMessage,
    FilePart,
    Part,
    ReasoningPart,
    SourcePart,
    TextPart,
    TokenUsage,
    ToolCallPart,
    ToolResultPart,
    reported_count,
)
from ..vault import missing_key_message
from .base import (
    INCOMPLETE_MESSAGE,
    LEAST_THINKING_BUDGET,
    Provider,
    ProviderRequest,
    budget_max_tokens,
    display_name,
    retry_after_seconds,
)
from .litellm_internals import (
    CLEAN_EOF,
    provider_finished,
    provider_sent_usage,
    response_headers,
    unwrap_stream_failure,
)
from .litellm_keys import key_missing

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger(__name__)

_FINISH_REASONS = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool-calls",
    "function_call": "tool-calls",
    "content_filter": "content-filter",
}

_litellm: ModuleType | None = None


async def _load_litellm() -> ModuleType:
    global _litellm
    if _litellm is None:
        # Never fetch the cost map at import; read the copy bundled with litellm.
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        # Concurrent first calls are safe: Python's import lock makes the later threads wait for the first.
        # (Or waits for the import that server_startup began in the background.)
        _import_httpx_here()
        started, loaded = time.monotonic(), "litellm" in sys.modules
        _litellm = _configure(await asyncio.to_thread(importlib.import_module, "litellm"))
        if not loaded:  # what a caller waited for (also the tests' evidence that a request path needs litellm)
            log.info("litellm imported on the request path in %.1fs", time.monotonic() - started)
    return _litellm


def _import_httpx_here() -> None:
    """Import httpx in this thread before litellm is imported in another: the openai and anthropic SDKs look
    for a loaded httpx in ``sys.modules`` on every request, and one half-imported by another thread fails
    them ("partially initialized module 'httpx'")."""
    importlib.import_module("httpx")


def _configure(module: ModuleType) -> ModuleType:
    module.suppress_debug_info = True  # type: ignore[attr-defined]  # no "Give Feedback / Get Help" banners on errors
    # Counting tokens for a provider that sent no usage must not download HuggingFace tokenizers.
    module.disable_hf_tokenizer_download = True  # type: ignore[attr-defined]
    # No retries behind the caller's back: litellm's embedding path reads max_retries=0 as "the default" (2).
    module.DEFAULT_MAX_RETRIES = 0  # type: ignore[attr-defined]
    return module


@hookimpl
def server_startup(app: Any, config: Config) -> None:
    # litellm takes seconds and a few hundred MiB to import: a server that can serve a litellm model starts
    # importing it in the background now, so that no caller waits for it (an OpenAI client's first call to
    # /v1/chat/completions would). A server that cannot (Anthropic only) never imports it; nor does the CLI,
    # which does not run this hook.
    if litellm_usable(config):
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch the cost map at import
        _import_httpx_here()
        threading.Thread(target=_import_in_background, name="agentspace-import-litellm", daemon=True).start()


def litellm_usable(config: Config) -> bool:
    """Whether any model this server could serve goes through litellm: a prefix other than ``anthropic``
    with a ``[providers.PREFIX]`` table, or a key in the vault or the environment, or a model group's
    deployment of another provider."""
    from ..catalog import MAIN_PROVIDERS
    from ..vault import KeyVault, resolve_key

    deployments = [d for group in config.groups.values() for d in group.deployments]
    if any(not d.model.startswith("anthropic/") for d in deployments):
        return True  # a group's deployment through litellm (its key may be any vault entry)
    # A vault entry a deployment names is that deployment's key (team-1), not a provider's: no prefix.
    entries = set(KeyVault(config.data_dir).names()) - {d.key for d in deployments if d.key}
    prefixes = set(config.providers) | set(MAIN_PROVIDERS) | entries
    prefixes |= {m.partition("/")[0] for m in [config["models"]["default"], *config["models"]["fallbacks"]]}
    prefixes |= {m.partition("/")[0] for group in config.groups.values() for m in group.fallbacks}
    prefixes.discard("anthropic")
    return any(p in config.providers or resolve_key(config, p) for p in prefixes if p)


def _import_in_background() -> None:
    started = time.monotonic()
    _configure(importlib.import_module("litellm"))
    gc.freeze()  # litellm's modules live as long as the server, like the rest of start-up (see server.py)
    log.info("litellm imported in the background in %.1fs", time.monotonic() - started)


@hookimpl(trylast=True)
def register_providers(register: Callable[[Provider], None], config: Config) -> None:
    register(LiteLLMProvider(config))


# Common litellm prefixes that serve models the cost map does not list (local and proxy servers).
EXTRA_PREFIXES = frozenset(
    {"openrouter", "hosted_vllm", "lm_studio", "ollama_chat", "litellm_proxy", "llamafile", "vllm"}
)
# Servers on the operator's own machines or network (litellm's defaults are localhost ports): reachable only
# with their [providers.PREFIX] table, so that a client's model id cannot make the gateway call a local port.
LOCAL_PREFIXES = frozenset(
    {
        "ollama",
        "ollama_chat",
        "llamafile",
        "lemonade",  # in litellm's cost map, keyless: http://localhost:8000 by default
        "vllm",
        "hosted_vllm",
        "lm_studio",
        "litellm_proxy",
        "xinference",
        "oobabooga",
        "triton",
        "openai_like",
        "custom_openai",
        "petals",
        "text-completion-openai",
    }
)


class LiteLLMProvider:
    """The catch-all provider: every ``prefix/model`` id whose prefix litellm knows (from its cost map) or the
    config names in a ``[providers.PREFIX]`` table; litellm speaks the provider's API."""

    name = "litellm"

    def __init__(self, config: Config) -> None:
        self._config = config
        self._prefixes: frozenset[str] | None = None

    def claims(self, model: str) -> bool:
        prefix, _, name = model.partition("/")
        if not name:
            return False
        if self._prefixes is None:
            from ..pricing import cost_map

            known = {str(entry.get("litellm_provider", "")) for entry in cost_map().values()}
            configured = set(self._config.providers)
            self._prefixes = frozenset(((known | EXTRA_PREFIXES) - LOCAL_PREFIXES) | configured)
        return prefix in self._prefixes

    async def missing_key(self, model: str, api_key: str | None, base_url: str | None) -> bool:
        """Whether litellm's provider for ``model`` needs an API key that neither ``api_key`` nor its own
        environment variable supplies (local servers such as Ollama or vLLM need none)."""
        if api_key:
            return False
        # litellm's own answer, read from it once (litellm_keys.py, scripts/provider_keys.py): no import of
        # litellm (seconds) on the request path. base_url does not change it: only *_API_KEY names count.
        missing = key_missing(model.partition("/")[0])
        if missing is not None:
            return missing
        litellm = await _load_litellm()  # a prefix the table does not know: ask litellm itself
        # litellm's own table of what each provider needs; of those, only *_API_KEY names are keys (other
        # credentials, such as AWS profiles or Vertex projects, have sources it cannot see).
        names = litellm.validate_environment(model=model, api_key=None, api_base=base_url)["missing_keys"]
        return any(name.endswith("_API_KEY") for name in names)

    async def stream(self, request: ProviderRequest) -> AsyncIterator[ProviderEvent]:
        litellm = await self._checked_litellm(request)
        settings = self._config.provider_settings(request.prefix)
        kwargs = _completion_kwargs(request, settings)
        if "thinking" in kwargs and _effort_not_thinking(litellm, request):
            # litellm drops ``thinking`` for providers whose API knows only reasoning_effort (OpenAI's): the
            # budget goes as the effort it is nearest (Claude Code's thinking on an OpenAI reasoning model).
            budget = kwargs.pop("thinking").get("budget_tokens") or REASONING_EFFORT_BUDGETS["medium"]
            kwargs["reasoning_effort"] = next(
                (effort for effort, most in REASONING_EFFORT_BUDGETS.items() if budget <= most), "high"
            )
        reader = _ChunkReader()
        response: Any = None
        try:
            response = await litellm.acompletion(**kwargs)
            answered = False
            async for chunk in response:
                for event in reader.feed(chunk):
                    answered = True
                    yield event
                if not answered:
                    # A first chunk with nothing to show (``{"role": "assistant"}``): the upstream took the call
                    # all the same, and bills its input if the stream breaks off now.
                    answered = True
                    yield ResponseStarted()
        except Exception as e:
            raise _map_error(e, request, settings["key_name"] or request.prefix) from None
        finally:
            # Also when the consumer stops early (abort): close the upstream connection, ending generation.
            if response is not None:
                await response.aclose()
        for event in reader.finish(response):
            yield event

    async def _checked_litellm(self, request: ProviderRequest) -> ModuleType:
        """litellm, once the request is known to have its key and only parameters its provider takes."""
        if await self.missing_key(request.model, request.api_key, request.base_url):
            # Checked here too for fallbacks and direct callers; litellm would retry a "Missing credentials" 500.
            raise ProviderError("NO_API_KEY", missing_key_message(request.prefix, self._config))
        litellm = await _load_litellm()
        refused = unsupported_params(litellm, request)
        if refused:
            raise ProviderError(
                "INVALID_MESSAGE",
                f"{', '.join(refused)}: not supported by {request.model} (its provider's API has no such parameter).",
                status=400,
                param=refused[0],
            )
        refusal = refused_values(litellm, request)
        if refusal:
            raise ProviderError("INVALID_MESSAGE", refusal, status=400, param=refusal.split(":", 1)[0].split(",")[0])
        return litellm


def _completion_kwargs(request: ProviderRequest, settings: Any) -> dict[str, Any]:
    """The arguments of ``litellm.acompletion`` for ``request`` under its provider's ``settings``."""
    kwargs: dict[str, Any] = {
        # [providers.PREFIX] options go to litellm as they are (api_version, extra_headers, temperature, ...).
        **settings["options"],
        "model": request.model,
        "messages": to_openai_messages(request),
        "stream": True,
        "stream_options": {"include_usage": True},
        "api_base": request.base_url,
        "api_key": request.api_key,
        "max_tokens": request.max_tokens,
        "timeout": settings["timeout_seconds"],
        # The pipeline retries (before the first token only); litellm and the SDKs under it must not.
        "num_retries": 0,
        "max_retries": 0,
        # Providers that reject a parameter (stream_options, thinking, ...) get it dropped, not a 400.
        "drop_params": True,
        **request.params,  # a /v1 client's temperature, top_p, stop
    }
    if request.cache_ttl is not None and anthropic_family(request.model):
        # OpenAI, Gemini and others cache prefixes on their own; Claude only what is marked.
        add_chat_breakpoints(kwargs["messages"], request.cache_ttl)
    if request.tools:
        kwargs["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description,
                    "parameters": t.input_schema,
                    **({} if t.strict is None else {"strict": t.strict}),  # a /v1 client's strict flag
                },
            }
            for t in request.tools
        ]
    if (
        request.thinking is not None
        and request.model_info.supports_reasoning
        and "reasoning_effort" not in request.params
    ):
        # (a /v1 client's reasoning_effort goes as it is: litellm translates it for each provider)
        # Adaptive wherever the model takes it (the budget form is deprecated for those models).
        adaptive = request.thinking.adaptive or accepts_adaptive_thinking(request.model)
        budget = request.thinking.budget_tokens
        if anthropic_family(request.model) and not adaptive:
            # Claude's APIs take the budget within max_tokens (litellm cuts one at or above it to max_tokens - 1):
            # the answer's room goes on top, as Anthropic's own provider sends it (the reservation counts the same:
            # calls.ceiling_cost).
            kwargs["max_tokens"], budget = budget_max_tokens(request)
            if budget < LEAST_THINKING_BUDGET:  # an output limit too small for any budget: no thinking
                kwargs["max_tokens"] = request.max_tokens
                return kwargs
        kwargs["thinking"] = {"type": "adaptive"} if adaptive else {"type": "enabled", "budget_tokens": budget}
    return kwargs


class _ChunkReader:
    """Turns litellm's streamed chunks into our events while it collects the assistant message, the tool
    calls (whose arguments arrive in pieces), the finish reason and the usage."""

    def __init__(self) -> None:
        self.message = _MessageBuilder()
        self.calls: dict[int, list[Any]] = {}  # index -> [id, name, argument pieces]
        self.seen_urls: set[str] = set()
        self.finish_reason: str | None = None
        self.usage: Any = None
        self.service_tier: str | None = None  # the tier the upstream served the call at, as its chunks say

    def feed(self, chunk: Any) -> Iterator[ProviderEvent]:
        choices = chunk.choices
        if choices:
            choice = choices[0]
            if choice.delta is not None:
                yield from self._delta(choice.delta)
            if choice.finish_reason:
                self.finish_reason = choice.finish_reason
        citations = getattr(chunk, "citations", None)  # Perplexity: a list of URLs on the chunk
        if citations:
            for url in citations:
                if isinstance(url, str):
                    yield from self._source(SourceEvent(url))
        chunk_usage = getattr(chunk, "usage", None)
        if chunk_usage is not None:
            self.usage = chunk_usage
        tier = getattr(chunk, "service_tier", None)
        if isinstance(tier, str) and tier and tier != "default":  # the standard rates: nothing to note
            self.service_tier = tier

    def _delta(self, delta: Any) -> Iterator[ProviderEvent]:
        message = self.message
        reasoning = getattr(delta, "reasoning_content", None)
        if reasoning:
            message.add_reasoning(reasoning)
            yield ReasoningDelta(reasoning)
        blocks = getattr(delta, "thinking_blocks", None)
        if blocks:
            # Anthropic-family models: the text also came as reasoning_content; keep signatures.
            for text in message.add_thinking_blocks(blocks, reasoning is None):
                yield ReasoningDelta(text)
        content = delta.content
        if content:
            message.add_text(content)
            yield TextDelta(content)
        if delta.tool_calls:
            self._tool_call_pieces(delta.tool_calls)
        annotations = getattr(delta, "annotations", None)
        if annotations:
            for source in _annotation_sources(annotations):
                yield from self._source(source)

    def _tool_call_pieces(self, tool_calls: list[Any]) -> None:
        for tc in tool_calls:
            call = self.calls.get(tc.index)
            if call is None:
                call = self.calls[tc.index] = [None, None, []]
            call[0] = call[0] or tc.id
            fn = tc.function
            if fn is not None:
                call[1] = call[1] or fn.name
                if fn.arguments:
                    call[2].append(fn.arguments)

    def _source(self, source: SourceEvent) -> Iterator[SourceEvent]:
        """Each cited URL once."""
        if source.url not in self.seen_urls:
            self.seen_urls.add(source.url)
            self.message.add_source(source)
            yield source

    def finish(self, response: Any) -> Iterator[ProviderEvent]:
        """The tool calls and the finish, once the stream ended."""
        # litellm papers over a stream that ended early with a made-up "stop"; its own state says whether the
        # provider sent a finish reason at all.
        if self.finish_reason is None or not provider_finished(response):
            raise ProviderError("LLM_ERROR", INCOMPLETE_MESSAGE, retryable=True)
        for index in sorted(self.calls):
            tool_id, name, pieces = self.calls[index]
            event = ToolCallEvent(tool_id or f"call_{index}", name or "", _parse_arguments("".join(pieces)))
            self.message.add_tool_call(event)
            yield event
        reason = _FINISH_REASONS.get(self.finish_reason, "other")
        if self.calls and reason == "stop":  # some OpenAI-compatible servers (Ollama) end tool calls with "stop"
            reason = "tool-calls"
        usage = _token_usage(self.usage) if provider_sent_usage(response) else None
        if usage is not None and self.service_tier is not None:
            usage = replace(usage, service_tier=self.service_tier)
        yield ProviderFinish(reason, usage, self.message.finish())


# A /v1 client's parameters that change the answer: refused (not dropped) where the provider's API has none.
# (temperature, top_p and stop are sampling hints every provider gets where its API takes them.)
CHECKED_PARAMS = frozenset(
    {
        "response_format",
        "tool_choice",
        "parallel_tool_calls",
        "seed",
        "frequency_penalty",
        "presence_penalty",
        "logit_bias",
        "verbosity",
        "web_search_options",
        "top_k",  # (from /v1/messages)
    }
)


# A thinking budget as an effort: up to each value, that effort (beyond the last, "high").
REASONING_EFFORT_BUDGETS = {"low": 4096, "medium": 12000}


def _effort_not_thinking(litellm: ModuleType, request: ProviderRequest) -> bool:
    """Whether the model's provider takes reasoning_effort and not ``thinking`` (by litellm's table)."""
    try:
        supported = litellm.get_supported_openai_params(model=request.model_name, custom_llm_provider=request.prefix)
    except Exception:  # litellm raises for providers it has no table for
        return False
    return bool(supported) and "reasoning_effort" in supported and "thinking" not in supported


def unsupported_params(litellm: ModuleType, request: ProviderRequest) -> list[str]:
    """The checked parameters of ``request`` that litellm says its provider does not take (none when litellm
    does not know the provider: an OpenAI-compatible server gets them all)."""
    asked = sorted(name for name in request.params if name in CHECKED_PARAMS)
    if not asked:
        return []
    try:
        supported = litellm.get_supported_openai_params(model=request.model_name, custom_llm_provider=request.prefix)
    except Exception:  # litellm raises for providers it has no table for
        return []
    if not supported:
        return []
    return [name for name in asked if name not in supported]


# A /v1 client's parameters whose values a model may refuse: litellm drops such a value (drop_params, which
# the gateway's own stream_options and thinking need), so they are checked against litellm's mapping first.
VALUE_CHECKED_PARAMS = ("temperature", "top_p", "stop", "reasoning_effort")


def refused_values(litellm: ModuleType, request: ProviderRequest) -> str | None:
    """Why litellm would drop a sampling parameter or reasoning_effort the client set (for instance a
    temperature other than 1 on a reasoning model, or a reasoning_effort on a model without reasoning), the
    parameter named first; None when every one goes to the provider."""
    asked = {name: request.params[name] for name in VALUE_CHECKED_PARAMS if name in request.params}
    if not asked:
        return None
    try:
        litellm.get_optional_params(
            model=request.model_name, custom_llm_provider=request.prefix, drop_params=False, **asked
        )
    except litellm.UnsupportedParamsError as e:
        reason = str(getattr(e, "message", e)).removeprefix("litellm.UnsupportedParamsError: ")
        reason = reason.split(" To drop", 1)[0].split("\n", 1)[0].strip().rstrip(",")
        named = [name for name in asked if name in reason] or list(asked)
        return f"{', '.join(named)}: not supported by {request.model} ({reason})"
    except Exception:  # litellm raises others for providers it has no mapping for: they get the values
        return None
    return None


# The providers whose embeddings API takes ``encoding_format`` (OpenAI's own shape).
ENCODING_FORMAT_PROVIDERS = frozenset({"openai", "azure"})


def base64_vector(vector: list[float]) -> str:
    """A vector as OpenAI's ``encoding_format: base64`` gives it: little-endian float32, base64."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


async def embed(
    config: Config, request: ProviderRequest, inputs: list[Any], options: dict[str, Any]
) -> tuple[list[Any], TokenUsage | None]:
    """Embeddings of ``inputs`` (strings or token arrays) through litellm: the vectors (lists of floats, or
    base64 strings with ``encoding_format: base64``) and the usage the provider reported (None: none)."""
    if await LiteLLMProvider(config).missing_key(request.model, request.api_key, request.base_url):
        raise ProviderError("NO_API_KEY", missing_key_message(request.prefix, config))
    litellm = await _load_litellm()
    settings = config.provider_settings(request.prefix)
    fmt = options.get("encoding_format")
    if request.prefix not in ENCODING_FORMAT_PROVIDERS:
        # The openai SDK asks for base64 by default; litellm refuses the parameter for APIs that have none
        # (Ollama, Gemini). Floats are asked for, and encoded here as OpenAI encodes them.
        options = {k: v for k, v in options.items() if k != "encoding_format"}
    try:
        response = await litellm.aembedding(
            model=request.model,
            input=inputs,
            api_base=request.base_url,
            api_key=request.api_key,
            timeout=settings["timeout_seconds"],
            num_retries=0,
            max_retries=0,
            **options,  # dimensions, encoding_format, user
        )
    except litellm.UnsupportedParamsError as e:
        # Refused before any request, with advice about litellm's own settings: named as OpenAI names it.
        named = [name for name in options if name in str(e)] or list(options)
        raise ProviderError(
            "INVALID_MESSAGE",
            f"{', '.join(named)}: not supported by {request.model}.",
            status=400,
            param=named[0] if named else None,
        ) from None
    except Exception as e:
        raise _map_error(e, request, settings["key_name"] or request.prefix) from None
    vectors = [item["embedding"] if isinstance(item, dict) else item.embedding for item in response.data]
    if fmt == "base64":
        vectors = [base64_vector(v) if isinstance(v, list) else v for v in vectors]
    usage = getattr(response, "usage", None)
    prompt = reported_count(getattr(usage, "prompt_tokens", None)) if usage is not None else None
    return vectors, TokenUsage(input_tokens=prompt) if prompt is not None else None


# --- the stream -----------------------------------------------------------------------------------


class _MessageBuilder:
    """Collects the assistant message in order, merging consecutive deltas of one kind into one part."""

    __slots__ = ("parts", "_buffer", "_kind")

    def __init__(self) -> None:
        self.parts: list[Part] = []
        self._buffer: list[str] = []
        self._kind = ""

    def _switch(self, kind: str) -> None:
        if self._buffer:
            text = "".join(self._buffer)
            self.parts.append(TextPart(text) if self._kind == "text" else ReasoningPart(text))
            self._buffer = []
        self._kind = kind

    def add_text(self, text: str) -> None:
        if self._kind != "text":
            self._switch("text")
        self._buffer.append(text)

    def add_reasoning(self, text: str) -> None:
        if self._kind != "reasoning":
            self._switch("reasoning")
        self._buffer.append(text)

    def add_source(self, source: SourceEvent) -> None:
        self._switch("")
        self.parts.append(SourcePart(source.url, source.title))

    def add_tool_call(self, call: ToolCallEvent) -> None:
        self._switch("")
        self.parts.append(ToolCallPart(call.tool_call_id, call.name, call.input))

    def add_thinking_blocks(self, blocks: list[Any], take_text: bool) -> list[str]:
        """Record signatures and redacted blocks; return block texts when they are the only copy."""
        texts: list[str] = []
        for block in blocks:
            if block.get("type") == "redacted_thinking":
                self._switch("")
                self.parts.append(ReasoningPart("", redacted_data=block.get("data")))
                continue
            text = block.get("thinking")
            if text and take_text:
                self.add_reasoning(text)
                texts.append(text)
            signature = block.get("signature")
            if signature:
                self._switch("")  # the signature closes the thinking block
                last = self.parts[-1] if self.parts else None
                if isinstance(last, ReasoningPart) and last.redacted_data is None:
                    last.signature = signature
        return texts

    def finish(self) -> ChatMessage:
        self._switch("")
        return ChatMessage("assistant", self.parts)


def _annotation_sources(annotations: list[Any]) -> list[SourceEvent]:
    sources = []
    for a in annotations:
        citation = a.get("url_citation") if isinstance(a, dict) else getattr(a, "url_citation", None)
        if isinstance(citation, dict) and citation.get("url"):
            sources.append(SourceEvent(citation["url"], citation.get("title") or None))
    return sources


def _parse_arguments(raw: str) -> Any:
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        # The model wrote invalid JSON; the tool gets the text and can say so.
        return {"_raw": raw}


def _token_usage(usage: Any) -> TokenUsage | None:
    """The usage litellm parsed; a figure that is no token count (``reported_count``) is taken as 0."""
    if usage is None:
        return None
    prompt = reported_count(usage.prompt_tokens) or 0
    details = getattr(usage, "prompt_tokens_details", None)
    cached = (reported_count(getattr(details, "cached_tokens", None)) or 0) if details is not None else 0
    cache_write = (reported_count(getattr(details, "cache_creation_tokens", None)) or 0) if details is not None else 0
    # Claude's writes by TTL (Vertex AI, Bedrock): a one-hour write is billed at 2x the input price, not 1.25x.
    by_ttl = getattr(details, "cache_creation_token_details", None) if details is not None else None
    hour = (reported_count(getattr(by_ttl, "ephemeral_1h_input_tokens", None)) or 0) if by_ttl is not None else 0
    completion_details = getattr(usage, "completion_tokens_details", None)
    reasoning = getattr(completion_details, "reasoning_tokens", None) if completion_details is not None else None
    return TokenUsage(
        input_tokens=max(0, prompt - cached - cache_write),
        output_tokens=reported_count(usage.completion_tokens) or 0,
        cache_read_tokens=cached,
        cache_write_tokens=cache_write,
        cache_write_1h_tokens=min(hour, cache_write),
        reasoning_tokens=reported_count(reasoning) or 0,
        server_tool_use=_web_searches(usage, details),
    )


def _web_searches(usage: Any, details: Any) -> dict[str, int] | None:
    """The web searches the provider ran and bills per use, as litellm reports them: ``server_tool_use``
    (OpenAI-compatible providers, Claude on Bedrock and Vertex) or ``prompt_tokens_details`` (Gemini's grounding)."""
    for holder in (getattr(usage, "server_tool_use", None), details):
        n = (
            holder.get("web_search_requests")
            if isinstance(holder, dict)
            else getattr(holder, "web_search_requests", None)
        )
        if count := reported_count(n):
            return {"web_search": count}
    return None


# --- messages -------------------------------------------------------------------------------------


def to_openai_messages(request: ProviderRequest) -> list[dict[str, Any]]:
    """Our history in the Chat Completions format that litellm takes for every provider."""
    # Only Anthropic models take their signed thinking back; everyone else gets the answer text only.
    keep_thinking = request.prefix == "anthropic" or anthropic_family(request.model)
    out: list[dict[str, Any]] = [{"role": _system_role(request), "content": request.system}] if request.system else []
    for m in request.messages:
        if m.role == "user":
            text: list[str] = []
            content: list[dict[str, Any]] = []  # with images or documents: content parts in order
            for p in m.parts:
                if isinstance(p, ToolResultPart):
                    out.append({"role": "tool", "tool_call_id": p.tool_call_id, "content": _tool_output(p)})
                elif isinstance(p, TextPart):
                    text.append(p.text)
                    content.append({"type": "text", "text": p.text})
                elif isinstance(p, FilePart):
                    content.append(_file_content(p, request.model))
            # Several texts (a /v1/messages client's text blocks, a text document) stay apart as content parts.
            if len(content) > len(text) or len(text) > 1:
                out.append({"role": "user", "content": content})
            elif text:
                out.append({"role": "user", "content": "".join(text)})
            continue
        msg: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(p.text for p in m.parts if isinstance(p, TextPart)),
        }
        tool_calls = [
            {
                "id": p.tool_call_id,
                "type": "function",
                "function": {"name": p.name, "arguments": json.dumps(p.input, ensure_ascii=False)},
            }
            for p in m.parts
            if isinstance(p, ToolCallPart)
        ]
        if tool_calls:
            msg["tool_calls"] = tool_calls
            msg["content"] = msg["content"] or None
        if keep_thinking:
            blocks = [
                {"type": "redacted_thinking", "data": p.redacted_data}
                if p.redacted_data
                else {"type": "thinking", "thinking": p.text, "signature": p.signature}
                for p in m.parts
                if isinstance(p, ReasoningPart) and (p.signature or p.redacted_data)
            ]
            if blocks:
                msg["thinking_blocks"] = blocks
        out.append(msg)
    return out


def _system_role(request: ProviderRequest) -> str:
    """``developer`` for OpenAI's o-series models, which take instructions that way (OpenAI reads their system
    messages as developer ones): litellm sends a system message to those its model map does not mark as taking
    system messages (o3, o3-mini, o4-mini) as the *user's*, and a developer message as it is."""
    if request.prefix != "openai":
        return "system"
    import litellm  # imported by the time a call is made (_load_litellm)

    return "developer" if litellm.OpenAIOSeriesConfig().is_model_o_series_model(request.model) else "system"


def _file_content(part: FilePart, model: str) -> dict[str, Any]:
    """An image or a document as a Chat Completions content part (litellm translates it for the provider)."""
    if part.is_image:
        return {"type": "image_url", "image_url": {"url": part.data_url()}}
    if part.data is None:
        # Chat Completions takes a document as its bytes only (file_data is a data: URL): a URL there is refused
        # upstream with an error about a field the client never sent, so it is refused here by what it is.
        raise ProviderError(
            "INVALID_MESSAGE",
            f"A document by URL ({part.url}) cannot be sent to {model}: its API takes files as data. "
            "Send the file's base64 data instead.",
            status=400,
        )
    file: dict[str, Any] = {"file_data": part.data_url()}
    if part.filename:
        file["filename"] = part.filename
    return {"type": "file", "file": file}


def _tool_output(part: ToolResultPart) -> str:
    text = part.output if isinstance(part.output, str) else json.dumps(part.output, ensure_ascii=False, default=str)
    return f"Error: {text}" if part.is_error else text


# --- errors ---------------------------------------------------------------------------------------

# litellm prefixes messages with its class names ("litellm.RateLimitError: RateLimitError: OpenAIException - ").
# (the openai SDK's own "Error code: 429 - " comes first in what litellm embeddings raise)
_NOISE = re.compile(r"^(?:litellm\.\w+:\s*|\w+(?:Error|Exception)\s*(?::|-)\s*|Error code: \d+\s*-\s*)+")
# Key shapes of OpenAI/Anthropic (sk-), Groq (gsk_), xAI (xai-) and Google (AIza), in case an upstream echoes one.
_KEY_LIKE = re.compile(r"\b(?:sk-|gsk_|xai-|AIza)[\w\-*]{8,}")


def _map_error(error: Exception, request: ProviderRequest, key_name: str) -> ProviderError:
    from litellm import exceptions as exc  # already imported by the call that failed

    log.warning("%s call failed: %s", request.model, _scrub(str(error), request.api_key))
    error, broke_off = unwrap_stream_failure(error)
    if CLEAN_EOF in str(error):  # newer litellm raises where older ones made up a "stop"
        return ProviderError("LLM_ERROR", INCOMPLETE_MESSAGE, retryable=True)
    transport = _transport_failure(error)
    name = display_name(request.prefix)
    # litellm picks exception classes partly by matching message text (a 401 whose body says
    # "invalid_request_error" becomes a BadRequestError), so the HTTP status decides first.
    status = getattr(error, "status_code", None)
    if status == 401 or isinstance(error, exc.AuthenticationError):
        return ProviderError(
            "NO_API_KEY", f"{name} API key not configured or rejected. Run: agentspace keys add {key_name}", status=401
        )
    if status == 429 or isinstance(error, exc.RateLimitError):
        return ProviderError(
            "RATE_LIMITED",
            f"{name} rate limit reached: {_upstream_message(error, request)}",
            retryable=True,
            retry_after=retry_after_seconds(response_headers(error)),
            status=429,
        )
    # Transport failures carry a made-up status (500) and an internal detail, which stays in the log.
    if transport == "timeout":
        return ProviderError("LLM_ERROR", f"{name} did not answer in time", retryable=True)
    if transport:  # litellm also reports an unparsable chunk as a connection error
        where = "the stream broke off or was malformed" if broke_off else "could not connect"
        return ProviderError("LLM_ERROR", f"{name} request failed: {where}", retryable=True)
    retryable = isinstance(status, int) and status >= 500
    prefix = f"{name} error (HTTP {status})" if isinstance(status, int) else f"{name} error"
    too_long = isinstance(error, exc.ContextWindowExceededError)  # litellm reads each provider's wording
    return ProviderError(
        "LLM_ERROR",
        f"{prefix}: {_upstream_message(error, request)}",
        retryable=retryable,
        # A 503 (or 529) may say when to come back: a model group cools the deployment for that long.
        retry_after=retry_after_seconds(response_headers(error)) if retryable else None,
        status=status,
        upstream_code=CONTEXT_LENGTH_EXCEEDED if too_long else None,
    )


def _transport_failure(error: BaseException) -> str | None:
    """ "timeout" or "connection" when the chain of causes holds a transport error, else None."""
    import httpx
    import openai

    seen: BaseException | None = error
    for _ in range(8):  # the chain is short; the bound only guards against cycles
        if seen is None:
            return None
        if isinstance(seen, (TimeoutError, httpx.TimeoutException, openai.APITimeoutError)):
            return "timeout"
        if isinstance(seen, (ConnectionError, httpx.TransportError, openai.APIConnectionError)):
            return "connection"
        seen = seen.__cause__ or seen.__context__ or getattr(seen, "original_exception", None)
    return None


def _upstream_message(error: Exception, request: ProviderRequest) -> str:
    text = getattr(error, "message", None) or str(error)
    text = _NOISE.sub("", text).split("\n", 1)[0].split(" Original exception:", 1)[0].strip()
    return _scrub(text, request.api_key)[:500] or "no details"


def _scrub(text: str, api_key: str | None) -> str:
    if api_key:
        text = text.replace(api_key, "[redacted]")
    return _KEY_LIKE.sub("[redacted]", text)
