"""The one streaming pipeline (docs/architecture.md).

``start_turn`` checks a chat request, stores the user message and starts a ``Turn``: an asyncio task that
assembles the context, calls the provider (retrying and falling back before the first token), runs the
tool loop up to ``max_steps``, records one usage record per provider call, stores the assistant message,
and publishes ``StreamEvent``s. A plain chat is a loop of one step.

Durability (docs/architecture.md): the user message is stored (awaited) before the provider is called; the usage
records and the answer are stored before the end of the stream is published. A write that fails is not
reported as success: the turn ends with ``STORAGE_ERROR`` and the write is kept and retried
(``gw.pending``).

A turn does not belong to the client that started it: transports subscribe to its events (replaying
what was already published, which also serves resumable HTTP streams), and a client that goes away
leaves the turn running to the end, stored and billed (``[chat] on_disconnect = "finish"``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from . import attachments, tokens
from .calls import ProviderCall, ceiling_cost, cut_short_usage, price, request_ceiling
from .context import (
    AssembledContext,
    answer_tokens,
    answered_turns,
    assemble,
    estimate_input_tokens,
    first_message_key,
    history_start,
    history_window,
)
from .context_policy import fit_context
from .errors import ApiError, StorageError
from .events import (
    ProviderError,
    ProviderFinish,
    ReasoningDelta,
    SourceEvent,
    StepFinish,
    StepStart,
    StreamEnd,
    StreamError,
    StreamEvent,
    StreamStart,
    TextDelta,
    ToolCallEvent,
    ToolResultEvent,
    UsageReport,
)
from .logs import redact
from .observe import CallInfo, TurnInfo, notify
from .prompt_cache import cache_ttl, prefix_key
from .providers.base import ProviderRequest, ThinkingSettings, lacks_key, provider_stream
from .registry import ModelNotFound, Registry
from .routing import (
    Deployment,
    Group,
    all_cooling_error,
    deployment_key,
    deployment_request,
    moves_on,
    named_key_error,
)
from .session_locks import STREAM_IN_PROGRESS_MESSAGE
from .storage import InvalidSessionId, SessionNotFound
from .storage.protocols import set_aside_of
from .storage.shapes import validate_session_id
from .tokens import count_tokens
from .types import (
    LONE_SURROGATE,
    ChatMessage,
    Cost,
    FilePart,
    Part,
    ReasoningPart,
    SourcePart,
    TextPart,
    TokenUsage,
    ToolCallPart,
    ToolResultPart,
    clean_text,
    compact_json,
    new_id,
    now_iso,
    part_to_dict,
    usage_to_wire,
)
from .vault import missing_key_message, resolve_key

log = logging.getLogger(__name__)

# A Retry-After longer than this is not waited for: the call fails (or falls back) at once.
MAX_RETRY_WAIT_SECONDS = 30.0
# Writes that fail with these are the store's (disk full, I/O error): kept in memory and retried.
STORAGE_FAILURES = (StorageError, OSError)
STORAGE_ERROR_MESSAGE = "The answer could not be stored ({}); it is kept in memory and the write retried."
DELETED_MESSAGE = "The session was deleted while this answer streamed; the answer was not stored (its usage was)."


def storage_problem(e: BaseException | None) -> str:
    """What failed, for the client: a StorageError names its store (the database, the data directory, Redis);
    a bare OSError is a write to the data directory's disk."""
    if isinstance(e, StorageError) and e.message:
        message = e.message.rstrip(".")
        return message[0].lower() + message[1:]
    return "the gateway's disk may be full"


@dataclass
class ChatRequest:
    content: str
    session_id: str | None = None
    model: str | None = None
    # Who asks: a client's name (README.md#teams-and-budgets), "admin" for the gateway token; the session's owner.
    client: str = "admin"
    # Where the request came in: "ws" or "http" (the usage records' ``endpoint``).
    endpoint: str = "ws"
    # HTTP clients name their sessions: an unknown id creates the session instead of failing.
    create_if_missing: bool = False
    # Earlier messages a stateless client sent for a session the store does not know (stored form).
    import_messages: list[dict[str, Any]] = field(default_factory=list)
    # The client's own id for the user message (AI SDK clients have one), else one is made.
    user_message_id: str | None = None
    # The SHA-256 of the client key the caller authenticated with: each step checks it is still the key.
    credential: str | None = None
    # Images and documents the user message attaches (agentspace/attachments.py).
    files: list[FilePart] = field(default_factory=list)


async def _set_aside(gw: Registry, session_id: str, later: list[dict[str, Any]]) -> None:
    """Mark the messages after an edited or regenerated one ``replaced``: one write for them all (one entry and
    one sync on the embedded store, one transaction on PostgreSQL), so all or none are set aside."""
    if later:
        await set_aside_of(gw.sessions, session_id, [str(message["id"]) for message in later])


