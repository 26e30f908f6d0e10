"""A ``/v1`` call to a model group (routing.py): ``DirectCall`` over the group's deployments; and a call to a
model with ``[models] fallbacks``, tried like a group of one deployment with those fallbacks.

``start`` tries the deployments in the order the group's strategy gives until one sends its first output;
nothing has been written to the client before that, so a failed attempt moves on unseen. Each attempt is a
provider call of its own (``calls.ProviderCall``): the first is the one the endpoint admitted, the next ones
are admitted here, and a failed one is recorded with ``answered: false``. Then the fallbacks, the same way.

    call = await start_direct(gw, request, meter)   # ProviderError: every attempt failed (all recorded)
    try: ... call.events() ...
    finally: await meter.release(); await call.meter.release()
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from .calls import Ceiling, ProviderCall, request_ceiling
from .direct_call import DirectCall
from .errors import ApiError
from .events import (
    ProviderError,
    ProviderEvent,
    ProviderFinish,
    ReasoningDelta,
    ResponseStarted,
    TextDelta,
    ToolCallEvent,
    UsageReport,
)
from .providers.base import ProviderRequest
from .registry import Registry
from .routing import Deployment, Group, all_cooling_error, deployment_request, moves_on, named_key_error
from .types import TokenUsage, UsageRecord

OUTPUT_EVENTS = (TextDelta, ReasoningDelta, ToolCallEvent)
BEFORE_OUTPUT = (UsageReport, ResponseStarted)  # the upstream answered, nothing to relay yet: held by ``start``


class HeldCall(DirectCall):
    """A DirectCall whose ``start`` returns at the model's first output (or its finish): what comes before it
    (the usage an upstream reports as it begins, or that it answered at all) is held, so a stream that breaks
    before its first token has relayed nothing, and may move on to another deployment or fallback. ``whole``
    (a call answered in one body, not streamed): held up to its finish, since nothing of it reaches the client
    before, so one that breaks mid-answer moves on too."""

    def __init__(self, gw: Registry, request: ProviderRequest, meter: ProviderCall, whole: bool = False) -> None:
        super().__init__(gw, request, meter)
        self._whole = whole
        self._held: list[ProviderEvent] = []
        self._events: AsyncIterator[ProviderEvent] | None = None

    async def start(self) -> None:
        """Send the request and read up to its first output; ProviderError (recorded) when it failed before."""
        try:
            await super().start()
            self._events = self._upstream()
            while True:
                try:
                    event = await self._events.__anext__()  # ProviderError: recorded with what was reported
                except StopAsyncIteration:
                    return
                self._held.append(event)
                if type(event) is ProviderFinish or not (self._whole or type(event) in BEFORE_OUTPUT):
                    return
        except asyncio.CancelledError:
            await asyncio.shield(asyncio.ensure_future(self.abort()))
            raise

    def _upstream(self) -> AsyncIterator[ProviderEvent]:
        return DirectCall.events(self)

    async def events(self) -> AsyncIterator[ProviderEvent]:
        assert self._events is not None, "start() first"
        held, self._held = self._held, []
        for event in held:
            yield event
        async for event in self._events:
            yield event


class RoutedCall(HeldCall):
    """A HeldCall on one deployment: its end (or abort) tells the group's state."""

    def __init__(
        self, gw: Registry, request: ProviderRequest, meter: ProviderCall, dep: Deployment, whole: bool = False
    ) -> None:
        super().__init__(gw, request, meter, whole)
        self.deployment = dep
        self._open = True
        self._starting = False  # in ``start``: a failure there is the caller's to count (``failed``)
        self._first_token = 0.0

    async def start(self) -> None:
        """The group's request made the deployment's (its key missing from the vault fails it, recorded), sent,
        and read up to its first output; ProviderError (recorded) when it failed before that."""
        try:
            self.request = deployment_request(self.gw, self.request, self.deployment)
        except ProviderError as e:
            self.meter.begin(self.request.system, self.request.messages)
            await self._fail(e)
        self._starting = True
        try:
            await super().start()
        finally:
            self._starting = False

    async def _done(self, tokens: int, failed: ProviderError | None = None) -> None:
        if self._open and not self._starting:
            self._open = False
            if failed is not None and moves_on(failed):  # broke after its first token: a failure, as on a turn
                router = self.gw.router
                await router.count_failure(router.groups[self.deployment.group], self.deployment, failed)
                return
            recorded = self.meter.recorded
            if not tokens and recorded is not None:  # cut short (the client left): what its record bills
                tokens = recorded.usage.input_tokens + recorded.usage.output_tokens
            ttft = (self._first_token - self.meter.started) * 1000 if self._first_token else None
            await self.gw.router.state.done(self.deployment.id, tokens, ttft)

    def _upstream(self) -> AsyncIterator[ProviderEvent]:
        return self._measured()

    async def _measured(self) -> AsyncIterator[ProviderEvent]:
        tokens = 0
        cancelled = False
        failed: ProviderError | None = None
        try:
            async for event in DirectCall.events(self):
                kind = type(event)
                if not self._first_token and kind in OUTPUT_EVENTS:
                    self._first_token = time.monotonic()  # the deployment's TTFT: its first output, not its headers
                elif kind is ProviderFinish and event.usage is not None:  # type: ignore[union-attr]
                    tokens = event.usage.input_tokens + event.usage.output_tokens  # type: ignore[union-attr]
                yield event
        except asyncio.CancelledError:
            # The client left: the transport's ``abort`` records what the call used, then ends it with that.
            cancelled = True
            raise
        except ProviderError as e:
            failed = e
            raise
        finally:
            if not cancelled:
                await self._done(tokens, failed)

    async def abort(self) -> UsageRecord | None:
        try:
            return await super().abort()
        finally:
            await self._done(0)


