"""The session locks: one answer streams in a session at a time, across transports (and, with
``[storage] redis_url``, across replicas: ``cluster.RedisSessionLocks``).

A lock is held by the turn streaming in its session: ``claim`` takes it before anything of the turn is
stored, ``release`` lets other replicas take the session just before the turn publishes its end (a client's
next message may go to any replica), ``forget`` frees it here once the turn is done. The turns listed here are
also how a transport finds a running answer to resume or stop, and how shutdown finds what still runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from .errors import ApiError
from .types import new_id

if TYPE_CHECKING:
    from .events import StreamEvent

STREAM_IN_PROGRESS_MESSAGE = "This session is already streaming an answer; wait for it or abort it."


class RunningTurn(Protocol):
    """What the locks and the replicas need of a turn (``pipeline.Turn``)."""

    session_id: str
    message_id: str
    client: str
    done: bool
    task: asyncio.Task[None] | None

    def abort(self, reason: str = "aborted") -> None: ...

    def batches(self) -> AsyncIterator[list[StreamEvent]]: ...


class SessionLocks(Protocol):
    """The turns streaming now, one per session, and the lock each holds."""

    def get(self, session_id: str) -> RunningTurn | None: ...

    def __contains__(self, session_id: object) -> bool: ...

    def __len__(self) -> int: ...

    def turns(self) -> list[RunningTurn]: ...

    async def claim(self, turn: RunningTurn) -> None:
        """Hold ``turn``'s session for it; ``STREAM_IN_PROGRESS`` when another turn holds it (here or on another
        replica), ``SERVICE_UNAVAILABLE`` when the lock cannot be asked for. Holds nothing when it raises."""
        ...

    async def release(self, turn: RunningTurn) -> None:
        """Let other replicas take the session (the turn is about to publish its end)."""
        ...

    def forget(self, turn: RunningTurn) -> None:
        """The turn is over here: its session is free in this process."""
        ...


@dataclass
class SessionWork:
    """A session held by work that is not a turn (compacting on demand): a turn, or more such work, is refused
    while it runs, as beside a turn. Nothing of it streams, so there is nothing to resume or abort."""

    session_id: str
    client: str
    message_id: str = field(default_factory=lambda: new_id("work_"))
    done: bool = False
    task: asyncio.Task[None] | None = None

    def abort(self, reason: str = "aborted") -> None:
        return None

    async def batches(self) -> AsyncIterator[list[StreamEvent]]:
        none: tuple[list[StreamEvent], ...] = ()
        for batch in none:
            yield batch


class InProcessLocks:
    """The session locks of one process (no replicas)."""

    def __init__(self) -> None:
        self._turns: dict[str, RunningTurn] = {}

    def get(self, session_id: str) -> RunningTurn | None:
        return self._turns.get(session_id)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._turns

    def __len__(self) -> int:
        return len(self._turns)

    def turns(self) -> list[RunningTurn]:
        return list(self._turns.values())

    def hold(self, turn: RunningTurn) -> None:
        """Checked and held with no await in between: of two requests for one session, the second is refused
        here, before it writes anything."""
        if turn.session_id in self._turns:
            raise ApiError("STREAM_IN_PROGRESS", STREAM_IN_PROGRESS_MESSAGE)
        self._turns[turn.session_id] = turn

    async def claim(self, turn: RunningTurn) -> None:
        self.hold(turn)

    async def release(self, turn: RunningTurn) -> None:
        return None  # no other replica to tell

    def forget(self, turn: RunningTurn) -> None:
        if self._turns.get(turn.session_id) is turn:
            del self._turns[turn.session_id]
