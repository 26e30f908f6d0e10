"""Context assembly and inspection (docs/sessions.md#what-the-inspector-shows).

The context of a call is built from sections, in order: ``system_prompt``, the sections the installed plugins
registered (``register_context_sections``, in registration order: e.g. ``memory``, ``skills``), ``tools``,
``response_format``, ``summary`` (only in a compacted session), ``history``, ``user_message``. The text
sections form the system prompt; ``tools`` are the definitions sent; ``history`` and ``user_message`` are the
messages.

The context-window policy (``context_policy.py``) leaves old messages out by marking the stored message where
the call's history starts after: ``summary`` (compacted: its text stands for everything up to there) or
``contextCut`` (truncated). The marked messages stay in the store.

Inspection measures each section: UTF-8 bytes, a tiktoken estimate, and its cost at the input price; and
what the next call will read from and write to the prompt cache (``prompt_cache.py``), with the expected
cost with and without it. The estimate is calibrated by the previous call: the tokens the provider reported
for it over what was estimated for it (``lastCall`` of the latest answer).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from . import attachments
from .pricing import accepts_adaptive_thinking
from .prompt_cache import anthropic_family, cache_ttl, first_key, plan, prefix_key
from .providers.base import ProviderRequest, ThinkingSettings, upstream_output_tokens
from .storage.shapes import FrozenDict
from .tokens import count_ceiling_tokens, count_tokens
from .types import (
    ChatMessage,
    ContextRequest,
    FilePart,
    ModelInfo,
    Part,
    ReasoningPart,
    TextPart,
    Tool,
    ToolCallPart,
    ToolResultPart,
    part_from_dict,
)

if TYPE_CHECKING:
    from .config import Config
    from .registry import Registry

log = logging.getLogger(__name__)

SUMMARY_HEADING = "Summary of the earlier part of this conversation:\n"

# The sections the core builds itself; a plugin section of one of these names is not sent.
CORE_SECTIONS = ("system_prompt", "tools", "response_format", "summary", "attachments", "history", "user_message")


@dataclass(slots=True)
class Section:
    name: str
    text: str
    # A section that is not text (``attachments``): its tokens and bytes as counted by its own rules.
    tokens: int | None = None
    byte_count: int | None = None
    files: list[dict[str, Any]] | None = None
    # The ``history`` section's messages: its text is written out only when it is measured (``section_text``),
    # as a turn never reads it (in a long session, a string of the whole history on every turn).
    messages: list[ChatMessage] | None = None


def section_text(section: Section) -> str:
    if section.messages is None:
        return section.text
    return "\n".join(f"{m.role}: {message_text(m)}" for m in section.messages)


@dataclass(slots=True)
class AssembledContext:
    model: str
    system: str
    messages: list[ChatMessage]
    tools: list[Tool]
    sections: list[Section]


def history_start(stored: list[dict[str, Any]]) -> tuple[int, str]:
    """Where the history of the next call starts (the index after the latest ``summary`` or ``contextCut`` mark)
    and the summary text standing for what comes before ('' when there is none). A mark on an answer set aside
    since (``replaced``: an earlier message was edited or answered again) stands for a conversation the client
    left: it is not the start."""
    for i in range(len(stored) - 1, -1, -1):
        message = stored[i]
        if message.get("replaced"):
            continue
        summary = message.get("summary")
        if isinstance(summary, dict):
            return i + 1, str(summary.get("text") or "")
        if message.get("contextCut"):
            # A cut after a summary keeps the summary: the summarised turns are still represented.
            return i + 1, history_start(stored[:i])[1]
    return 0, ""


def has_output(message: dict[str, Any]) -> bool:
    """Whether a stored answer says anything to the model (a turn that failed before any output says nothing)."""
    return bool(message.get("content")) or any(
        p.get("type") != "text" or p.get("text") for p in message.get("parts") or ()
    )


def answered_turns(stored: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stored messages a call resends: turns that failed or were aborted before any output are left out.

    Such a turn leaves a user message followed by no answer (or an empty one). Resent, it would be merged
    with the next user message into one user turn, and a message the provider refused once (too long, say)
    would make every later call of the session fail the same way. A failed turn that produced output keeps
    its (user, partial answer) pair, which alternates as providers require.
    """
    kept: list[dict[str, Any]] = []
    for message in stored:
        if message.get("replaced"):
            continue  # an answer given again (``pipeline.start_turn``): its replacement follows
        if message.get("role") != "user" and not has_output(message):
            continue  # an answer with no output says nothing to the model
        if message.get("role") == "user" and kept and kept[-1].get("role") == "user":
            kept.pop()  # the previous user message got no answer
        kept.append(message)
    if kept and kept[-1].get("role") == "user":
        kept.pop()  # the next call's own user message follows: this one got no answer
    return kept


