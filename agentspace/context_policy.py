"""The context-window policy: what happens when a session's context would not fit the model's input window.

Before each call of a turn (a tool loop grows the context between its steps) the assembled context is
measured (the local estimate, calibrated by what the provider reported for the previous call) against the window: the cost map's ``max_input_tokens`` (or
``[pricing."MODEL"] context_window``) minus the output tokens requested. When it does not fit,
``[chat] context_policy`` decides:

- ``compact`` (default): the oldest turns are summarised by ``[chat] compact_model`` (default: the session's
  model). The summary is stored on the last summarised message (``summary``) and stands for everything up to
  there in every later call (the ``summary`` section); the call that wrote it is billed with purpose
  ``compact``. When that call fails, the turns are left out as ``truncate`` would (``compactError``).
- ``truncate``: the oldest turns are left out of the call (``contextCut`` marks where); they stay stored.
- ``refuse``: the turn fails with ``CONTEXT_TOO_LONG`` and the numbers.

A cut leaves the kept context at most half the window, so it stays where it is for many turns: the prefix
the prompt cache holds does not move on every turn. ``compact_session`` compacts on demand (every turn but
the latest).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

from . import attachments
from .calls import ProviderCall, cut_short_usage, request_ceiling
from .context import (
    AssembledContext,
    answered_turns,
    assemble,
    calibration,
    estimate_input_tokens,
    has_output,
    history_start,
    history_window,
    input_window,
    last_call,
    message_text,
)
from .errors import ApiError
from .events import ProviderError, ProviderEvent, ProviderFinish, TextDelta, UsageReport
from .providers.base import Provider, ProviderRequest, provider_stream
from .registry import ModelNotFound
from .tokens import count_ceiling_tokens, count_tokens
from .types import ChatMessage, FilePart, TokenUsage, now_iso
from .vault import resolve_key

if TYPE_CHECKING:
    from .registry import Registry

log = logging.getLogger(__name__)

# After a cut, the kept context uses at most this share of the window.
HEADROOM = 0.5
COMPACT_MAX_TOKENS = 1024
COMPACT_PURPOSE = "compact"
COMPACT_PROMPT = (
    "You summarise the earlier part of a conversation between a user and an assistant, so that the "
    "conversation can go on without it. Keep every fact, decision, name, number, open question and piece of "
    "code that later turns may need; leave out pleasantries. Write the summary only, in the conversation's "
    "language."
)


class TurnLike(Protocol):
    """What the policy needs of the turn it runs for (``pipeline.Turn``)."""

    session_id: str
    model: str
    client: str
    endpoint: str


def _message_tokens(message: dict[str, Any]) -> int:
    parts = message.get("parts")
    return count_tokens(json.dumps(parts, ensure_ascii=False) if parts else str(message.get("content") or ""))


def window_of(gw: Registry, model: str) -> tuple[int | None, int]:
    """(the input tokens a call may send, or None when the window is unknown; the output tokens requested,
    a thinking budget included: ``context.input_window``)."""
    return input_window(gw.config, model, gw.model_info(model))


def too_long(model: str, need: int, window: int, max_tokens: int) -> ApiError:
    return ApiError(
        "CONTEXT_TOO_LONG",
        f"The context of this call is about {need} tokens; {model} takes {window} "
        f"({window + max_tokens} in its window, minus {max_tokens} for the answer). "
        "Compact the session (agentspace sessions compact ID) or start a new one.",
    )


def _cut_index(history: list[dict[str, Any]], start: int, excess: int, ratio: float) -> tuple[int | None, float]:
    """The stored message to cut after (the end of a turn) so that at least ``excess`` tokens go, and the tokens
    it leaves out; the last possible one when no cut frees enough; None when there is no turn to leave out."""
    removed, cut, cut_removed = 0.0, None, 0.0
    ends = set(_turn_ends(history, start))
    for i in range(start, len(history)):
        if history[i].get("replaced"):
            continue  # set aside by an edit or a regenerate: no call sends it, cutting it frees nothing
        removed += _message_tokens(history[i]) * ratio
        if i in ends:
            cut, cut_removed = i, removed
            if removed >= excess:
                break
    return cut, cut_removed


def _turn_ends(history: list[dict[str, Any]], start: int) -> list[int]:
    """The stored answers from ``start`` on that end a turn (a cut may follow them), answers set aside
    (``replaced``) left out: a mark on one of those marks nothing (``context.history_start``); and the empty
    answers of turns that failed before any output, which no call resends (``context.answered_turns``): they
    are not the latest turn that compacting on demand keeps."""
    kept = [
        i
        for i in range(start, len(history))
        if not history[i].get("replaced") and (history[i].get("role") == "user" or has_output(history[i]))
    ]
    return [
        i
        for n, i in enumerate(kept)
        if history[i].get("role") == "assistant"
        and history[i].get("id")
        and (n + 1 == len(kept) or history[kept[n + 1]].get("role") == "user")
    ]


async def fit_context(
    gw: Registry,
    turn: TurnLike,
    ctx: AssembledContext,
    content: str,
    history: list[dict[str, Any]],
    *,
    added: int = 0,
    step_call: dict[str, Any] | None = None,
) -> tuple[AssembledContext, list[dict[str, Any]]]:
    """(``ctx``, ``history``), or both after the configured policy made the context fit (``history`` then holds
    the new mark); ApiError CONTEXT_TOO_LONG when it cannot.

    Before every call of a turn: a tool loop grows the context between its steps. ``added``: how many messages
    the turn's earlier steps appended to ``ctx`` (answers with tool calls, their results), kept as they are
    after whatever is cut; ``step_call``: the previous step's ``lastCall`` (None when it reported nothing)."""
    window, max_tokens = window_of(gw, turn.model)
    if window is None:
        return ctx, history
    previous = step_call if added else last_call(history)[0]
    ratio = calibration(previous)
    if added:
        since = sum(
            _bytes_of(m, ctx.model) for m in ctx.messages[-2:]
        )  # what the previous step answered, and its results
        if _step_fits(ctx, previous, since, ratio, window):
            return ctx, history
    elif _surely_fits(ctx, history, previous, content, ratio, window):
        return ctx, history
    need = round(estimate_input_tokens(ctx) * ratio)
    if need <= window:
        return ctx, history
    policy = gw.config["chat"]["context_policy"]
    if policy == "refuse":
        raise too_long(turn.model, need, window, max_tokens)
    start, summary = history_start(history)
    # The turns the call sends: [chat] history_limit leaves older ones out already, and cutting those frees
    # nothing (the limit's window then even takes in more of the turns after them).
    sent = len(history) - len(history_window(history[start:], gw.config["chat"]["history_limit"]))
    cut, removed = _cut_index(history, sent, need - int(window * HEADROOM), ratio)
    if cut is None or need - removed > window:
        # No cut makes it fit (the newest turn alone is too long): no summary is bought, no turn is left out.
        raise too_long(turn.model, need, window, max_tokens)
    mark: dict[str, Any] = {"contextCut": {"at": now_iso(), "tokens": need}}
    if policy == "compact":
        try:
            text = await summarise(gw, turn, summary, history[start : cut + 1])
            mark = {"summary": {"text": text, "model": compact_model(gw, turn.model), "createdAt": now_iso()}}
        except ApiError as e:
            # The turn still gets its answer: those turns are left out instead (a later cut summarises again).
            log.warning("compacting session %s failed (%s); its oldest turns are left out", turn.session_id, e.code)
            mark["contextCut"]["compactError"] = e.code
    await gw.sessions.update_message(turn.session_id, history[cut]["id"], mark)
    history = [*history[:cut], {**history[cut], **mark}, *history[cut + 1 :]]
    steps = ctx.messages[len(ctx.messages) - added :] if added else []
    ctx = await assemble(
        gw,
        session_id=turn.session_id,
        model=turn.model,
        user_message=content,
        history=history,
        user_files=getattr(turn, "files", ()),
    )
    ctx.messages.extend(steps)
    need = round(estimate_input_tokens(ctx) * ratio)
    if need > window:  # the newest turn alone is too long
        raise too_long(turn.model, need, window, max_tokens)
    return ctx, history