async def start_direct(
    gw: Registry, request: ProviderRequest, meter: ProviderCall, *, whole: bool = False
) -> DirectCall:
    """Start ``request`` (admitted as ``meter``): a plain DirectCall for a model, over the deployments for a
    group, then along the model's ``[models] fallbacks`` when ``meter`` may fall back (``meter.fallbacks``).
    ``whole``: the answer goes to the client in one body (not streamed), so an attempt may move on until its
    finish (``HeldCall``). The returned call's ``meter`` is the attempt that answered; the caller releases it
    and ``meter``."""
    group = gw.router.group(request.model)
    if group is not None:
        return await _start_group(gw, request, meter, group, [], whole)
    fallbacks = model_fallbacks(meter, request.model)
    if not fallbacks:
        call = DirectCall(gw, request, meter)
        await call.start()
        return call
    # A model with fallbacks: tried like a group's one deployment, then its fallbacks like a group's.
    held = HeldCall(gw, request, meter, whole)
    try:
        await held.start()
        return held
    except ProviderError as e:
        if not moves_on(e):  # the request's own fault (a 400): it would fail on any model
            raise
        return await _start_fallbacks(gw, request, meter, None, fallbacks, [request.model], e, whole)


async def _start_group(
    gw: Registry, request: ProviderRequest, meter: ProviderCall, group: Group, seen: list[str], whole: bool
) -> DirectCall:
    router = gw.router
    seen.append(group.name)
    deployments, busy = await router.order(group, meter.input_tokens)
    last: ProviderError | None = None
    current: ProviderCall | None = meter
    for dep in deployments:
        if not await router.state.take(dep.id, dep.rpm):
            continue
        try:
            current = current or await _next_meter(gw, request, meter)
        except BaseException:
            await router.state.done(dep.id, 0, None)
            raise
        current.route(dep.model, dep.id)  # the record prices the deployment's model
        call = RoutedCall(gw, request, current, dep, whole)
        try:
            await call.start()
            return call
        except ProviderError as e:
            call._open = False
            if not moves_on(e):  # the request's own fault (a 400): not counted against the deployment
                await router.state.done(dep.id, 0, None)
                raise
            await router.count_failure(group, dep, e)
            last = named_key_error(dep, e)
        except BaseException:
            await call._done(0)
            raise
        if current is not meter:
            await current.release()
        current = None
    failed = last or all_cooling_error(group, busy)
    return await _start_fallbacks(gw, request, meter, current, group.fallbacks, seen, failed, whole)