def messages_from_store(stored: list[dict[str, Any]]) -> list[ChatMessage]:
    """Stored messages to provider messages (``answered_turns`` of them).

    An assistant turn of the tool loop is stored as one message whose parts run: reasoning, text,
    tool calls, tool results, more text...; providers need the results in a user message between
    the assistant messages, so the parts are split where the role changes.
    """
    out: list[ChatMessage] = []
    for message in answered_turns(stored):
        for role, parts in _segments(message):
            if out and out[-1].role == role:
                out[-1].parts.extend(parts)
            else:
                out.append(ChatMessage(role, list(parts)))
    return _drop_dangling_tool_calls(out)


Segments = tuple[tuple[Literal["user", "assistant"], tuple[Part, ...]], ...]


def _segments(message: dict[str, Any]) -> Segments:
    """A stored message's parts as provider parts, in runs of one role (tool results are the user's).

    The session cache's messages (``FrozenDict``: they cannot change, a changed one is a new object) are converted
    once and their parts kept with them (``memo``): every turn resends the whole history, and converting it again
    cost milliseconds per turn in a long session. The parts are shared by every later turn's context, so nothing
    changes them; a message with files is converted anew each time, as a call puts the files' bytes into its parts
    (``attachments.load``)."""
    if isinstance(message, FrozenDict) and getattr(message, "memo", None) is not None:
        return message.memo
    runs: list[tuple[Literal["user", "assistant"], list[Part]]] = []
    raw_parts = message.get("parts") or [{"type": "text", "text": message.get("content", "")}]
    for raw in raw_parts:
        part = part_from_dict(raw)
        if part.type == "source":
            continue
        role: Literal["user", "assistant"] = (
            "user" if message["role"] == "user" or isinstance(part, ToolResultPart) else "assistant"
        )
        if runs and runs[-1][0] == role:
            runs[-1][1].append(part)
        else:
            runs.append((role, [part]))
    segments = tuple((role, tuple(parts)) for role, parts in runs)
    if isinstance(message, FrozenDict) and not any(isinstance(p, FilePart) for _, parts in runs for p in parts):
        message.memo = segments
    return segments


def _drop_dangling_tool_calls(messages: list[ChatMessage]) -> list[ChatMessage]:
    """An aborted turn may end with tool calls that have no results; providers reject those."""
    answered = {p.tool_call_id for m in messages for p in m.parts if isinstance(p, ToolResultPart)}
    for m in messages:
        if m.role == "assistant":
            m.parts = [p for p in m.parts if not (isinstance(p, ToolCallPart) and p.tool_call_id not in answered)]
    return [m for m in messages if m.parts]


def message_text(message: ChatMessage) -> str:
    """Text of a message as measured for inspection (tool calls and results as JSON)."""
    pieces = []
    for p in message.parts:
        if isinstance(p, (TextPart, ReasoningPart)):
            pieces.append(p.text)
        elif isinstance(p, ToolCallPart):
            pieces.append(json.dumps({"name": p.name, "input": p.input}, ensure_ascii=False))
        elif isinstance(p, ToolResultPart):
            pieces.append(json.dumps(p.output, ensure_ascii=False, default=str))
    return "\n".join(pieces)