def _step_fits(ctx: AssembledContext, previous: dict[str, Any] | None, since: int, ratio: float, window: int) -> bool:
    """Whether a tool loop's next step clearly fits: what the previous step sent (as the provider counted it)
    plus the bytes of what it added; else the bytes of the whole context (``_surely_fits``)."""
    if previous is None or not previous.get("promptTokens"):
        return _surely_fits(ctx, [], None, "", ratio, window)
    return int(previous["promptTokens"]) + since * ratio < window * 0.8


def _bytes(message: dict[str, Any]) -> int:
    parts = message.get("parts")
    text = json.dumps(parts, ensure_ascii=False) if parts else str(message.get("content") or "")
    return len(text.encode())


def _surely_fits(
    ctx: AssembledContext,
    history: list[dict[str, Any]],
    previous: dict[str, Any] | None,
    content: str,
    ratio: float,
    window: int,
) -> bool:
    """Whether the context clearly fits without counting its tokens (this runs before every turn's first call):
    UTF-8 bytes bound the token count from above. With a previous call, what it sent (as the provider counted
    it) plus the bytes of what came after it; else the bytes of the whole context."""
    limit = window * 0.8
    if previous is None or not previous.get("promptTokens"):
        size = len(ctx.system.encode()) + sum(_bytes_of(m, ctx.model) for m in ctx.messages)
        if ctx.tools:
            size += len(json.dumps([t.definition() for t in ctx.tools], ensure_ascii=False).encode())
        return size * ratio < limit
    since = len(content.encode())
    if ctx.messages and ctx.messages[-1].role == "user":  # the files the new message attaches
        since += sum(attachments.tokens(p, model=ctx.model) for p in ctx.messages[-1].parts if isinstance(p, FilePart))
    for message in reversed(history):
        since += _bytes(message)  # the answer of that call (and its tool results), anything after it
        if message.get("lastCall") is previous:
            break
    return int(previous["promptTokens"]) + since * ratio < limit


