"""Every read of litellm beyond its documented API, in one place.

litellm hides some facts the gateway needs: whether the provider itself ended the stream, whether the
provider (not litellm's own counting) reported the usage, the upstream's response headers on an error, and
what a failure inside a stream wrapped. These come from attributes of its stream wrapper and exceptions that
are not part of its public API, so an upgrade may rename them. ``tests/test_litellm_internals.py`` fails when
one of them changes; the functions here then fall back to what the public API says.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# What litellm (1.110 and later) raises when an OpenAI-style stream ends cleanly without a finish reason.
CLEAN_EOF = "Stream ended before a finish_reason was received"


def provider_finished(response: Any) -> bool:
    """Whether the provider sent a finish reason: litellm papers over a stream that ended early with a
    made-up "stop"; its ``CustomStreamWrapper`` keeps what it received. Unknown: trust the finish reason."""
    if not hasattr(response, "received_finish_reason"):
        return True
    return (
        response.received_finish_reason is not None or getattr(response, "intermittent_finish_reason", None) is not None
    )


def provider_sent_usage(response: Any) -> bool:
    """Whether the usage litellm yields came from the provider: litellm always yields a usage object,
    counting tokens itself when the provider sent none. Only the raw chunks its stream wrapper keeps show
    which case this is (usage-only chunks are kept there and never yielded). Unknown: trust it."""
    chunks = getattr(response, "chunks", None)
    if chunks is None:
        return True
    return any(getattr(c, "usage", None) is not None for c in reversed(chunks))


def response_headers(error: BaseException) -> Mapping[str, str] | None:
    """The upstream's headers of a failed call: litellm keeps them in ``litellm_response_headers``;
    ``error.response`` is often a synthetic ``httpx.Response`` without them."""
    headers = getattr(error, "litellm_response_headers", None)
    if headers:
        return headers
    return getattr(getattr(error, "response", None), "headers", None)


def unwrap_stream_failure(error: Exception) -> tuple[Exception, bool]:
    """(the failure, whether the stream broke off after its first chunk): failures of a started stream, and
    of lazily opened ones (Anthropic-family, Gemini, ...), arrive wrapped in a ``MidStreamFallbackError``."""
    from litellm import exceptions  # already imported by the call that failed

    if isinstance(error, exceptions.MidStreamFallbackError) and error.original_exception is not None:
        return error.original_exception, not error.is_pre_first_chunk
    return error, False