async def _start_fallbacks(
    gw: Registry,
    request: ProviderRequest,
    meter: ProviderCall,
    current: ProviderCall | None,
    fallbacks: Sequence[str],
    seen: list[str],
    failed: ProviderError,
    whole: bool,
) -> DirectCall:
    """The fallbacks of a call whose model or group ``failed`` before anything reached the client, in order,
    each an attempt of its own (admitted here; ``current``: one admitted already and not used), until one sends
    its first output. A fallback the client may not use is skipped, a group's deployments are tried in turn.
    ProviderError (the last failure) when none answered."""
    router = gw.router
    last = failed
    for fallback in fallbacks:
        if fallback in seen:
            continue
        try:
            current = current or await _next_meter(gw, request, meter)
            if not await may_use(current, fallback):  # each fallback checked on its own, a group too
                continue
            inner = router.group(fallback)
            if inner is not None:
                return await _start_group(gw, request, current, inner, seen, whole)
            current.route(fallback, None)  # the record (and a recovery) prices the fallback's model
            plain = HeldCall(gw, _model_request(gw, request, fallback), current, whole)
            await plain.start()
            return plain
        except ProviderError as e:
            if current is not None and current is not meter:
                await current.release()  # recorded already, or never used (an inner group all cooling down)
            current = None
            if not moves_on(e):  # the request's own fault (a 400): not tried on another model
                raise
            last = e
        except BaseException:
            if current is not None and current is not meter:
                await current.release()  # the client left: an attempt not sent yet gives its reservation back
            raise
    if current is not None and current is not meter:
        await current.release()  # admitted for a fallback the client may not use
    raise last


async def _next_meter(
    gw: Registry, request: ProviderRequest, first: ProviderCall, ceiling: Callable[[], Ceiling] | None = None
) -> ProviderCall:
    """The provider call of the next attempt, admitted like the first: ApiError when refused, answered as a
    refusal of the first attempt is (a budget spent meanwhile is BUDGET_EXCEEDED, a shutdown begun meanwhile
    SERVICE_UNAVAILABLE, in each API's shape), not as a failure of the provider."""
    meter = ProviderCall(
        gw,
        request.model,
        session_id=first.session_id,
        client=first.client,
        endpoint=first.endpoint,
        credential=first.credential,
        fallbacks=first.fallbacks,  # reserved like the first: at the dearest model the call may end up on
    )
    meter.started = time.monotonic()
    meter.continues = True
    await meter.admit(ceiling or (lambda: request_ceiling(request)))
    return meter


def model_fallbacks(call: ProviderCall, model: str) -> list[str]:
    """The ``[models] fallbacks`` of ``model`` outside any group, when ``call`` may fall back (the model the
    client asked for; a fallback does not go on to its own)."""
    return call.gw.config["models"]["fallbacks"].get(model, []) if call.fallbacks else []


async def may_use(call: ProviderCall, model: str) -> bool:
    """Whether ``call``'s client may use ``model`` (a fallback it may not use is skipped)."""
    try:
        await call.gw.guard.check_model(call.client or "admin", model)
    except ApiError:
        return False
    return True


def _model_request(gw: Registry, request: ProviderRequest, model: str) -> ProviderRequest:
    """``request`` for a fallback model outside any group, with that provider's key and settings."""
    from dataclasses import replace

    from .vault import resolve_key

    prefix = model.split("/", 1)[0]
    settings = gw.config.provider_settings(prefix)
    info = gw.model_info(model)
    max_tokens = request.max_tokens  # the first model's output limit may pass this one's, which would refuse it
    if info.max_output_tokens:
        max_tokens = min(max_tokens, info.max_output_tokens)
    return replace(
        request,
        model=model,
        model_info=info,
        max_tokens=max_tokens,
        api_key=resolve_key(gw.config, prefix),
        base_url=settings["base_url"],
        options=settings,
    )