def _bytes_of(message: ChatMessage, model: str) -> int:
    # A file counts its token estimate (its bytes say nothing of what it costs).
    files = sum(attachments.tokens(p, model=model) for p in message.parts if isinstance(p, FilePart))
    return len(message_text(message).encode()) + files


def compact_model(gw: Registry, model: str) -> str:
    return str(gw.config["chat"]["compact_model"] or model)


def transcript(messages: list[dict[str, Any]]) -> str:
    """Stored messages as the text the summarising model reads."""
    lines = []
    for m in messages:
        files = attachments.stored_files([m])
        parts = [p for p in m.get("parts") or () if isinstance(p, dict) and p.get("type") != "file"]
        # A tool loop's facts are in its calls and results, not in ``content`` (the answer's text only).
        if any(p.get("type") in ("tool-call", "tool-result") for p in parts):
            text = "\n".join(t for t in (_part_text(p) for p in parts) if t)
        else:
            text = str(m.get("content") or "")
            if not text and parts:
                text = json.dumps(parts, ensure_ascii=False)
        # The files are not sent to the summarising model, and after the summary no call sends them: it names
        # them, so that the summary (and the model reading it later) knows they were there.
        text += "".join(f"\n[attached: {_file_label(p)}]" for p in files)
        if text.strip():
            lines.append(f"{m.get('role', 'user')}: {text.strip()}")
    return "\n\n".join(lines)


def _part_text(part: dict[str, Any]) -> str:
    kind = part.get("type")
    if kind == "tool-call":
        return f"[called {part.get('name')} with {json.dumps(part.get('input'), ensure_ascii=False)}]"
    if kind == "tool-result":
        output = part.get("output")
        text = output if isinstance(output, str) else json.dumps(output, ensure_ascii=False)
        return f"[{part.get('name')} {'failed' if part.get('isError') else 'returned'}: {text}]"
    return str(part.get("text") or "") if kind == "text" else ""


def _file_label(part: dict[str, Any]) -> str:
    name = part.get("filename")
    kind = str(part.get("mediaType") or "file")
    return f"{name} ({kind}, {part.get('size')} bytes)" if name else f"a {kind} file of {part.get('size')} bytes"