async def start_turn(gw: Registry, request: ChatRequest) -> Turn:
    """Validate, create the session if needed, store the user message, and start streaming."""
    await tokens.loaded()
    session = await _existing_session(gw, request)
    model = await _admitted_model(gw, request, session)
    # Media types, sizes and what the model reads: refused here, before anything is stored or sent.
    stored = session["messages"] if session else request.import_messages
    # A message answered again (a regenerate, an edit) brings its files again: the stored copy is not counted too.
    if (again := _answered_again(session, request.user_message_id)) is not None:
        stored = stored[:again]
    earlier = attachments.stored_files(stored)
    # The files a call resends: those of the history it sends (context.assemble), after the latest summary (the
    # summarised turns' are not sent again), within [chat] history_limit, and of turns that were answered (a turn
    # that failed before any output, the upstream refusing its file say, is resent by no call).
    start = history_start(stored)[0]
    window = history_window(stored[start:], gw.config["chat"]["history_limit"])
    resent = attachments.stored_files(answered_turns(window))
    files = await attachments.prepare(gw, model, earlier, request.files, resent=resent)
    imported = await attachments.prepare_imported(gw, request.import_messages, files) if session is None else []

    created = session is None
    session_id = (request.session_id or new_id("s_")) if session is None else session["id"]
    try:
        validate_session_id(session_id)
    except InvalidSessionId as e:
        raise ApiError("INVALID_MESSAGE", str(e)) from None
    # Checked and claimed with no await in between: a concurrent request for the same session (a first one
    # with the same client-chosen id included) is refused here, before it writes anything.
    if session_id in gw.locks:
        raise ApiError("STREAM_IN_PROGRESS", STREAM_IN_PROGRESS_MESSAGE)
    if gw.pending.holds(session_id):  # its last answer first: in order, and in the next turn's context
        raise ApiError(
            "STORAGE_ERROR",
            "The last answer of this session is not stored yet (the data directory refused it; the write is "
            "retried); nothing was sent. Try again once the gateway can write to its data directory.",
        )
    # The id of a user message the session holds: the client asks for its answer again (the AI SDK's regenerate,
    # a retry, an edit). The answers after it are set aside (``replaced``), and it is not stored a second time.
    user_message: dict[str, Any] = {
        "id": request.user_message_id or new_id("msg_"),
        "role": "user",
        "content": request.content,
        "parts": [{"type": "text", "text": request.content}] if request.content or not files else [],
        "createdAt": now_iso(),
    }
    turn = Turn(gw, session_id, model, request.client, created, user_message["id"], request.endpoint)
    turn.credential = request.credential
    turn.files = files
    turn.media_types = frozenset([*(str(p.get("mediaType")) for p in resent), *(f.media_type for f in files)])
    await gw.locks.claim(turn)  # here, and across replicas (README.md#running-several-replicas)
    # The user message is written now (a disk that refuses it refuses the turn) and durable before the provider
    # is called: its sync runs in the background, beside the context's assembly and the call's pending ledger
    # entry, and the call waits for both (ProviderCall.admit, docs/accounting.md).
    try:
        user_message["parts"] += await attachments.keep(gw, session_id, files)
        if session is None:
            history = await attachments.keep_imported(gw, session_id, imported)
            # A new session is written once, with its first messages.
            await gw.sessions.create(
                model=model,
                session_id=session_id,
                client=request.client,
                messages=[*history, user_message],
                sync=False,
            )
        elif again is not None:
            history = session["messages"][: again + 1]
            await _set_aside(gw, session_id, session["messages"][again + 1 :])
            changes: dict[str, Any] = {"error": None} if history[-1].get("error") else {}  # no longer its last word
            if (history[-1].get("content"), history[-1].get("parts")) != (
                user_message["content"],
                user_message["parts"],
            ):
                # Edited (the AI SDK's sendMessage with the message's id): the session keeps what is answered.
                changes.update(content=user_message["content"], parts=user_message["parts"])
            if changes:
                await gw.sessions.update_message(session_id, user_message["id"], changes)
        else:
            history = session["messages"]
            await gw.sessions.append_message(session_id, user_message, sync=False)
    except STORAGE_FAILURES as e:
        await gw.locks.release(turn)
        gw.locks.forget(turn)
        # The store's own failure (a full disk, the database down), answered STORAGE_ERROR: one line, no
        # traceback, as every outage (issue 27): a client retrying would fill the log with them.
        log.warning("storing the user message in session %s failed: %r", session_id, e)
        raise ApiError(
            "STORAGE_ERROR", f"The message could not be stored ({storage_problem(e)}); nothing was sent."
        ) from None
    except BaseException:
        await gw.locks.release(turn)
        gw.locks.forget(turn)
        raise
    turn.start(request.content, history)
    if gw.cluster is not None:
        gw.cluster.publish(turn)  # resumable and abortable from any replica; releases the lock at the end
    return turn


def _answered_again(session: dict[str, Any] | None, message_id: str | None) -> int | None:
    """The index of the stored user message ``message_id`` names, when the session holds one."""
    if session is None or message_id is None:
        return None
    messages = session["messages"]
    return next(
        (
            i
            for i in range(len(messages) - 1, -1, -1)
            if messages[i].get("id") == message_id and messages[i].get("role") == "user"
        ),
        None,
    )


def running(gw: Registry, session_id: str) -> Turn | None:
    """The turn streaming in ``session_id`` in this process, or None (the locks also hold work that is not a
    turn: ``session_locks.SessionWork``, which has nothing to resume)."""
    turn = gw.locks.get(session_id)
    return turn if isinstance(turn, Turn) else None


async def _existing_session(gw: Registry, request: ChatRequest) -> dict[str, Any] | None:
    """The session the request names, when it is the caller's and not streaming; None for a new one."""
    if request.session_id is None:
        return None
    streaming = gw.locks.get(request.session_id)
    if streaming is not None:
        if request.client != "admin" and streaming.client != request.client:
            # Another client's session, streaming or not, is the same SESSION_NOT_FOUND: no probe tells
            # whether it is live.
            raise ApiError("SESSION_NOT_FOUND", f"No session {request.session_id!r}.")
        raise ApiError("STREAM_IN_PROGRESS", STREAM_IN_PROGRESS_MESSAGE)
    session = await gw.sessions.get(request.session_id)
    if session is not None and not await owns_now(gw, request.client, session):
        # Another client's session is not there for this one; a named new one cannot take its id.
        raise ApiError("SESSION_NOT_FOUND", f"No session {request.session_id!r}.")
    if session is None and not request.create_if_missing:
        raise ApiError("SESSION_NOT_FOUND", f"No session {request.session_id!r}. Omit sessionId to start a new one.")
    return session


async def _admitted_model(gw: Registry, request: ChatRequest, session: dict[str, Any] | None) -> str:
    """The model the turn uses, once it is known, allowed and has a key: before anything is stored."""
    model = request.model or (session or {}).get("model") or gw.default_model
    try:
        gw.provider_for(model)
    except ModelNotFound as e:
        raise ApiError("MODEL_NOT_FOUND", await gw.not_found_message(request.client, e)) from None
    # Allowlist, rate limits, budget (room for the first call's output at least): before anything is stored.
    await gw.guard.precheck(request.client, model, lambda: least_output_cost(gw, model), request.credential)
    if not await _has_usable_key(gw, model):
        await _record_refusal(gw, model, request, "NO_API_KEY")
        raise ApiError("NO_API_KEY", missing_key_message(model.split("/", 1)[0], gw.config))
    return model


def least_output_cost(gw: Registry, model: str) -> float:
    """What a turn's first call reserves at least: the output it asks for, thinking included, priced."""
    settings = gw.config.provider_settings(model.split("/", 1)[0])
    thinking = None
    info = gw.model_info(model)
    if gw.config["thinking"]["enabled"]:
        thinking = ThinkingSettings(int(gw.config["thinking"]["budget_tokens"]), info.adaptive_thinking_only)
    request = ProviderRequest(model, "", [], info, answer_tokens(gw.config, info), thinking=thinking, options=settings)
    return ceiling_cost(gw, model, request_ceiling(request, 0))