async def embed_group(
    gw: Registry,
    request: ProviderRequest,
    meter: ProviderCall,
    group: Group,
    inputs: list[Any],
    options: dict[str, Any],
    ceiling: Callable[[], Ceiling],
) -> tuple[list[Any], TokenUsage | None, ProviderCall]:
    """``/v1/embeddings`` over a group's deployments (embedding models litellm serves), in the order of its
    strategy: a failed attempt is recorded (``answered: false``), counted against its deployment, and the next
    one tried. The group's fallbacks are not (an embedding's vectors are its model's own). Returns the vectors,
    the usage reported, and the attempt that answered, for the caller to record and release (with ``meter``);
    ProviderError when every attempt failed (all recorded)."""
    from .providers import litellm as litellm_provider

    router = gw.router
    deployments, busy = await router.order(group, meter.input_tokens)
    last: ProviderError | None = None
    current: ProviderCall | None = meter
    for dep in deployments:
        if not await router.state.take(dep.id, dep.rpm):
            continue
        try:
            current = current or await _next_meter(gw, request, meter, ceiling)
        except BaseException:
            await router.state.done(dep.id, 0, None)
            raise
        current.route(dep.model, dep.id)
        current.begin()
        current.sent_whole()
        try:
            vectors, usage = await litellm_provider.embed(
                gw.config, deployment_request(gw, request, dep), inputs, options
            )
        except ProviderError as e:
            await current.record(TokenUsage(), "error", error=e.code, answered=False)
            if current is not meter:
                await current.release()
            if not moves_on(e):  # the request's own fault (a 400): not counted against the deployment
                await router.state.done(dep.id, 0, None)
                raise
            await router.count_failure(group, dep, e)
            last, current = e, None
            continue
        except BaseException as e:
            await router.state.done(dep.id, 0, None)
            if isinstance(e, asyncio.CancelledError):  # the client left: the attempt went upstream, billed its input
                await current.left_whole()
            if current is not meter:
                await current.release()
            raise
        await router.state.done(dep.id, usage.input_tokens if usage is not None else 0, None)
        return vectors, usage, current
    raise last or all_cooling_error(group, busy)


# --- the Anthropic pass-through ---------------------------------------------------------------------


def relays(group: Group) -> bool:
    """Whether ``/v1/messages`` passes a group's calls through as they are: all its deployments are Anthropic's."""
    return all(d.model.startswith("anthropic/") for d in group.deployments)


def relayed_error(response: Any) -> ProviderError | None:
    """A pass-through answer that wrote nothing to the client, as the error it is; None when it answered (or
    began to)."""
    from .providers.base import retry_after_seconds

    status = response.status
    if response.prepared or status == 200:
        return None
    return ProviderError(
        "RATE_LIMITED" if status == 429 else "LLM_ERROR",
        f"HTTP {status}",
        status=status,
        retry_after=retry_after_seconds(response.headers),
    )


def relay_moves_on(error: ProviderError) -> bool:
    """Whether a pass-through that failed this way (``relayed_error``) goes on to another deployment or
    fallback: as a translated call does (``moves_on``), and when the gateway's key is missing or refused (424:
    the relay answers it, where a translated call fails with NO_API_KEY)."""
    return moves_on(error) or error.status == 424


async def relay_fallbacks(
    meter: ProviderCall,
    model: str,
    group: Group | None,
    seen: list[str],
    response: Any,
    answer: Callable[[str], Awaitable[Any]],
) -> Any:
    """The pass-through ``response`` of ``model`` (``group`` when it names one, admitted as ``meter``) when it
    failed before anything reached the client (``relay_moves_on``): the group's fallbacks (or the model's,
    ``model_fallbacks``) in order, each ``answer``ed as a call of its own, until one does not fail so. A
    fallback tried already (``seen``) or that the client may not use is skipped, as ``start_direct`` does for
    a translated call. Returns the last response."""
    seen.append(model)
    fallbacks = group.fallbacks if group is not None else model_fallbacks(meter, model)
    for fallback in fallbacks:
        error = relayed_error(response)
        if error is None or not relay_moves_on(error):
            break
        if fallback in seen or not await may_use(meter, fallback):
            continue
        seen.append(fallback)
        response = await answer(fallback)
    return response


