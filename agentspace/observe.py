"""What the observation hooks see (``turn_started``/``turn_finished``, ``provider_call_started``/
``provider_call_finished`` in ``hookspecs``): a turn and one provider call, described for metrics and traces.

The pipeline (a turn's steps) and the meter (the /v1 calls) make these and call the hooks; plugins may keep
their own per-turn or per-call state (a span, a start time) in ``state``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import pluggy

from .types import ChatMessage, new_id

log = logging.getLogger(__name__)


def notify(hook: pluggy.HookCaller, **kwargs: Any) -> None:
    """Call an observation hook; a plugin that fails is logged and never fails the call it watches."""
    if not hook.get_hookimpls():  # the common case, no observer: a list check, not a hook call
        return
    try:
        hook(**kwargs)
    except Exception:
        log.exception("plugin hook %s failed", hook.name)


@dataclass(slots=True)
class TurnInfo:
    """One chat turn (WebSocket or /api/chat): a user message and the provider calls that answer it."""

    message_id: str  # the answer's message id
    session_id: str
    model: str
    client: str | None
    endpoint: str | None
    state: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class CallInfo:
    """One provider call: a step of a turn, or a /v1 request. Retries and fallbacks are part of the call."""

    model: str  # the model requested; the record names the one that answered (a fallback's)
    session_id: str | None
    client: str | None
    endpoint: str | None
    turn: TurnInfo | None = None  # the turn this call is a step of; None for the /v1 endpoints
    step: int = 0
    # The prompt, for plugins that capture content (only read when they are configured to).
    system: str | None = None
    messages: list[ChatMessage] | None = None
    id: str = field(default_factory=lambda: new_id("call_"))
    started: float = field(default_factory=time.monotonic)
    # Filled in when the call ends: the answer's text (when known) and the upstream's message id.
    answer: str | None = None
    response_id: str | None = None
    state: dict[str, Any] = field(default_factory=dict)