async def _build(builder: Any, request: ContextRequest) -> str:
    try:
        result = builder.build(request)
        if inspect.isawaitable(result):
            # A section waiting on something that never answers (a search service, a file share) would hold
            # every turn and every inspection: it is left out of this call instead.
            timeout = float(request.config["chat"]["section_timeout_seconds"])
            try:
                result = await asyncio.wait_for(result, timeout)
            except TimeoutError:
                log.warning(
                    "context section %r took more than %g s ([chat] section_timeout_seconds); leaving it out",
                    getattr(builder, "name", builder),
                    timeout,
                )
                return ""
    except Exception:  # a broken plugin section must not break chat
        log.exception("context section %r failed; leaving it out", getattr(builder, "name", builder))
        return ""
    if result is None or isinstance(result, str):
        return result or ""
    # Not its repr: a list or dict sent as "['a', 'b']" would reach the model unnoticed.
    log.error("context section %r built a %s, not a str; leaving it out", builder.name, type(result).__name__)
    return ""


def _formatting_prompt(gateway: Registry, config: Config, model: str) -> str:
    """The first answer of the plugins' ``formatting_prompt`` that is not None, asked in pluggy's order (the
    built-in, last, answers ``[chat] formatting_prompt``). One that raises or answers what is not a str is
    logged naming its plugin, and the next is asked: pluggy's own call would name no one, and skip them all."""
    args = {"config": config, "model": model}
    for impl in reversed(gateway.pm.hook.formatting_prompt.get_hookimpls()):
        if impl.hookwrapper or impl.wrapper:
            continue
        try:
            prompt = impl.function(*(args[name] for name in impl.argnames))
        except Exception:
            log.exception("plugin %r: formatting_prompt failed; asking the next one", impl.plugin_name)
            continue
        if isinstance(prompt, str):
            return prompt
        if prompt is not None:
            log.error(
                "plugin %r: formatting_prompt gave a %s, not a str or None; asking the next one",
                impl.plugin_name,
                type(prompt).__name__,
            )
    return str(config["chat"]["formatting_prompt"])


async def assemble(
    gateway: Registry,
    *,
    session_id: str | None,
    model: str,
    user_message: str | None,
    history: list[dict[str, Any]],
    user_files: Sequence[FilePart] = (),
) -> AssembledContext:
    """Build what the next call sends. ``history`` is the stored messages, oldest first; ``user_files``: the
    images and documents the user message attaches (with their bytes)."""
    config = gateway.config
    request = ContextRequest(session_id=session_id, model=model, config=config, user_message=user_message)
    system_prompt = ""
    texts: dict[str, str] = {}  # the plugins' sections, in registration order; one row per name
    for builder in gateway.section_builders:
        text = await _build(builder, request)
        if builder.name == "system_prompt":
            system_prompt += text
        elif builder.name not in CORE_SECTIONS:
            texts[builder.name] = texts.get(builder.name, "") + text
    extra = [Section(name, text) for name, text in texts.items()]
    formatting = _formatting_prompt(gateway, config, model)

    tools = list(gateway.tools.values())
    tool_text = json.dumps([t.definition() for t in tools], ensure_ascii=False) if tools else ""

    start, summary = history_start(history)
    recent = history_window(history[start:], config["chat"]["history_limit"])
    messages = messages_from_store(recent)
    sent_history = list(messages)  # what the history section measures (the new message is appended below)
    # The session's earlier files are resent with their messages (a cached prefix): their bytes come back
    # from the blob store.
    await attachments.load(gateway, messages)
    if user_message is not None or user_files:
        new = ChatMessage.user(user_message or "")
        if user_files:
            new.parts = [p for p in new.parts if user_message] + list(user_files)
        messages.append(new)
    files = [p for m in messages for p in m.parts if isinstance(p, FilePart)]

    sections = [
        Section("system_prompt", system_prompt),
        *extra,
        Section("tools", tool_text),
        Section("response_format", formatting),
        *([Section("summary", SUMMARY_HEADING + summary)] if summary else []),
        *([attachments_section(files, model)] if files else []),
        Section("history", "", messages=sent_history),
        Section("user_message", user_message or ""),
    ]
    system_names = {"system_prompt", "response_format", "summary"} | {s.name for s in extra}
    system = "\n\n".join(s.text for s in sections if s.name in system_names and s.text)
    return AssembledContext(model, system, messages, tools, sections)


