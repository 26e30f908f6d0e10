"""What a provider plugin implements. Registered through the ``register_providers`` hook."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol, runtime_checkable

from ..events import (
    ProviderError,
    ProviderEvent,
    ProviderFinish,
    ReasoningDelta,
    ResponseStarted,
    SourceEvent,
    TextDelta,
    ToolCallEvent,
    UsageReport,
)
from ..logs import warn_limited
from ..types import ChatMessage, ModelInfo, TokenUsage, Tool

log = logging.getLogger(__name__)

# The error message of a stream that ended before its answer was complete (every provider says the same).
INCOMPLETE_MESSAGE = "the upstream stream ended before the answer was complete"

# How messages name a provider prefix where ``str.capitalize()`` would be wrong.
DISPLAY_NAMES = {
    "openai": "OpenAI",
    "azure": "Azure OpenAI",
    "openrouter": "OpenRouter",
    "xai": "xAI",
    "deepseek": "DeepSeek",
    "ollama": "Ollama",
    "ollama_chat": "Ollama",
    "hosted_vllm": "vLLM",
    "vertex_ai": "Vertex AI",
    "together_ai": "Together AI",
    "fireworks_ai": "Fireworks AI",
}


def display_name(prefix: str) -> str:
    """``openai`` -> ``OpenAI``: a provider prefix as messages name it."""
    return DISPLAY_NAMES.get(prefix, prefix.capitalize())


def retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    """Seconds to wait from an error response's ``retry-after-ms`` or ``retry-after`` header (seconds or an
    HTTP date); None when there is none or it cannot be read (the pipeline's own backoff applies)."""
    if not headers:
        return None
    ms, value = headers.get("retry-after-ms"), headers.get("retry-after")
    try:
        if ms is not None:
            return max(0.0, float(ms) / 1000)
        if value is None:
            return None
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(str(value))
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(slots=True)
class ThinkingSettings:
    """Extended thinking for one call; ``adaptive`` sends ``{"type": "adaptive"}`` instead of the budget form.

    The pipeline sets ``adaptive`` for models that accept nothing else; providers also send it to models
    that accept both (the budget form is deprecated for them)."""

    budget_tokens: int = 8000
    adaptive: bool = False
    effort: str | None = None  # adaptive thinking's effort level (Anthropic's output_config.effort), if set
    # The client asked to see a summary of the thinking (the Responses API's ``reasoning.summary``): Anthropic's
    # ``thinking.display: "summarized"``, which Claude Opus 4.7 and later send only when asked (else "omitted").
    summarized: bool = False


@dataclass(slots=True)
class ProviderRequest:
    model: str  # the full id, e.g. "anthropic/claude-sonnet-4-6"
    system: str
    messages: list[ChatMessage]
    model_info: ModelInfo
    max_tokens: int = 4096
    tools: list[Tool] = field(default_factory=list)
    # Thinking as configured; providers apply it only to models that support it (``model_info`` or their API).
    thinking: ThinkingSettings | None = None
    api_key: str | None = None
    base_url: str | None = None
    # The provider's own [providers.NAME] table, for options beyond base_url and keys.
    options: dict[str, Any] = field(default_factory=dict)
    # Sampling parameters a /v1 client set: "temperature", "top_p", "stop" (a list of strings); each provider
    # passes on those its API takes.
    params: dict[str, Any] = field(default_factory=dict)
    # Prompt caching for a session the gateway keeps: the TTL ("5m", "1h") of the breakpoints a provider that
    # needs them places (agentspace.prompt_cache); None for /v1 requests and when caching is off.
    cache_ttl: str | None = None

    @property
    def prefix(self) -> str:
        return self.model.split("/", 1)[0]

    @property
    def model_name(self) -> str:
        """The id without our ``provider/`` prefix, as the upstream API knows it."""
        return self.model.split("/", 1)[1] if "/" in self.model else self.model


LEAST_THINKING_BUDGET = 1024  # Claude's APIs refuse a smaller budget_tokens


def budget_max_tokens(request: ProviderRequest) -> tuple[int, int]:
    """``max_tokens`` and the thinking budget as the budget form of extended thinking sends them: the budget
    is part of ``max_tokens``, so a budget at or above it gets the configured room for the answer on top,
    within the model's output limit."""
    assert request.thinking is not None
    budget, max_tokens = request.thinking.budget_tokens, request.max_tokens
    if max_tokens <= budget:
        max_tokens = budget + request.max_tokens
        limit = request.model_info.max_output_tokens
        if limit and max_tokens > limit:
            max_tokens, budget = limit, min(budget, limit - 1)
    return max_tokens, budget


def upstream_output_tokens(request: ProviderRequest) -> int:
    """The most output tokens ``request`` asks the upstream for: ``max_tokens`` with the thinking budget as
    the providers send it (the budget form is the larger one; adaptive thinking stays within ``max_tokens``)."""
    if request.thinking is None or request.thinking.adaptive:
        return request.max_tokens
    return budget_max_tokens(request)[0]


@runtime_checkable
class Provider(Protocol):
    """A source of model output.

    ``claims`` says whether this provider serves a model id; the first registered provider that claims
    an id serves it (built-in catch-alls are registered last). ``stream`` yields text, reasoning, source
    and tool-call events and ends with exactly one ``ProviderFinish``; failures raise ``ProviderError``.

    Optionally, ``async def missing_key(model, api_key, base_url) -> bool`` says whether a call to ``model``
    would fail for want of an API key (``api_key`` is what the vault or the environment holds, maybe None);
    the gateway then answers ``NO_API_KEY`` before creating a session or calling anything. Providers
    without it (keyless ones) are never refused for a missing key.
    """

    name: str

    def claims(self, model: str) -> bool: ...

    def stream(self, request: ProviderRequest) -> AsyncIterator[ProviderEvent]: ...


# How long a plugin provider's ``missing_key`` may take before the call goes ahead without its answer.
MISSING_KEY_SECONDS = 5.0

# The methods a provider may define besides the protocol's, each documented in docs/plugins.md.
OPTIONAL_PROVIDER_METHODS = ("models", "model_info", "missing_key", "aclose")


async def lacks_key(provider: Provider, model: str, api_key: str | None, base_url: str | None) -> bool:
    """True when ``provider`` says a call to ``model`` needs a key that ``api_key`` does not supply."""
    check = getattr(provider, "missing_key", None)
    if check is None:
        return False
    name = getattr(provider, "name", type(provider).__name__)
    try:
        if is_builtin(provider):  # litellm's may import litellm first, which takes seconds
            return bool(await check(model, api_key, base_url))
        # A plugin's that waits on a service that does not answer would hold every call and model list.
        return bool(await asyncio.wait_for(check(model, api_key, base_url), MISSING_KEY_SECONDS))
    except TimeoutError:
        log.warning(
            "provider %r: missing_key(%r) took over %.0fs; the call goes ahead", name, model, MISSING_KEY_SECONDS
        )
        return False
    except Exception as e:  # a plugin's bug: the call goes ahead, and its provider says what is wrong
        log.warning("provider %r: missing_key(%r) failed: %s: %s", name, model, type(e).__name__, e)
        return False


def claims(provider: Provider, model: str) -> bool:
    """``provider.claims(model)``; one that raises (a plugin's bug: ``MODELS[model]`` for an id it does not
    know) is logged naming the provider and claims nothing, so that the other providers' models still work."""
    try:
        return bool(provider.claims(model))
    except Exception as e:
        name = getattr(provider, "name", type(provider).__name__)
        warn_limited(log, f"claims:{name}", "provider %r: claims(%r) failed: %s: %s", name, model, type(e).__name__, e)
        return False


def is_builtin(provider: object) -> bool:
    """Whether ``provider`` is one of agentspace's own (Anthropic, litellm), whose models litellm's cost map lists;
    a plugin's provider says itself which ids it serves (``claims``, ``models()``)."""
    return type(provider).__module__.startswith("agentspace.")


def provider_stream(provider: Provider, request: ProviderRequest) -> AsyncIterator[ProviderEvent]:
    """``provider.stream(request)``. A plugin's stream that raises what is no ``ProviderError`` (a bug, its HTTP
    client's own error) fails as the built-in providers fail, with ``LLM_ERROR``: recorded and answered as a
    failed call, not a 500 or a cut stream; so does one yielding events of the wrong types (``_wrong_event``),
    and a finish reason outside the protocol's goes on as "other". The built-ins' streams go unwrapped."""
    if is_builtin(provider):
        return provider.stream(request)
    return _guarded(provider, request)


async def _guarded(provider: Provider, request: ProviderRequest) -> AsyncIterator[ProviderEvent]:
    stream: AsyncIterator[ProviderEvent] | None = None
    name = getattr(provider, "name", type(provider).__name__)
    finished = False
    try:
        stream = provider.stream(request)
        async for event in stream:
            wrong = _wrong_event(event)
            if wrong:
                log.error("provider %r on %s: %s", name, request.model, wrong)
                raise ProviderError("LLM_ERROR", f"The {name} provider {wrong}.")
            if type(event) is ProviderFinish:
                if event.finish_reason not in FINISH_REASONS:
                    # Another value (a provider's own "end_turn") would reach WebSocket clients as it is.
                    warn_limited(
                        log,
                        f"finish-reason:{name}",
                        "provider %r on %s finished %.60r, which is none of %s; sent as 'other'",
                        name,
                        request.model,
                        event.finish_reason,
                        ", ".join(sorted(FINISH_REASONS)),
                    )
                    event = replace(event, finish_reason="other")
                finished = True
            yield event
        if finished:
            return
        log.error("provider %r on %s ended its stream without a ProviderFinish", name, request.model)
        raise ProviderError("LLM_ERROR", f"The {name} provider ended its stream without finishing the answer.")
    except ProviderError:
        raise
    except Exception as e:
        log.error("provider %r failed on %s", name, request.model, exc_info=e)
        # Its message may quote a URL or a key: the client gets the exception's type only.
        raise ProviderError("LLM_ERROR", f"The {name} provider failed ({type(e).__name__}); see the server log.") from e
    finally:
        close = getattr(stream, "aclose", None)
        if close is not None:
            await close()


# The finish reasons of the protocol (docs/plugins.md); a plugin's other reason reaches clients as "other".
FINISH_REASONS = frozenset({"stop", "length", "tool-calls", "content-filter", "error", "other"})
_EVENT_TYPES = (TextDelta, ReasoningDelta, SourceEvent, ToolCallEvent, UsageReport, ResponseStarted, ProviderFinish)
_TOKEN_FIELDS = tuple(f.name for f in fields(TokenUsage) if f.name.endswith("_tokens"))  # the counts


def _wrong_event(event: object) -> str | None:
    """What is wrong with an event a plugin's provider yielded, in words for its author; None when nothing is.
    The gateway would otherwise drop an unknown event without a word, or fail on a wrong field later, as its
    own error and with no usage record."""
    if not isinstance(event, _EVENT_TYPES):
        return f"yielded a {type(event).__name__}, which is no provider event"
    if isinstance(event, (TextDelta, ReasoningDelta)) and not isinstance(event.text, str):
        return f"yielded a {type(event).__name__} whose text is a {type(event.text).__name__}, not a str"
    usage = event.usage if isinstance(event, (ProviderFinish, UsageReport)) else None
    if usage is not None:
        if not isinstance(usage, TokenUsage):
            return f"yielded a {type(event).__name__} whose usage is a {type(usage).__name__}, not a TokenUsage"
        for key in _TOKEN_FIELDS:
            value = getattr(usage, key)
            if type(value) is not int or value < 0:
                return f"reported {key} = {value!r}, not a whole number of tokens from 0"
    if isinstance(event, ProviderFinish):
        if not isinstance(event.finish_reason, str):
            return f"finished with a finish_reason that is a {type(event.finish_reason).__name__}, not a str"
        if not isinstance(event.message, ChatMessage):
            return f"finished with a message that is a {type(event.message).__name__}, not a ChatMessage"
    return None


def model_prefix(model: str) -> str:
    return model.split("/", 1)[0] if "/" in model else ""