async def _has_usable_key(gw: Registry, model: str, seen: set[str] | None = None) -> bool:
    """Whether ``model``, or one of its fallbacks, has the API key its provider needs (a model group: one of
    its deployments or fallbacks; ``seen``: the groups asked already, as groups may fall back to each other)."""
    group = gw.router.group(model)
    if group is not None:
        seen = (seen or set()) | {model}
        for dep in group.deployments:
            provider = gw.provider_for(dep.model)
            base_url = dep.base_url or gw.config.provider_settings(dep.model.split("/", 1)[0])["base_url"]
            key = deployment_key(gw.config, dep)
            if (key is not None or dep.key is None) and not await lacks_key(provider, dep.model, key, base_url):
                return True
        return any([await _has_usable_key(gw, m, seen) for m in group.fallbacks if m not in seen])
    for candidate in [model, *gw.config["models"]["fallbacks"].get(model, [])]:
        if candidate != model and gw.router.group(candidate) is not None:
            if await _has_usable_key(gw, candidate, seen):
                return True
            continue
        try:
            provider = gw.provider_for(candidate)
        except ModelNotFound:
            continue
        prefix = candidate.split("/", 1)[0]
        base_url = gw.config.provider_settings(prefix)["base_url"]
        if not await lacks_key(provider, candidate, resolve_key(gw.config, prefix), base_url):
            return True
    return False


async def _record_refusal(gw: Registry, model: str, request: ChatRequest, code: str) -> None:
    """The one usage record of a call refused before reaching the upstream: an error, never a request."""
    call = ProviderCall(gw, model, session_id=request.session_id, client=request.client, endpoint=request.endpoint)
    call.attempts = 0
    await call.record(TokenUsage(), "error", error=code, answered=False)


def retry_delay(error: ProviderError, attempt: int) -> float | None:
    """Seconds to wait before retry number ``attempt + 1``: the provider's Retry-After when it sent one,
    else exponential backoff with jitter (so clients failing together do not retry together).
    None when Retry-After asks for longer than we wait for a client that is watching."""
    if error.retry_after is not None:
        return error.retry_after if error.retry_after <= MAX_RETRY_WAIT_SECONDS else None
    return min(0.5 * 2**attempt * (0.5 + random.random()), MAX_RETRY_WAIT_SECONDS)


@dataclass(slots=True)
class _Tally:
    """What a turn's steps add up to: its answer's parts, usage and cost, how it ended, and its TTFT."""

    started: float  # time.monotonic() at the turn's start
    answered_by: str  # the model that answered last (a fallback's, when one answered)
    parts: list[Part] = field(default_factory=list)
    usage: TokenUsage = field(default_factory=TokenUsage)
    cost: Cost = field(default_factory=Cost)
    finish_reason: str = "stop"
    error: tuple[str, str] | None = None
    retry_after: float | None = None  # the seconds the error said to wait, when it did
    ttft_ms: float | None = None


class _Stopped(Exception):
    """The step was stopped from outside: aborted by the client, idle, or server shutdown."""


class _Refused(ProviderError):
    """The next attempt of a step was refused at admission (budget, rate, key): the step ends, no fallback."""


@dataclass
class _Step:
    """What one provider call produced so far, kept so a failed or aborted call still stores it."""

    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    parts: list[Part] = field(default_factory=list)
    tool_calls: list[ToolCallPart] = field(default_factory=list)
    model: str = ""  # the model being called: the requested one or a fallback
    swaps: int = 0  # provider calls this step began anew (a model group's next deployment)
    delivered: bool = False  # something reached the client: no more retries or fallbacks
    fallback_next: bool = False  # a fallback follows the model called: one silent past the idle timeout moves on
    first_at: float = 0.0
    last_event: float = 0.0
    attempts: int = 0  # upstream calls made: retries and fallbacks included
    # Of the latest attempt: whether the upstream sent anything, the usage it last reported, and how much
    # output (text, reasoning and tool-call pieces) had arrived by then.
    answered: bool = False
    reported: TokenUsage | None = None
    output_at_report: int = 0
    call: CallInfo | None = None  # the call as the observation hooks see it, started with its first attempt
    # The step's provider call (calls.py): admitted, reserved and written ahead before its first attempt.
    provider_call: ProviderCall | None = None
    # The records of the attempts this step replaced (``Turn._begin_anew``): part of the turn's usage.
    replaced_usage: TokenUsage = field(default_factory=TokenUsage)
    replaced_cost: Cost = field(default_factory=Cost)

    def output_size(self) -> int:
        return len(self.text) + len(self.reasoning) + len(self.tool_calls)

    def partial_parts(self) -> list[Part]:
        out: list[Part] = []
        if self.reasoning:
            out.append(ReasoningPart("".join(self.reasoning)))
        if self.text:
            out.append(TextPart("".join(self.text)))
        return out + list(self.tool_calls)