async def relay_group(
    request: Any, gw: Registry, body: dict[str, Any], raw: bytes, meter: ProviderCall, group: Group
) -> Any:
    """The pass-through over a group's deployments (``relays``): each attempt relayed with its deployment's key
    and base_url; an answer that failed before anything was written to the client (an error status, or no
    connection) moves to the next deployment. The group's fallbacks are not tried here (their providers may
    not speak the Messages API): the last failure is answered. Returns the response; the caller releases
    ``meter``."""
    from aiohttp import web

    from .calls import messages_body_ceiling
    from .protocols import anthropic_messages as am
    from .providers import anthropic_relay as relay
    from .routing import deployment_key, missing_key_error

    router = gw.router
    deployments, busy = await router.order(group, meter.input_tokens)
    current: ProviderCall | None = meter
    response: web.StreamResponse | None = None
    for dep in deployments:
        if not await router.state.take(dep.id, dep.rpm):
            continue
        try:
            if current is None:
                current = ProviderCall(
                    gw,
                    group.name,
                    session_id=meter.session_id,
                    client=meter.client,
                    endpoint=meter.endpoint,
                    credential=meter.credential,
                )
                current.continues = True
                try:
                    await current.admit(lambda: messages_body_ceiling(gw, group.name, body))
                except ApiError:
                    await router.state.done(dep.id, 0, None)
                    break  # refused now (budget, rate): the last failure is the answer
            current.route(dep.model, dep.id)
            key = deployment_key(gw.config, dep)
            if key is None and dep.key is not None:  # its vault entry is missing: failed, never another key
                missing = missing_key_error(dep)
                await current.record(TokenUsage(), "error", error=missing.code, answered=False)
                response = web.json_response(am.error_body(424, missing.message), status=424)
            else:
                response = await relay.messages(
                    request,
                    gw,
                    body,
                    raw,
                    dep.model,
                    current,
                    key=key,
                    base_url=dep.base_url or gw.config.provider_settings("anthropic")["base_url"],
                )
        except BaseException:
            await router.state.done(dep.id, 0, None)
            raise
        error = relayed_error(response)
        broke = current.recorded.error if current.recorded is not None else None
        if error is None and broke not in (None, "ABORTED") and moves_on(ProviderError(broke, "")):
            # Relayed, then broken off (an error event mid-stream): a failure of the deployment, as on a turn.
            await router.count_failure(group, dep, ProviderError(broke, ""))
            return response
        if error is None:
            usage = current.recorded.usage if current.recorded is not None else None
            ttft = (current.first_at - current.started) * 1000 if current.first_at is not None else None
            await router.state.done(dep.id, usage.input_tokens + usage.output_tokens if usage else 0, ttft)
            return response
        if not relay_moves_on(error):
            await router.state.done(dep.id, 0, None)  # the request's own fault: not counted against it
            return response
        await router.count_failure(group, dep, error)
        # The key refused: name the deployment's entry, not the provider's.
        if error.status == 424 and dep.key is not None:
            named = named_key_error(dep, ProviderError("NO_API_KEY", "", status=424))
            response = web.json_response(am.error_body(424, named.message), status=424)
        if current is not meter:
            await current.release()
        current = None
    if current is not None and current is not meter:
        await current.release()
    if response is not None:
        return response
    error = all_cooling_error(group, busy)
    headers = {"retry-after": f"{error.retry_after:.0f}"} if error.retry_after is not None else None
    return web.json_response(
        {"type": "error", "error": {"type": "rate_limit_error", "message": error.message}}, status=429, headers=headers
    )


async def count_group_tokens(request: Any, gw: Registry, body: dict[str, Any], raw: bytes, group: Group) -> Any:
    """``/v1/messages/count_tokens`` for a group: the count of its first Anthropic deployment (in the group's
    order) whose upstream gives one, with that deployment's key and base_url: an error answer moves to the
    next, and is answered when it was the last. None when none answers (the caller counts locally). A count is
    no call: it takes no place in the deployments' state."""
    from .providers import anthropic_relay as relay
    from .routing import deployment_key

    deployments, _ = await gw.router.order(group)
    failed = None
    for dep in deployments:
        key = deployment_key(gw.config, dep)
        if not dep.model.startswith("anthropic/") or key is None:
            continue
        base_url = dep.base_url or gw.config.provider_settings("anthropic")["base_url"]
        relayed = await relay.count_tokens(request, gw, body, raw, dep.model, key=key, base_url=base_url)
        if relayed is not None and relayed.status == 200:
            return relayed
        failed = relayed or failed
    return failed
