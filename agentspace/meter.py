"""The one meter every provider call goes through, whatever the endpoint (SPEC section 6).

It makes the call's one ``UsageRecord``, prices it with the model's ``ModelInfo``, and fans it out to the
usage sinks (``Registry.record_usage``). Transports and the pipeline describe the call; the accounting
rules live here only:

- a call the upstream never answered (no key, refused, connection failed) bills nothing and is an error;
- usage the upstream reported is kept as reported; ``estimated_fields`` names what was counted locally.

Usage::

    meter = Meter(gw, model, session_id=..., client="admin", endpoint="anthropic")   # when the call starts
    ...
    await meter.record(usage, "stop")                    # durable once awaited (the built-in sink fsyncs)
    await meter.record(TokenUsage(), "error", error="RATE_LIMITED", answered=False)
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

from .observe import CallInfo, notify
from .types import ChatMessage, TokenUsage, UsageRecord, new_id, now_iso

if TYPE_CHECKING:
    from .limits import Reservation
    from .registry import Registry

# The usage fields a record may have counted locally, in UsageRecord.to_dict's names.
INPUT_FIELDS = ("inputTokens",)
OUTPUT_FIELDS = ("outputTokens",)
ALL_FIELDS = ("inputTokens", "outputTokens")


def usage_record(
    gw: Registry,
    *,
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
    purpose: str | None = None,
) -> UsageRecord:
    """The priced record of one provider call."""
    if not answered:
        usage = TokenUsage()  # the upstream never answered: nothing to bill, whatever was counted
        estimated_fields = ()
    fields = tuple(estimated_fields) or usage.estimated_fields
    if not fields and usage.estimated:
        fields = ALL_FIELDS  # counted locally as a whole
    usage = replace(usage, estimated=bool(fields), estimated_fields=fields)
    info = gw.model_info(model)
    return UsageRecord(
        id=new_id("usage_"),
        timestamp=now_iso(),
        model=model,
        provider=model.split("/", 1)[0],
        session_id=session_id,
        client=client,
        usage=usage,
        cost=info.cost(usage),
        latency_ms=latency_ms,
        finish_reason=finish_reason,
        price_known=info.price_known,
        error=error,
        answered=answered,
        attempts=attempts,
        endpoint=endpoint,
        ttft_ms=ttft_ms,
        purpose=purpose,
    )


def record_call(gw: Registry, record: UsageRecord, reservation: Reservation | None = None) -> Awaitable[UsageRecord]:
    """Send ``record`` to every sink. The sinks are called now (the built-in one queues its write at once);
    awaiting the result waits until they are done, i.e. the record is durable. The record settles the
    call's budget ``reservation``."""
    pending = gw.record_usage(record, reservation)

    async def settle() -> UsageRecord:
        await pending
        return record

    return settle()


class Meter:
    """One provider call being metered: what is known when it starts, and its clock."""

    __slots__ = (
        "gw",
        "model",
        "session_id",
        "client",
        "endpoint",
        "started",
        "attempts",
        "recorded",
        "first_at",
        "call",
        "reservation",
        "purpose",
    )

    def __init__(
        self,
        gw: Registry,
        model: str,
        *,
        session_id: str | None,
        client: str | None,
        endpoint: str | None,
        reservation: Reservation | None = None,
        purpose: str | None = None,
    ) -> None:
        self.gw = gw
        self.purpose = purpose  # a call the gateway made on its own account ("compact"), in the record
        self.model = model
        self.session_id = session_id
        self.client = client
        self.endpoint = endpoint
        self.started = time.monotonic()
        self.attempts = 1
        self.recorded: UsageRecord | None = None
        self.reservation = reservation  # the budget held for this call (limits.Guard.admit), settled by the record
        self.first_at: float | None = None  # when the first output was streamed (``first_output``)
        self.call: CallInfo | None = None  # for the observation hooks, from ``begin``

    def begin(self, system: str | None = None, messages: list[ChatMessage] | None = None) -> None:
        """The call goes to the upstream now: the observation hooks see it start, with its prompt when known
        (once; ``record`` calls it too, so every record has a started call). A request refused before this (a
        bad body) is no call."""
        if self.call is None:
            self.call = CallInfo(
                self.model,
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

    def record(
        self,
        usage: TokenUsage,
        finish_reason: str,
        *,
        error: str | None = None,
        answered: bool = True,
        estimated_fields: Iterable[str] = (),
    ) -> Awaitable[UsageRecord]:
        """Make the call's record and send it to the sinks; await the result for durability. Once per call."""
        if self.recorded is not None:
            raise RuntimeError("a provider call makes exactly one usage record")
        self.begin()
        self.recorded = usage_record(
            self.gw,
            model=self.model,
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
            ttft_ms=None if self.first_at is None else (self.first_at - self.started) * 1000,
            purpose=self.purpose,
        )
        notify(self.gw.pm.hook.provider_call_finished, call=self.call, record=self.recorded)
        return record_call(self.gw, self.recorded, self.reservation)