class Turn:
    """One running chat turn. Publish/subscribe over an append-only event list."""

    def __init__(
        self,
        gw: Registry,
        session_id: str,
        model: str,
        client: str,
        session_created: bool,
        user_message_id: str,
        endpoint: str = "ws",
    ) -> None:
        self.gw = gw
        self.session_id = session_id
        self.model = model
        self.client = client
        self.endpoint = endpoint
        self.session_created = session_created
        self.user_message_id = user_message_id
        self.message_id = new_id("msg_")
        self.events: list[StreamEvent] = []
        self.done = False
        self.task: asyncio.Task[None] | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._step_task: asyncio.Task[ProviderFinish] | None = None
        self._tool_tasks: list[asyncio.Task[ToolResultPart]] = []
        self._stop_reason: str | None = None
        self._stopped = asyncio.Event()  # ends a wait between retries early
        self._storage_failed = False  # a write of this turn failed: it ends with STORAGE_ERROR
        self._storage_problem = storage_problem(None)  # what failed, for the client (the last failure's store)
        self.info = TurnInfo(self.message_id, session_id, model, client, endpoint)  # for the observation hooks
        self._ended: tuple[str, str | None] = ("aborted", None)  # finish reason and error code, for turn_finished
        self._held: ProviderCall | None = None  # the provider call of the step running now
        self.credential: str | None = None  # the client key's SHA-256, checked again before each step
        # What the latest provider call sent and cached, stored with the answer (``lastCall``): the inspector
        # predicts the next call's cache reads from it and calibrates its token estimates by it.
        self._last_call: dict[str, Any] | None = None
        self.files: list[FilePart] = []  # what the user message attaches, with its bytes
        # The media types of the session's files: every model the turn calls must read them (it is sent them).
        self.media_types: frozenset[str] = frozenset()

    # --- publish / subscribe ---------------------------------------------------------------------

    def _publish(self, event: StreamEvent) -> None:
        self.events.append(event)
        self._wake()

    def _wake(self) -> None:
        if self._waiters:
            for w in self._waiters:
                if not w.done():
                    w.set_result(None)
            self._waiters.clear()

    async def batches(self) -> AsyncIterator[list[StreamEvent]]:
        """Every event from the start of the turn, then live ones until the turn ends, a burst at a time:
        each list holds every event published since the previous one, so a transport can send it in one write."""
        i = 0
        loop = asyncio.get_running_loop()
        while True:
            if i < len(self.events):
                batch = self.events[i:]
                i += len(batch)
                yield batch
                continue
            if self.done:
                return
            waiter = loop.create_future()
            self._waiters.append(waiter)
            await waiter

    # --- control --------------------------------------------------------------------------------

    def start(self, content: str, history: list[dict[str, Any]]) -> None:
        notify(self.gw.pm.hook.turn_started, turn=self.info)
        self.task = asyncio.create_task(self._run(content, history), name=f"turn-{self.session_id}")
        # turn_finished once the task is over, however it ended (cancelled included): the hooks always pair.
        self.task.add_done_callback(self._notify_finished)

    def _notify_finished(self, task: asyncio.Task[None]) -> None:
        notify(self.gw.pm.hook.turn_finished, turn=self.info, finish_reason=self._ended[0], error=self._ended[1])

    def abort(self, reason: str = "aborted") -> None:
        """Stop generating; what was generated is stored with ``aborted: true`` and billed."""
        if self._stop_reason is None:
            self._stop_reason = reason
        self._stopped.set()
        if self._step_task is not None and not self._step_task.done():
            self._step_task.cancel()
        for task in self._tool_tasks:  # a tool still running is stopped too (it may never end by itself)
            task.cancel()

    # --- the turn -------------------------------------------------------------------------------

    async def _run(self, content: str, history: list[dict[str, Any]]) -> None:
        tally = _Tally(started=time.monotonic(), answered_by=self.model)
        created_at = now_iso()
        self._publish(StreamStart(self.session_id, self.model, self.message_id, self.session_created))
        try:
            ctx = await assemble(
                self.gw,
                session_id=self.session_id,
                model=self.model,
                user_message=content,
                history=history,
                user_files=self.files,
            )
            # The context-window policy: compact, truncate or refuse (CONTEXT_TOO_LONG) a context too long,
            # before every step (a tool loop's results grow the context).
            ctx, history = await fit_context(self.gw, self, ctx, content, history)
            base = len(ctx.messages)
            max_steps = int(self.gw.config["chat"]["max_steps"])
            seen_sources: set[str] = set()
            for step in range(max_steps):
                if step:
                    added = len(ctx.messages) - base
                    ctx, history = await fit_context(
                        self.gw, self, ctx, content, history, added=added, step_call=self._last_call
                    )
                    base = len(ctx.messages) - added
                if not await self._step(ctx, step, seen_sources, tally):
                    break
        except ApiError as e:  # the context-window policy refused the call, or its summarising call failed
            tally.finish_reason, tally.error, tally.retry_after = "error", (e.code, e.message), e.retry_after
        except Exception:
            log.exception("turn in session %s failed", self.session_id)
            tally.finish_reason = "error"
            tally.error = ("LLM_ERROR", "The gateway failed while answering; see the server log.")
        finally:
            if self._held is not None:  # a step that made no record gives its reservation back
                await self._held.release()
        await self._finish(tally, created_at)

    async def _step(self, ctx: AssembledContext, step: int, seen_sources: set[str], tally: _Tally) -> bool:
        """One step: a provider call (with its retries and fallbacks), then the tools it called. Whether
        another step follows (the model called tools)."""
        call_started = time.monotonic()
        call = CallInfo(
            self.model,
            self.session_id,
            self.client,
            self.endpoint,
            turn=self.info,
            step=step,
            system=ctx.system,
            messages=list(ctx.messages),
            started=call_started,
        )
        provider_call = self._provider_call(call)
        try:  # each step's checks at the moment of its call, its reservation, its pending entry
            await provider_call.admit(
                lambda: request_ceiling(self._request(ctx, self.model), estimate_input_tokens(ctx, ceiling=True))
            )
        except ApiError as e:
            tally.finish_reason, tally.error, tally.retry_after = "error", (e.code, e.message), e.retry_after
            return False
        self._held = provider_call
        self._publish(StepStart(step))
        state = _Step(call=call, provider_call=provider_call)
        try:
            finish, tally.answered_by = await self._call_with_fallbacks(ctx, state, seen_sources)
        except (ProviderError, _Stopped) as e:
            await self._step_failed(e, ctx, state, call, provider_call, call_started, tally)
            return False
        if tally.ttft_ms is None and state.delivered:
            tally.ttft_ms = (state.first_at - tally.started) * 1000
        usage = finish.usage if finish.usage is not None else self._partial_usage(ctx, state)
        cost = price(self.gw, tally.answered_by, usage)
        tally.usage = tally.usage + state.replaced_usage + usage
        tally.cost = tally.cost + state.replaced_cost + cost
        call = state.call or call
        call.answer = finish.message.text
        self._note_call(ctx, usage)
        await self._record(tally.answered_by, usage, call_started, finish.finish_reason, state, None, call)
        tally.parts.extend(finish.message.parts)
        tally.finish_reason = finish.finish_reason
        calls = [p for p in finish.message.parts if isinstance(p, ToolCallPart)]
        if tally.finish_reason != "tool-calls" or not calls:
            self._publish(StepFinish(step, tally.finish_reason, usage, cost))
            return False
        # Tool results belong to the step that called the tools (as in the AI SDK's own streams).
        results = await self._run_tools(calls)
        self._publish(StepFinish(step, tally.finish_reason, usage, cost))
        tally.parts.extend(results)
        ctx.messages.append(finish.message)
        ctx.messages.append(ChatMessage("user", list(results)))
        return True

    async def _step_failed(
        self,
        e: ProviderError | _Stopped,
        ctx: AssembledContext,
        state: _Step,
        call: CallInfo,
        provider_call: ProviderCall,
        call_started: float,
        tally: _Tally,
    ) -> None:
        """The step's call failed or was stopped: what it produced is kept, billed and recorded, and the turn
        ends with its error (or as aborted)."""
        tally.answered_by = state.model  # the model whose call failed, possibly a fallback
        if tally.ttft_ms is None and state.delivered:
            tally.ttft_ms = (state.first_at - tally.started) * 1000
        tally.parts.extend(state.partial_parts())
        # What the upstream reported so far, plus an estimate of the output it did not report;
        # nothing when it never answered (refused, 5xx, connection refused, aborted before).
        usage = self._partial_usage(ctx, state)
        cost = price(self.gw, tally.answered_by, usage)
        tally.usage = tally.usage + state.replaced_usage + usage
        tally.cost = tally.cost + state.replaced_cost + cost
        stopped = isinstance(e, _Stopped) and self._stop_reason in ("aborted", "shutdown")
        reason = "aborted" if stopped else "error"
        if isinstance(e, ProviderError):
            # Providers scrub their own key; an upstream message may still quote another secret.
            tally.error, tally.retry_after = (e.code, redact(e.message)), e.retry_after
        elif self._stop_reason == "idle":
            tally.error = ("LLM_ERROR", "The model stopped sending data (idle timeout).")
        elif self._stop_reason == "shutdown":
            tally.error = None  # stored as aborted; the server is going away
        error = tally.error
        call = state.call or call  # a model group's step may have begun a new call
        call.answer = "".join(state.text)
        if state.attempts:  # no record for a call never made (stopped before it)
            await self._record(tally.answered_by, usage, call_started, reason, state, error and error[0], call)
        await (state.provider_call or provider_call).release()
        tally.finish_reason = reason

    async def _finish(self, tally: _Tally, created_at: str) -> None:
        """Store the answer, free the session, and send the end (or the error) to the clients."""
        finish_reason, error = tally.finish_reason, tally.error
        aborted = finish_reason == "aborted" or self._stop_reason == "shutdown"
        deleted = False
        try:
            await self._store(
                tally.parts,
                tally.usage,
                tally.cost,
                finish_reason,
                tally.started,
                created_at,
                tally.ttft_ms,
                aborted,
                error,
                tally.answered_by,
            )
        except SessionNotFound:  # deleted from outside meanwhile (the CLI, another replica): nowhere to store it
            log.warning("session %s was deleted while its answer streamed; the answer was not stored", self.session_id)
            deleted = True
        except Exception:
            log.exception("storing the answer in session %s failed", self.session_id)
            self._storage_failed = True
        # Before any client sees the end: its next message may go to any replica, and must find it free.
        await self.gw.locks.release(self)
        if deleted:
            self._publish(StreamError("SESSION_NOT_FOUND", DELETED_MESSAGE))
        elif error is not None:
            self._publish(StreamError(*error, tally.retry_after))
        elif self._storage_failed:  # never reported as stored when it is not (docs/protocol.md#errors)
            self._publish(StreamError("STORAGE_ERROR", STORAGE_ERROR_MESSAGE.format(self._storage_problem)))
        else:
            self._publish(
                StreamEnd("aborted" if aborted else finish_reason, tally.usage, tally.cost, aborted, tally.ttft_ms)
            )
        failure = "SESSION_NOT_FOUND" if deleted else error[0] if error else None
        self._ended = (finish_reason, failure or ("STORAGE_ERROR" if self._storage_failed else None))
        self.done = True
        self.gw.locks.forget(self)
        self._wake()

    def _note_call(self, ctx: AssembledContext, usage: TokenUsage) -> None:
        """Remember what a finished call sent (``ctx`` as it was sent), as the provider counted it (``lastCall``)."""
        if "inputTokens" in usage.estimated_fields:
            return  # nothing reported: nothing to calibrate by
        self._last_call = {
            "promptTokens": usage.input_tokens + usage.cache_read_tokens + usage.cache_write_tokens,
            "promptEstimate": estimate_input_tokens(ctx),
            "cachedTokens": usage.cache_read_tokens + usage.cache_write_tokens,
            "prefixKey": prefix_key(ctx.system, [t.definition() for t in ctx.tools]),
            "firstKey": first_message_key(ctx),  # the cached prefix starts there (history_limit moves it)
            "model": ctx.model,  # a provider keeps a cache per model: another model reads none of it
        }

    async def _call_with_fallbacks(
        self, ctx: AssembledContext, state: _Step, seen_sources: set[str]
    ) -> tuple[ProviderFinish, str]:
        group = self.gw.router.group(self.model)
        if group is not None:
            return await self._call_group(ctx, state, seen_sources, group, [])
        fallbacks = self.gw.config["models"]["fallbacks"].get(self.model, [])
        chain = [self.model, *[m for m in fallbacks if await self._may_use(m)]]
        last: ProviderError | None = None
        for i, model in enumerate(chain):
            inner = self.gw.router.group(model)
            if state.attempts:  # each model tried is a call of its own, as a group's deployments are
                await self._begin_anew(ctx, state, last)
            try:
                if inner is not None:  # a fallback naming a group: routed
                    return await self._call_group(ctx, state, seen_sources, inner, [self.model])
                state.model = model
                state.fallback_next = i < len(chain) - 1
                return await self._call_with_retries(ctx, state, seen_sources, model), model
            except ProviderError as e:
                # A 400 is the request's own fault: it would fail on any model (as on /v1, routed_call.py).
                if state.delivered or i == len(chain) - 1 or isinstance(e, _Refused) or not moves_on(e):
                    raise
                log.warning("%s failed before the first token (%s); falling back to %s", model, e.code, chain[i + 1])
                last = e
        raise AssertionError("unreachable")

    async def _call_group(
        self, ctx: AssembledContext, state: _Step, seen_sources: set[str], group: Group, seen: list[str]
    ) -> tuple[ProviderFinish, str]:
        """A call to a model group: its deployments in the order its strategy gives, each attempt its own
        provider call, while nothing reached the client; then the group's fallbacks (routing.py)."""
        router = self.gw.router
        seen.append(group.name)
        assert state.provider_call is not None
        deployments, busy = await router.order(group, state.provider_call.input_tokens)
        last: ProviderError | None = None
        for dep in deployments:
            if not attachments.reads(self.gw, dep.model, self.media_types):
                continue  # it would be sent files it cannot read
            if not await router.state.take(dep.id, dep.rpm):
                continue  # another call took its minute's last request meanwhile
            if state.attempts:
                try:
                    await self._begin_anew(ctx, state, last)
                except BaseException:  # refused (budget, rate) or stopped: the deployment was not called
                    await router.state.done(dep.id, 0, None)
                    raise
            finish = await self._call_deployment(ctx, state, seen_sources, group, dep)
            if isinstance(finish, ProviderFinish):
                return finish, dep.model
            last = finish
            log.warning("%s failed before the first token (%s); trying the next deployment", dep.id, finish.code)
        for fallback in group.fallbacks:
            if fallback in seen or not await self._may_use(fallback):
                continue
            if state.attempts:
                await self._begin_anew(ctx, state, last)
            inner = self.gw.router.group(fallback)
            try:
                if inner is not None:
                    return await self._call_group(ctx, state, seen_sources, inner, seen)
                state.model = fallback
                state.provider_call.route(fallback, None)
                state.fallback_next = True  # (after the last, the group's failure is its last error, as here)
                return await self._call_with_retries(ctx, state, seen_sources, fallback), fallback
            except ProviderError as e:
                if state.delivered or not moves_on(e):  # a 400: not tried on another model
                    raise
                last = e
        raise last or all_cooling_error(group, busy)

    async def _call_deployment(
        self, ctx: AssembledContext, state: _Step, seen_sources: set[str], group: Group, dep: Deployment
    ) -> ProviderFinish | ProviderError:
        """One attempt on ``dep`` (taken in its state already): its finish, or the error it failed with before
        the first token (counted against it); raised when the call cannot move on."""
        state_ = self.gw.router.state
        state.model = dep.model
        assert state.provider_call is not None
        state.provider_call.route(dep.model, dep.id)
        started = time.monotonic()
        try:
            finish = await self._call(ctx, state, seen_sources, dep.model, dep)
        except ProviderError as e:
            if not moves_on(e):  # the request's own fault (a 400): not counted against the deployment
                await state_.done(dep.id, 0, None)
                raise
            await self.gw.router.count_failure(group, dep, e)
            if state.delivered or self._stop_reason:
                raise
            return named_key_error(dep, e)
        except BaseException:
            # Stopped (chat.abort, the client gone with on_disconnect = "abort", the idle timeout): what its record
            # will bill counts in the deployment's minute, as a finished call's tokens do (its tpm).
            billed = self._partial_usage(ctx, state)
            await state_.done(dep.id, billed.input_tokens + billed.output_tokens, None)
            raise
        usage = finish.usage
        ttft = (state.first_at - started) * 1000 if state.delivered else None
        await state_.done(dep.id, usage.input_tokens + usage.output_tokens if usage else 0, ttft)
        return finish

    def _provider_call(self, call: CallInfo) -> ProviderCall:
        """A provider call of this turn's (one per step, and one per attempt that replaces a failed one)."""
        return ProviderCall(
            self.gw,
            self.model,
            session_id=self.session_id,
            client=self.client,
            endpoint=self.endpoint,
            credential=self.credential,
            call=call,
            fallbacks=True,
        )

    async def _begin_anew(self, ctx: AssembledContext, state: _Step, failed: ProviderError | None) -> None:
        """The step's failed attempt gets its record (nothing reached the client), and the next attempt a
        provider call of its own: admitted, reserved and written ahead like the first."""
        old = state.provider_call
        assert old is not None and state.call is not None
        error = failed.code if failed is not None else "LLM_ERROR"
        usage = self._partial_usage(ctx, state)
        await self._record(state.model, usage, old.started, "error", state, error, state.call)
        # Settled: in the turn's usage once (the step's own usage is the next attempt's).
        state.replaced_usage += usage
        state.replaced_cost += price(self.gw, state.model, usage)
        state.answered, state.reported, state.output_at_report = False, None, 0
        state.attempts, state.swaps = 0, state.swaps + 1
        call = replace(state.call, id=new_id("call_"), started=time.monotonic(), answer=None, state={})
        new = self._provider_call(call)
        new.continues = True  # the same step tried again: not another of the client's requests
        try:
            await new.admit(
                lambda: request_ceiling(self._request(ctx, self.model), estimate_input_tokens(ctx, ceiling=True))
            )
        except ApiError as e:
            raise _Refused(e.code, e.message, retry_after=e.retry_after) from None
        state.provider_call = self._held = new
        state.call = call

    async def _may_use(self, model: str) -> bool:
        """Whether the turn's client may use ``model`` and it reads the session's files (a fallback that
        may not or cannot is skipped)."""
        if not attachments.reads(self.gw, model, self.media_types):
            return False
        try:
            await self.gw.guard.check_model(self.client, model)
        except ApiError:
            return False
        return True

    async def _call_with_retries(
        self, ctx: AssembledContext, state: _Step, seen_sources: set[str], model: str
    ) -> ProviderFinish:
        max_retries = int(self.gw.config["chat"]["max_retries"])
        attempt = 0
        while True:
            try:
                return await self._call(ctx, state, seen_sources, model)
            except ProviderError as e:
                delay = retry_delay(e, attempt)
                if not e.retryable or state.delivered or attempt >= max_retries or self._stop_reason or delay is None:
                    raise
                attempt += 1
                log.info("%s: %s; retry %d in %.1fs", model, e.code, attempt, delay)
                try:  # an abort or shutdown ends the wait
                    await asyncio.wait_for(self._stopped.wait(), delay)
                except TimeoutError:
                    pass
                await self._anew_if_answered(ctx, state, e)

    async def _anew_if_answered(self, ctx: AssembledContext, state: _Step, failed: ProviderError) -> None:
        """Before a retry or a fallback: an attempt the upstream answered (it reported usage, and bills it) is
        a provider call of its own -- recorded with what it reported, and the next one admitted and reserved
        anew -- so the step's one reservation never pays for two upstream calls. _Refused when refused."""
        if state.answered and self._stop_reason is None:
            await self._begin_anew(ctx, state, failed)

    async def _call(
        self, ctx: AssembledContext, state: _Step, seen_sources: set[str], model: str, dep: Deployment | None = None
    ) -> ProviderFinish:
        if self._stop_reason is not None:  # stopped between steps, retries or before the first call
            raise _Stopped(self._stop_reason)
        gw = self.gw
        try:
            provider = gw.provider_for(model)
        except ModelNotFound as e:  # a fallback naming a model nothing serves
            raise ProviderError("MODEL_NOT_FOUND", str(e)) from None
        state.attempts += 1
        if state.attempts == 1:  # a call stopped before its first attempt is no call: no hooks, no record
            notify(gw.pm.hook.provider_call_started, call=state.call)
        state.answered, state.reported, state.output_at_report = False, None, 0
        request = self._request(ctx, model)
        if dep is not None:
            request = deployment_request(gw, request, dep)
        # The idle clock starts now, not when the task first runs: on a loaded machine a timer may fire first.
        state.last_event = time.monotonic()
        self._step_task = asyncio.create_task(self._consume(provider_stream(provider, request), state, seen_sources))
        stop_watching = self._watch_idle(state)
        try:
            return await self._step_task
        except asyncio.CancelledError:
            if self._stop_reason is None:
                raise  # we ourselves are being cancelled
            if self._stop_reason == "idle" and (dep is not None or state.fallback_next) and not state.delivered:
                # A group's deployment, or a model with a fallback after it, silent before its first token has
                # timed out: it fails (a deployment counted, cooled) and the turn moves on to the next deployment
                # or fallback, as for one the provider's timeout ends.
                self._stop_reason = None
                self._stopped.clear()
                raise ProviderError("LLM_ERROR", "The model stopped sending data (idle timeout).") from None
            raise _Stopped(self._stop_reason) from None
        finally:
            stop_watching()
            self._step_task = None

    def _request(self, ctx: AssembledContext, model: str) -> ProviderRequest:
        """The request of one call to ``model``, as its provider gets it (and as its reservation counts it)."""
        gw = self.gw
        info = gw.model_info(model)
        prefix = model.split("/", 1)[0]
        settings = gw.config.provider_settings(prefix)
        thinking = None
        if gw.config["thinking"]["enabled"]:  # the provider applies it only where the model supports it
            # Shown: the sessions' clients show the thinking (the web app's reasoning), which Claude Opus 4.7 and
            # later send only when asked.
            thinking = ThinkingSettings(
                int(gw.config["thinking"]["budget_tokens"]), info.adaptive_thinking_only, summarized=True
            )
        return ProviderRequest(
            model=model,
            system=ctx.system,
            messages=ctx.messages,
            model_info=info,
            max_tokens=answer_tokens(gw.config, info),
            tools=ctx.tools,
            thinking=thinking,
            api_key=resolve_key(gw.config, prefix),
            base_url=settings["base_url"],
            options=settings,
            cache_ttl=cache_ttl(gw.config),
        )

    async def _consume(self, events: AsyncIterator[Any], state: _Step, seen_sources: set[str]) -> ProviderFinish:
        publish = self._publish
        ledger = state.provider_call
        assert ledger is not None
        state.last_event = time.monotonic()
        try:
            async for event in events:
                now = time.monotonic()
                state.last_event = now
                if not state.answered:
                    state.answered = True
                    ledger.answered()
                kind = type(event)
                if kind is TextDelta:
                    if not event.text.isascii():  # an emoji cut between its halves upstream: see _clean_parts
                        event.text = clean_text(event.text)
                    state.text.append(event.text)
                    ledger.relayed(event.text)
                elif kind is ReasoningDelta:
                    if not event.text.isascii():
                        event.text = clean_text(event.text)
                    state.reasoning.append(event.text)
                    ledger.relayed(event.text)
                elif kind is SourceEvent:
                    if event.url in seen_sources:
                        continue
                    seen_sources.add(event.url)
                    state.parts.append(SourcePart(event.url, event.title))
                elif kind is ToolCallEvent:
                    state.tool_calls.append(ToolCallPart(event.tool_call_id, event.name, event.input))
                elif kind is UsageReport:
                    state.reported, state.output_at_report = event.usage, state.output_size()
                    ledger.note(event.usage)
                    continue
                elif kind is ProviderFinish:
                    event.message.parts.extend(p for p in state.parts if p not in event.message.parts)
                    _clean_parts(event.message.parts)
                    return event
                else:
                    continue
                publish(event)
                if not state.delivered:
                    state.delivered = True
                    state.first_at = now
                    # The first token goes out now, not after the rest of the burst already read from upstream.
                    await asyncio.sleep(0)
        finally:
            close = getattr(events, "aclose", None)
            if close is not None:
                await close()
        raise ProviderError("LLM_ERROR", "The provider ended the stream without finishing the answer.")

    def _watch_idle(self, state: _Step) -> Callable[[], None]:
        """Abort the call once the model has sent nothing for the idle timeout; returns what stops watching.

        A timer re-armed every quarter of the timeout (at most a second): cheaper than a task per call."""
        timeout = float(self.gw.config["chat"]["idle_timeout_seconds"])
        period = min(timeout / 4, 1.0)
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle

        def check() -> None:
            nonlocal timer
            if time.monotonic() - state.last_event > timeout:
                log.warning("no data from the model for %.0fs in session %s; ending the call", timeout, self.session_id)
                self.abort("idle")
            else:
                timer = loop.call_later(period, check)

        timer = loop.call_later(period, check)
        return lambda: timer.cancel()

    async def _run_tools(self, calls: list[ToolCallPart]) -> list[ToolResultPart]:
        """Run the calls of one step concurrently; failures become error results the model sees."""
        timeout = float(self.gw.config["chat"]["tool_timeout_seconds"])

        def stopped(call: ToolCallPart) -> ToolResultPart:
            return ToolResultPart(call.tool_call_id, call.name, f"Tool {call.name} was stopped.", True)

        async def run(call: ToolCallPart) -> ToolResultPart:
            tool = self.gw.tools.get(call.name)
            if tool is None:
                return ToolResultPart(call.tool_call_id, call.name, f"Unknown tool {call.name!r}.", True)
            if self._stop_reason is not None:  # stopped before its tools started: none starts
                return stopped(call)
            deadline = asyncio.timeout(timeout)
            try:
                async with deadline:  # a tool that never returns (a stuck network call) must not hold the turn
                    output = await tool.handler(call.input if isinstance(call.input, dict) else {"input": call.input})
                # Results go to the model, the client and the store as JSON: values JSON lacks become strings, and
                # lone surrogates (bytes decoded with surrogateescape) U+FFFD, which UTF-8 can carry.
                output = json.loads(clean_text(json.dumps(output, default=str, ensure_ascii=False)))
                return ToolResultPart(call.tool_call_id, call.name, output, False)
            except asyncio.CancelledError:
                if self._stop_reason is None:
                    raise  # the turn itself is being cancelled
                return stopped(call)
            except Exception as e:
                if isinstance(e, TimeoutError) and deadline.expired():  # ours, not a timeout inside the tool
                    log.warning("tool %s did not return within %g s; its result is an error", call.name, timeout)
                    message = f"Tool {call.name} did not return within {timeout:g} s ([chat] tool_timeout_seconds)."
                    return ToolResultPart(call.tool_call_id, call.name, message, True)
                log.warning("tool %s failed: %r", call.name, e)
                return ToolResultPart(call.tool_call_id, call.name, clean_text(f"Tool {call.name} failed: {e}"), True)

        # Tasks of their own, so that ``abort`` can stop them: a turn stopped (by its client, or at the shutdown's
        # grace end) ends now, with what it has, not when a slow tool returns.
        self._tool_tasks = [asyncio.create_task(run(c)) for c in calls]
        try:
            results = await asyncio.gather(*self._tool_tasks)
        finally:
            self._tool_tasks = []
        for r in results:
            self._publish(ToolResultEvent(r.tool_call_id, r.name, r.output, r.is_error))
        return list(results)

    def _partial_usage(self, ctx: AssembledContext, state: _Step) -> TokenUsage:
        """Usage of a call without a final report (failed, cut, aborted, or a provider that reports none), by the
        one rule (``calls.cut_short_usage``); a call the upstream never answered bills nothing."""
        if not state.answered:
            return TokenUsage()

        def output() -> int:
            text = "".join(state.text) + "".join(state.reasoning)
            return count_tokens(text + "".join(json.dumps(c.input, default=str) for c in state.tool_calls))

        return cut_short_usage(
            state.reported,
            lambda: estimate_input_tokens(ctx),
            output,
            output_after_report=state.output_size() > state.output_at_report,
        )

    async def _record(
        self,
        model: str,
        usage: TokenUsage,
        started: float,
        finish_reason: str,
        state: _Step,
        error: str | None,
        call: CallInfo,
    ) -> None:
        """The call's one usage record, durable in every sink before the turn goes on; a sink whose write
        failed keeps it for a retry (``gw.pending``), and the turn ends with STORAGE_ERROR."""
        provider_call = state.provider_call
        assert provider_call is not None
        provider_call.attempts = state.attempts
        if not state.swaps:  # a call begun anew (a group's next deployment) started when it was made
            provider_call.started = started
        await provider_call.record(
            usage,
            finish_reason,
            error=error,
            answered=state.answered,
            model=model,
            ttft_ms=(state.first_at - provider_call.started) * 1000 if state.delivered else None,
        )
        if provider_call.failure is not None:
            self._storage_failed = True
            self._storage_problem = storage_problem(provider_call.failure)

    async def _store(
        self,
        parts: list[Part],
        usage: TokenUsage,
        cost: Cost,
        finish_reason: str,
        started: float,
        created_at: str,
        ttft_ms: float | None,
        aborted: bool,
        error: tuple[str, str] | None,
        model: str,
    ) -> None:
        message: dict[str, Any] = {
            "id": self.message_id,
            "role": "assistant",
            "content": "".join(p.text for p in parts if isinstance(p, TextPart)),
            "parts": [part_to_dict(p) for p in parts],
            "model": model,
            "createdAt": created_at,
            "completedAt": now_iso(),
            "usage": usage_to_wire(usage, cost),
            "estimated": usage.estimated,
            "finishReason": finish_reason,
            "latencyMs": round((time.monotonic() - started) * 1000, 3),
            "ttftMs": None if ttft_ms is None else round(ttft_ms, 3),
            "aborted": aborted,
        }
        if usage.estimated_fields:
            message["estimatedFields"] = list(usage.estimated_fields)
        if self._last_call is not None:
            message["lastCall"] = self._last_call
        if error is not None:
            message["error"] = {"code": error[0], "message": error[1]}
        sessions, session_id = self.gw.sessions, self.session_id
        # The usage records are stored already (_record): whoever sees the answer also sees what it cost.
        await self._write(f"the answer in session {session_id}", lambda: sessions.append_message(session_id, message))
        if error is not None:
            # The failed user message stays, marked; later calls do not resend it (context.answered_turns).
            mark = {"error": message["error"]}
            await self._write(
                f"the error mark of a message in session {session_id}",
                lambda: sessions.update_message(session_id, self.user_message_id, mark),
            )

    async def _write(self, what: str, write: Callable[[], Awaitable[None]]) -> None:
        """Run a store write; when the store fails, keep it for a retry and end the turn with STORAGE_ERROR."""
        started = time.monotonic()
        try:
            await write()
        except STORAGE_FAILURES as e:
            # The store is out of reach or full (an outage, not a defect): one line, no traceback.
            log.warning("storing %s failed (%r); retrying in the background", what, e)
            self._storage_failed = True
            self._storage_problem = storage_problem(e)
            self.gw.pending.add(what, write, session_id=self.session_id)
        notify(self.gw.pm.hook.store_written, store="sessions", seconds=time.monotonic() - started)


