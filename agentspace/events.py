"""The one internal event stream (docs/architecture.md).

Providers yield ``ProviderEvent``s for one model call. The pipeline turns one or more calls (the tool loop)
into ``StreamEvent``s, which the WebSocket and SSE transports only encode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .types import ChatMessage, Cost, TokenUsage, clean_text

# --- events a provider yields -------------------------------------------------------------------


@dataclass(slots=True)
class TextDelta:
    text: str


@dataclass(slots=True)
class ReasoningDelta:
    text: str


@dataclass(slots=True)
class SourceEvent:
    url: str
    title: str | None = None


@dataclass(slots=True)
class ToolCallEvent:
    """A complete tool call (arguments fully assembled)."""

    tool_call_id: str
    name: str
    input: Any


@dataclass(slots=True)
class ProviderFinish:
    """Last event of a provider call.

    ``usage`` is None when the provider reported none (the pipeline then counts locally and marks the
    record estimated). ``message`` is the whole assistant message in order, with reasoning signatures,
    so the tool loop can send it back unchanged.
    """

    finish_reason: str
    usage: TokenUsage | None
    message: ChatMessage


@dataclass(slots=True)
class UsageReport:
    """Usage the upstream reported during a call (Anthropic's ``message_start`` and ``message_delta``).

    Cumulative: a later report replaces an earlier one. A call that fails or is aborted before its
    ``ProviderFinish`` is billed with the last report, and only the output streamed after it is estimated
    (docs/accounting.md: what the upstream reported is never replaced by an estimate). Optional for providers.
    """

    usage: TokenUsage


@dataclass(slots=True)
class ResponseStarted:
    """The upstream answered; nothing to show yet (an OpenAI-format stream's first chunk, ``{"role":
    "assistant"}``). Yielded once, before any other event, by a provider whose upstream's first answer carries
    nothing else to yield: the call is then one the upstream took, and bills its input if it breaks off before
    its end (docs/accounting.md). Optional for providers; consumers mark the call answered and go on."""


ProviderEvent = (
    TextDelta | ReasoningDelta | SourceEvent | ToolCallEvent | UsageReport | ResponseStarted | ProviderFinish
)


# OpenAI's error code for an input past the model's context window (ProviderError.upstream_code).
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"


class ProviderError(Exception):
    """A provider call failed. ``code`` is one of the protocol's error codes.

    ``message`` must be safe to show to a client: no key material, no internal details.
    ``param`` names the request field a 400 is about, if one.
    ``retryable`` and ``retry_after`` let the pipeline retry before the first token reached the client.
    ``upstream_code`` is OpenAI's error code for what the upstream said, where a client acts on it
    (``context_length_exceeded``: Codex and the SDKs' users compact or trim on it).
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        retryable: bool = False,
        retry_after: float | None = None,
        status: int | None = None,
        param: str | None = None,
        upstream_code: str | None = None,
    ) -> None:
        message = clean_text(message)  # an upstream's words may hold a lone surrogate (types.clean_text)
        super().__init__(message)
        self.code = code
        self.param = param  # the request field a refusal names (OpenAI's error ``param``)
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after
        self.status = status
        self.upstream_code = upstream_code


# --- events the pipeline yields to transports ---------------------------------------------------


@dataclass(slots=True)
class StreamStart:
    session_id: str
    model: str
    message_id: str
    session_created: bool


@dataclass(slots=True)
class StepStart:
    step: int


@dataclass(slots=True)
class ToolResultEvent:
    tool_call_id: str
    name: str
    output: Any
    is_error: bool


@dataclass(slots=True)
class StepFinish:
    step: int
    finish_reason: str
    usage: TokenUsage
    cost: Cost


@dataclass(slots=True)
class StreamEnd:
    """The turn is over. ``usage`` and ``cost`` are the totals of every call of the turn."""

    finish_reason: str
    usage: TokenUsage
    cost: Cost
    aborted: bool = False
    ttft_ms: float | None = None  # time to the turn's first token, when one came


@dataclass(slots=True)
class StreamError:
    """The turn failed; what was generated before is already delivered and stored. ``retry_after``: the seconds
    to wait that the refusal said (a client's limit or budget, the upstream's ``retry-after``), as HTTP's
    ``Retry-After`` says them on the other transports."""

    code: str
    message: str
    retry_after: float | None = None


StreamEvent = (
    StreamStart
    | StepStart
    | TextDelta
    | ReasoningDelta
    | SourceEvent
    | ToolCallEvent
    | ToolResultEvent
    | StepFinish
    | StreamEnd
    | StreamError
)