async def summarise(gw: Registry, turn: TurnLike, previous: str, messages: list[dict[str, Any]]) -> str:
    """The new summary of ``messages`` (covering ``previous`` too): one summarising call (purpose ``compact``),
    or one per part when the turns do not fit the summarising model's window at once (a smaller
    ``[chat] compact_model``, or a session moved to a model with a smaller window), each part's call reading the
    summary so far."""
    model = compact_model(gw, turn.model)
    try:
        provider = gw.provider_for(model)
    except ModelNotFound as e:
        raise ApiError("MODEL_NOT_FOUND", f"[chat] compact_model: {e}") from None
    turns = answered_turns(messages)  # what a call resends: no answer set aside, no failed turn
    summary = previous
    for part in _parts(gw.model_info(model).context_window, previous, turns):
        summary = await _summary_call(gw, turn, model, provider, summary, transcript(part))
    return summary


# Room a part leaves beside the summary so far, the prompt and the answer: tokenizers differ from ours.
PART_MARGIN = 0.8


def _parts(window: int | None, previous: str, turns: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """``turns`` in consecutive parts whose transcript fits the summarising model's ``window`` (None: unknown,
    one part) with the summary so far, the prompt and the answer; a message too long alone is a part alone."""
    if not window:
        return [turns]
    fixed = count_tokens(COMPACT_PROMPT) + COMPACT_MAX_TOKENS + max(count_tokens(previous), COMPACT_MAX_TOKENS)
    budget = (window - fixed) * PART_MARGIN
    parts: list[list[dict[str, Any]]] = [[]]
    size = 0
    for message in turns:
        tokens = count_tokens(transcript([message]))
        if parts[-1] and size + tokens > budget:
            parts.append([])
            size = 0
        parts[-1].append(message)
        size += tokens
    return parts


async def _summary_call(gw: Registry, turn: TurnLike, model: str, provider: Provider, previous: str, part: str) -> str:
    """One summarising call through the same ``ProviderCall`` as every other call; its text is the summary of
    ``previous`` and ``part`` (a transcript)."""
    body = f"Summary so far:\n{previous}\n\nThe conversation after it:\n{part}" if previous else part
    prefix = model.split("/", 1)[0]
    settings = gw.config.provider_settings(prefix)
    request = ProviderRequest(
        model=model,
        system=COMPACT_PROMPT,
        messages=[ChatMessage.user(body)],
        model_info=gw.model_info(model),
        max_tokens=COMPACT_MAX_TOKENS,
        api_key=resolve_key(gw.config, prefix),
        base_url=settings["base_url"],
        options=settings,
    )
    call = ProviderCall(
        gw,
        model,
        session_id=turn.session_id,
        client=turn.client,
        endpoint=turn.endpoint,
        credential=getattr(turn, "credential", None),
        purpose=COMPACT_PURPOSE,
    )
    await call.admit(lambda: request_ceiling(request, count_ceiling_tokens(COMPACT_PROMPT + body)))
    call.begin(request.system, request.messages)
    text: list[str] = []
    reported: TokenUsage | None = None
    text_at_report = 0  # how much text there was when the upstream last reported its usage
    finish: ProviderFinish | None = None
    answered = False  # the provider yielded an event (``ResponseStarted`` included): the upstream took the call

    def count_input() -> int:
        return count_tokens(COMPACT_PROMPT + body)

    def count_text() -> int:
        return count_tokens("".join(text))

    try:
        try:
            async for event in _retried(gw, provider, request, call):
                if not answered:
                    answered = True
                    call.answered()  # the upstream took the call: a recovery bills its input
                if isinstance(event, TextDelta):
                    text.append(event.text)
                    call.relayed(event.text)
                elif isinstance(event, UsageReport):
                    reported, text_at_report = event.usage, len(text)
                    call.note(event.usage)
                elif isinstance(event, ProviderFinish):
                    finish = event
        except ProviderError as e:
            # Cut short: recorded by the one rule (``calls.cut_short_usage``); a call the upstream never answered
            # bills nothing.
            usage = TokenUsage()
            if answered:
                usage = cut_short_usage(
                    reported, count_input, count_text, output_after_report=len(text) > text_at_report
                )
            await call.record(usage, "error", error=e.code, answered=answered)
            raise ApiError(
                e.code, f"The session could not be compacted: {e.message}", retry_after=e.retry_after
            ) from None
        except asyncio.CancelledError:
            # Stopped (the server shutting down) once the upstream took the call, which it bills: recorded as a
            # call cut short, aborted, and stored although this task is being cancelled.
            if answered and call.recorded is None:
                usage = cut_short_usage(
                    reported, count_input, count_text, output_after_report=len(text) > text_at_report
                )
                await asyncio.shield(asyncio.ensure_future(call.record(usage, "aborted", error="ABORTED")))
            raise
        assert finish is not None
        # A provider that reports nothing: counted here, as a call cut short is.
        usage = finish.usage if finish.usage is not None else cut_short_usage(None, count_input, count_text)
        await call.record(usage, finish.finish_reason)
    finally:  # cancelled (shutdown) or a defect before the record: the reservation goes back
        await call.release()
    summary = "".join(text).strip()
    if not summary:
        raise ApiError("LLM_ERROR", "The session could not be compacted: the model wrote no summary.")
    return summary


async def _retried(
    gw: Registry, provider: Provider, request: ProviderRequest, call: ProviderCall
) -> AsyncIterator[ProviderEvent]:
    """``provider_stream``, attempted again when it failed before its first event with a retryable error, as a
    turn's call is (``[chat] max_retries``): one passing overload would otherwise leave the oldest turns out
    unsummarised. An attempt the upstream never took bills nothing; ``call.attempts`` counts them. Like a turn's
    call, it fails once the provider has sent nothing for ``[chat] idle_timeout_seconds``: a summary that stalls
    would hold the turn that needs it until the provider's own timeout."""
    idle = float(gw.config["chat"]["idle_timeout_seconds"])
    while True:
        started = False
        events = aiter(provider_stream(provider, request))
        try:
            while True:
                try:
                    event = await asyncio.wait_for(anext(events), idle)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise ProviderError("LLM_ERROR", "The model stopped sending data (idle timeout).") from None
                started = True
                yield event
        except ProviderError as e:
            delay = None if started else _retry_delay(gw, e, call.attempts)
            if delay is None:
                raise
            log.info("summarising with %s: %s; retry %d in %.1fs", request.model, e.code, call.attempts, delay)
            await asyncio.sleep(delay)
            call.attempts += 1
        finally:
            close = getattr(events, "aclose", None)
            if close is not None:
                await close()


def _retry_delay(gw: Registry, error: ProviderError, attempts: int) -> float | None:
    """Seconds before the next attempt of a summarising call that failed after ``attempts`` attempts, None when it
    is not retried: the pipeline's rule (``pipeline.retry_delay``) within ``[chat] max_retries``."""
    from .pipeline import retry_delay  # (the pipeline runs this module: imported when first needed)

    if not error.retryable or attempts > int(gw.config["chat"]["max_retries"]):
        return None
    return retry_delay(error, attempts - 1)


async def compact_session(gw: Registry, turn: TurnLike) -> dict[str, Any]:
    """Compact a session on demand: every turn but the latest goes into the summary."""
    session = await gw.sessions.get(turn.session_id)
    if session is None:
        raise ApiError("SESSION_NOT_FOUND", f"No session {turn.session_id!r}.")
    history = session.get("messages", [])
    start, summary = history_start(history)
    ends = _turn_ends(history, start)
    if len(ends) < 2:
        return {"sessionId": turn.session_id, "compacted": False, "summarizedMessages": 0}
    cut = ends[-2]  # the latest turn stays as it is
    text = await summarise(gw, turn, summary, history[start : cut + 1])
    mark = {"summary": {"text": text, "model": compact_model(gw, turn.model), "createdAt": now_iso()}}
    await gw.sessions.update_message(turn.session_id, history[cut]["id"], mark)
    return {
        "sessionId": turn.session_id,
        "compacted": True,
        "summarizedMessages": len(answered_turns(history[start : cut + 1])),
        "summary": text,
    }