def _clean_parts(parts: list[Part]) -> None:
    """Lone surrogates in what the model answered as U+FFFD (``types.clean_text``), as in its deltas: an upstream's
    JSON may cut an emoji between its halves (``\\ud83d``), and such text can be neither stored nor sent as UTF-8."""
    for part in parts:
        if isinstance(part, TextPart | ReasoningPart) and not part.text.isascii():
            part.text = clean_text(part.text)
        elif isinstance(part, ToolCallPart):
            encoded = compact_json(part.input)
            if not encoded.isascii() and LONE_SURROGATE.search(encoded):
                part.input = json.loads(clean_text(encoded))
        elif isinstance(part, SourcePart) and part.title is not None and not part.title.isascii():
            part.title = clean_text(part.title)


def owns(caller: str, session: dict[str, Any]) -> bool:
    """Whether ``caller`` may see ``session``: the admin sees every session, a client its own."""
    return caller == "admin" or session.get("client") == caller


async def owns_now(gw: Registry, caller: str, session: dict[str, Any]) -> bool:
    """``owns``, and for a client: made since the client was (not an earlier, removed client's of that name)."""
    if not owns(caller, session):
        return False
    if caller == "admin":
        return True
    client = await gw.clients.get(caller)
    return client is None or client.owns_since(session.get("createdAt"))
