"""One stateless provider call for the drop-in ``/v1`` endpoints that translate (docs/protocol.md).

The client sends the whole conversation; no context section or gateway tool is added, and no tool is run:
the provider's events go back to the client as they are, and the call goes through the one lifecycle of
every provider call (``agentspace.calls.ProviderCall``: admitted and written ahead by the endpoint before
``start``). Usage the provider reported is kept; what it did not report is counted locally.

    call = ProviderCall(gw, model, session_id=..., client=caller, endpoint="openai")
    await call.admit(lambda: request_ceiling(request)) # ApiError: answer the refusal
    direct = DirectCall(gw, request, call)
    try:
        await direct.start()                           # ProviderError (recorded)
        async for event in direct.events(): ...        # or direct.abort() when the client left
    finally:
        await call.release()
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from .calls import ProviderCall, cut_short_usage, request_input_tokens
from .events import (
    ProviderError,
    ProviderEvent,
    ProviderFinish,
    ReasoningDelta,
    TextDelta,
    ToolCallEvent,
    UsageReport,
)
from .providers.base import ProviderRequest, lacks_key, provider_stream
from .registry import ModelNotFound, Registry
from .tokens import count_tokens
from .types import TokenUsage, UsageRecord
from .vault import missing_key_message

__all__ = ["DirectCall", "request_input_tokens"]


class DirectCall:
    """A provider stream being relayed: ``await call.start()``, then ``async for event in call.events()``.

    Exactly one usage record per call: on the finish (awaited before the finish is handed on, so it is
    durable before the client's stream ends), on an error, or on ``abort()`` when the client went away.
    """

    def __init__(self, gw: Registry, request: ProviderRequest, meter: ProviderCall) -> None:
        self.gw = gw
        self.request = request
        self.meter = meter
        self._stream: AsyncIterator[ProviderEvent] | None = None
        self._first: ProviderEvent | None = None
        self._output: list[str] = []  # what the model produced so far, for a local count
        self._answered = False  # the provider sent its first event
        self._reported: TokenUsage | None = None  # the usage the provider last reported mid-stream
        self._output_at_report = 0  # how much of ``_output`` there was when it did

    async def start(self) -> None:
        """Send the request and wait for the first event; ProviderError (recorded) when the call failed
        before the model produced anything."""
        try:
            provider = self.gw.provider_for(self.request.model)
        except ModelNotFound as e:
            raise ProviderError("MODEL_NOT_FOUND", str(e), status=404) from None
        self.meter.begin(self.request.system, self.request.messages)
        request = self.request
        if await lacks_key(provider, request.model, request.api_key, request.base_url):
            # A plugin provider's ``missing_key``: refused as the built-in providers refuse a call without a key.
            prefix = request.model.split("/", 1)[0]
            await self._fail(ProviderError("NO_API_KEY", missing_key_message(prefix, self.gw.config)))
        self._stream = provider_stream(provider, self.request)
        try:
            self._first = await self._stream.__anext__()
            self._answered = True  # (the time to first output is the transport's: streams only)
            self.meter.answered()
        except StopAsyncIteration:
            await self._fail(ProviderError("LLM_ERROR", "The provider ended the stream without an answer."))
        except ProviderError as e:
            await self._fail(e)
        except asyncio.CancelledError:
            await asyncio.shield(asyncio.ensure_future(self.abort()))
            raise

    async def _fail(self, error: ProviderError) -> None:
        """A failure before any output: the upstream did not answer, nothing is billed."""
        if self.meter.recorded is None:
            await self.meter.record(TokenUsage(), "error", error=error.code, answered=False)
        raise error

    async def events(self) -> AsyncIterator[ProviderEvent]:
        """Every event of the call, the first included, ending with the ProviderFinish; a ProviderError after
        output has been produced is recorded with what was produced, then raised."""
        assert self._stream is not None, "start() first"
        event = self._first
        self._first = None
        try:
            while event is not None:
                kind = type(event)
                if kind is TextDelta or kind is ReasoningDelta:
                    self._output.append(event.text)  # type: ignore[union-attr]
                    self.meter.relayed(event.text)  # type: ignore[union-attr]
                elif kind is ToolCallEvent:
                    self._output.append(json.dumps(event.input, default=str))  # type: ignore[union-attr]
                elif kind is UsageReport:
                    reported: TokenUsage = event.usage  # type: ignore[union-attr,assignment]
                    self._reported, self._output_at_report = reported, len(self._output)
                    self.meter.note(reported)
                elif kind is ProviderFinish:
                    await self._record_finish(event)  # type: ignore[arg-type]
                    yield event
                    return
                yield event
                try:
                    event = await self._stream.__anext__()
                except StopAsyncIteration:
                    raise ProviderError(
                        "LLM_ERROR", "The provider ended the stream without finishing the answer."
                    ) from None
        except ProviderError as e:
            if self.meter.recorded is None:
                await self.meter.record(self._partial_usage(), "error", error=e.code)
            raise

    async def _record_finish(self, finish: ProviderFinish) -> None:
        if self.meter.call is not None:
            self.meter.call.answer = finish.message.text  # for the observation hooks
        # A provider that reports nothing: counted here, as a call cut short is.
        usage = finish.usage if finish.usage is not None else self._partial_usage()
        await self.meter.record(usage, finish.finish_reason)

    def _partial_usage(self) -> TokenUsage:
        """What a call without a final report used, by the one rule (``calls.cut_short_usage``)."""
        return cut_short_usage(
            self._reported,
            lambda: request_input_tokens(self.request),
            lambda: count_tokens("".join(self._output)),
            output_after_report=len(self._output) > self._output_at_report,
        )

    async def abort(self) -> UsageRecord | None:
        """The client went away: stop the provider (closing the upstream request) and record what was used."""
        stream, self._stream = self._stream, None
        close = getattr(stream, "aclose", None)
        if close is not None:
            try:
                await close()
            except (ProviderError, RuntimeError):
                pass  # a generator still running (cancelled mid-step) is closed by its own cancellation
        if self.meter.recorded is not None:
            return None
        if not self._answered:
            return await self.meter.record(TokenUsage(), "aborted", error="ABORTED", answered=False)
        return await self.meter.record(self._partial_usage(), "aborted")