def history_window(messages: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """The newest messages, at most ``limit``, cut in steps of half the limit: the first message sent then
    stays the same for many turns and the prompt cache keeps reading the prefix (a window that slid by one
    message each turn would change the prefix, and rewrite the cache, on every turn). Answers set aside by an edit
    or a regenerate (``replaced``) are sent to no model: they do not count. The window starts at a question: an
    odd step (the default limit's 25) would start it at an answer on every other step, an answer without its
    question, which some APIs refuse (Bedrock's Converse: a conversation starts with a user message)."""
    if limit <= 0:
        return []
    kept = [i for i, m in enumerate(messages) if not m.get("replaced")]
    excess = len(kept) - limit
    if excess <= 0:
        return messages
    step = max(1, limit // 2)
    drop = -(-excess // step) * step
    start = next((i for i in kept[drop:] if messages[i].get("role") == "user"), None)
    return messages[start:] if start is not None else []


def attachments_section(files: Sequence[FilePart], model: str) -> Section:
    """The ``attachments`` row: each file with its estimate for ``model`` (``attachments.tokens``), their sum."""
    rows: list[dict[str, Any]] = [
        {
            "name": f.filename,
            "mediaType": f.media_type,
            "byteCount": f.size or 0,
            "tokenEstimate": attachments.tokens(f, model=model),
            **({"pages": attachments.pages(f)} if not f.is_image else {}),
        }
        for f in files
    ]
    return Section(
        "attachments",
        "",
        tokens=sum(int(r["tokenEstimate"]) for r in rows),
        byte_count=sum(int(r["byteCount"]) for r in rows),
        files=rows,
    )


def measure(context: AssembledContext, info: ModelInfo, cache: CacheView | None = None) -> dict[str, Any]:
    """The ``sections`` and ``totals`` of a ``context.inspection`` reply.

    With ``cache`` (what the previous call left), each section also says whether the next call reads it from
    the prompt cache or writes it there (``cache``: read, write, read+write, none; ``cacheReadTokens``,
    ``cacheWriteTokens``), and the totals give the expected input cost with and without the cache."""
    rows: list[dict[str, Any]] = []
    for s in context.sections:
        text = section_text(s)
        tokens = count_tokens(text) if s.tokens is None else s.tokens
        rows.append(
            {
                "name": s.name,
                "byteCount": len(text.encode("utf-8")) if s.byte_count is None else s.byte_count,
                "tokenEstimate": tokens,
                "costEstimate": round(tokens * info.input_per_mtok / 1_000_000, 10),
                **({"files": s.files} if s.files is not None else {}),
            }
        )
    totals: dict[str, Any] = {
        "byteCount": sum(r["byteCount"] for r in rows),
        "tokenEstimate": sum(r["tokenEstimate"] for r in rows),
        "costEstimate": round(sum(r["costEstimate"] for r in rows), 10),
    }
    if cache is not None:
        _measure_cache(context, info, cache, rows, totals)
    return {"sections": rows, "totals": totals}


@dataclass(slots=True)
class CacheView:
    """What the inspector knows of the cache: the TTL in use (None: off) and the previous call's ``lastCall``
    with its age in seconds."""

    ttl: str | None
    last_call: dict[str, Any] | None
    age_seconds: float | None


# Tokenizers differ by tens of percent, not more: a ratio beyond these bounds says the report was partial
# (a provider that leaves some input out), and is not trusted further than them.
CALIBRATION_BOUNDS = (0.5, 2.0)


def calibration(last_call: dict[str, Any] | None) -> float:
    """Reported over estimated prompt tokens of the previous call (1.0 when unknown)."""
    if not last_call:
        return 1.0
    reported, estimated = last_call.get("promptTokens") or 0, last_call.get("promptEstimate") or 0
    if reported <= 0 or estimated <= 0:
        return 1.0
    low, high = CALIBRATION_BOUNDS
    return min(high, max(low, reported / estimated))


# Cache order: the provider caches tools, then the system prompt, then the messages.
_CACHE_ORDER = {"tools": 0, "attachments": 2, "history": 2, "user_message": 3}


def _measure_cache(
    context: AssembledContext, info: ModelInfo, cache: CacheView, rows: list[dict[str, Any]], totals: dict[str, Any]
) -> None:
    ratio = calibration(cache.last_call)
    total = round(estimate_input_tokens(context) * ratio)
    key = prefix_key(context.system, [t.definition() for t in context.tools])
    # Anthropic's API caches what the breakpoints mark; providers that bill cached input lower but take no
    # marks (OpenAI) cache every prompt on their own, whatever [chat] prompt_cache says.
    marked = info.provider == "anthropic" or anthropic_family(context.model)
    ttl = cache.ttl if marked else None
    automatic = not marked and info.cache_read_per_mtok < info.input_per_mtok
    p = plan(
        total=total,
        model=context.model,
        ttl=ttl,
        last_call=cache.last_call,
        key=key,
        age_seconds=cache.age_seconds,
        min_tokens=info.prompt_cache_min_tokens,
        automatic=automatic,
        first_key=first_message_key(context),
    )
    measured = sum(r["tokenEstimate"] for r in rows) or 1
    read_left, write_left = p.read, p.write
    for row in sorted(rows, key=lambda r: _CACHE_ORDER.get(r["name"], 1)):
        tokens = round(row["tokenEstimate"] * total / measured)
        read = min(tokens, read_left)
        write = min(tokens - read, write_left)
        read_left, write_left = read_left - read, write_left - write
        row["cacheReadTokens"], row["cacheWriteTokens"] = read, write
        row["cache"] = "read+write" if read and write else "read" if read else "write" if write else "none"
    m = 1_000_000
    write_price = info.cache_write_per_mtok
    if ttl == "1h" and info.cache_write_1h_per_mtok is not None:
        write_price = info.cache_write_1h_per_mtok
    with_cache = (p.read * info.cache_read_per_mtok + p.write * write_price + p.uncached * info.input_per_mtok) / m
    totals.update(
        {
            "promptCache": "provider" if automatic else "off" if cache.ttl is None else "auto",
            "calibratedTokens": total,
            "cacheReadTokens": p.read,
            "cacheWriteTokens": p.write,
            "uncachedTokens": p.uncached,
            "costWithCache": round(with_cache, 10),
            "costWithoutCache": round(total * info.input_per_mtok / m, 10),
        }
    )


def answer_tokens(config: Config, info: ModelInfo) -> int:
    """The ``max_tokens`` a session's call asks for: ``[chat] max_tokens``, within the model's own output limit
    when it is known (an upstream refuses more, and the window left for the input would be counted short)."""
    output = int(config["chat"]["max_tokens"])
    return min(output, info.max_output_tokens) if info.max_output_tokens else output


def input_window(config: Config, model: str, info: ModelInfo) -> tuple[int | None, int]:
    """(the input tokens a call to ``model`` may send: its window minus the output the call asks for, None when
    the window is unknown; that output). The budget form of extended thinking asks for the budget on top of
    ``[chat] max_tokens`` (``providers.base.budget_max_tokens``), and Anthropic refuses a call whose input and
    ``max_tokens`` together pass the window; adaptive thinking stays within ``max_tokens``."""
    output = answer_tokens(config, info)
    if config["thinking"]["enabled"] and info.supports_reasoning:
        adaptive = info.adaptive_thinking_only or accepts_adaptive_thinking(model)
        thinking = ThinkingSettings(int(config["thinking"]["budget_tokens"]), adaptive)
        output = max(output, upstream_output_tokens(ProviderRequest(model, "", [], info, output, thinking=thinking)))
    window = info.context_window
    return (max(0, int(window) - output) if window else None), output


def first_message_key(context: AssembledContext) -> str | None:
    """``prompt_cache.first_key`` of the first message the call sends (None: it sends none)."""
    if not context.messages:
        return None
    first = context.messages[0]
    return first_key(first.role, message_text(first))


def last_call(stored: list[dict[str, Any]], model: str | None = None) -> tuple[dict[str, Any] | None, float | None]:
    """The latest answer's ``lastCall`` (what its last provider call sent and cached) and its age in seconds; an
    answer set aside by an edit (``replaced``) was the call of a conversation the next call does not continue.
    With ``model``: the latest call made on that model (a provider keeps a cache per model, and a model switched
    back to may still read what it cached before the switch, within the TTL)."""
    for message in reversed(stored):
        if message.get("replaced"):
            continue
        call = message.get("lastCall")
        if model is not None and isinstance(call, dict) and call.get("model", model) != model:
            continue
        if message.get("role") == "assistant" and isinstance(call, dict):
            age = None
            done = message.get("completedAt")
            if isinstance(done, str):
                try:
                    age = max(0.0, time.time() - datetime.fromisoformat(done.replace("Z", "+00:00")).timestamp())
                except ValueError:
                    pass
            return message["lastCall"], age
    return None, None


def estimate_input_tokens(context: AssembledContext, *, ceiling: bool = False) -> int:
    """Local count of what a call sends, for usage records when the provider reported none; with ``ceiling``
    (a reservation) files count at their most (``attachments.tokens``)."""
    # Counted piece by piece, so that the history's pieces, counted on earlier turns, are remembered
    # (``count_tokens``): the cost of a turn's count does not grow with the session.
    count = count_ceiling_tokens if ceiling else count_tokens  # a reservation: the most they may be billed as
    tokens = count(context.system) + sum(count(message_text(m)) for m in context.messages)
    if context.tools:
        tokens += count(json.dumps([t.definition() for t in context.tools], ensure_ascii=False))
    files = sum(
        attachments.tokens(p, ceiling=ceiling, model=context.model)
        for m in context.messages
        for p in m.parts
        if isinstance(p, FilePart)
    )
    return tokens + files


async def inspect_session(
    gw: Registry, session_id: str, model: str | None = None, user_message: str | None = None
) -> dict[str, Any] | None:
    """What the next call in a session would send, measured per section (shared with the REST API);
    ``user_message``: the message about to be sent (a draft), measured as the ``user_message`` section."""
    session = await gw.sessions.get(session_id) if await gw.sessions.exists(session_id) else None
    if session is None:
        return None
    model = model or session.get("model") or gw.default_model
    history = session.get("messages", [])
    ctx = await assemble(gw, session_id=session_id, model=model, user_message=user_message, history=history)
    previous, age = last_call(history, model)
    view = CacheView(cache_ttl(gw.config), previous, age)
    info = gw.model_info(model)
    measured = measure(ctx, info, view)
    # The input tokens a call may send (the window minus the output requested; None: unknown) and whether
    # this context is past them: then the next turn runs [chat] context_policy before its call.
    window = input_window(gw.config, model, info)[0]
    totals = measured["totals"]
    totals["inputWindow"] = window
    totals["overWindow"] = window is not None and totals["calibratedTokens"] > window
    return {"sessionId": session_id, "model": model, **measured}
