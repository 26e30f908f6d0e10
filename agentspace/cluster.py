"""What replicas share through Redis (``[storage] redis_url``, README.md): what one process keeps in memory
otherwise.

- The stream lock: a session streams on one replica at a time. ``claim`` sets
  ``agentspace:lock:<session>`` (``SET NX PX``) to ``<replica>:<turn>``; the owner renews it while the turn
  runs and deletes it at the end (compare-and-delete, in Lua). A replica that dies stops renewing: the lock
  expires after half a lease (``[storage] lease_seconds``: 10 s by default) and the session is free again.
  A claim refused is ``STREAM_IN_PROGRESS``.
- Running streams: the owner publishes the turn's UI message stream (the bytes ``GET /api/chat/{id}/stream``
  sends) to the Redis Stream ``agentspace:stream:<turn>``, capped at ``STREAM_CAP`` entries and expiring,
  so a resume on any replica replays it from the start and follows it live.
- Aborts: ``request_abort`` publishes the session id on ``agentspace:abort``; every replica listens, and
  the one running that session's turn aborts it.
- Credentials: a key rotated or removed through ``/api/clients`` is announced on
  ``agentspace:credentials``; every replica then checks its open WebSockets at once (and closes those
  whose credential is gone) instead of at its next periodic check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from .errors import OUTAGE_RETRY_SECONDS, ApiError
from .events import StreamEnd, StreamError, StreamEvent
from .logs import warn_limited
from .session_locks import STREAM_IN_PROGRESS_MESSAGE, InProcessLocks, RunningTurn, SessionLocks
from .types import new_id

log = logging.getLogger(__name__)

PREFIX = "agentspace"
ABORT_CHANNEL = f"{PREFIX}:abort"
CREDENTIALS_CHANNEL = f"{PREFIX}:credentials"
LEASE_SECONDS = 20.0  # the default of [storage] lease_seconds: a dead replica keeps its sessions busy half of it
STREAM_CAP = 100_000  # entries kept per running stream (a burst of deltas is one entry)
STREAM_TTL_SECONDS = 3600  # a finished (or orphaned) stream stays resumable this long
REDIS_CONNECTIONS = 32  # per replica; the abort listener holds one
_END = b"end"
# How long one read of a followed stream may take (it blocks 1 s in Redis) before Redis counts as gone.
FOLLOW_READ_SECONDS = 5.0


class StreamEncoder(Protocol):
    """How a running turn's events are published: the UI message stream's encoder
    (``transports/ui_stream.UIMessageStreamEncoder``, given by the app: a resume relays its bytes as they are)."""

    def encode(self, event: StreamEvent) -> bytes: ...


# Deletes the lock only when it is still ours (a lock that expired and was taken since is another's).
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
# Renews the lock while it is ours; takes it again when it is gone (Redis restarted, or lost it); 0 when
# another turn holds it now.
_RENEW = """
local v = redis.call('get', KEYS[1])
if v == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
if not v then
  redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
"""


def lock_key(session_id: str) -> str:
    return f"{PREFIX}:lock:{session_id}"


def stream_key(turn_id: str) -> str:
    return f"{PREFIX}:stream:{turn_id}"


class Cluster:
    def __init__(
        self,
        url: str,
        replica_id: str | None = None,
        on_credentials_changed: Callable[[], None] | None = None,
        *,
        encoder: Callable[[], StreamEncoder],
        lease_seconds: float = LEASE_SECONDS,
    ) -> None:
        try:
            import redis.asyncio as aioredis
        except ImportError:
            from .errors import StorageError

            raise StorageError("[storage] redis_url needs redis-py: pip install 'agentspace[scale]'.") from None
        self.url = url
        self.lock_ttl_ms = max(1, round(lease_seconds * 500))  # half a lease; renewed every third of it
        self.replica_id = replica_id or f"{socket.gethostname()}-{os.getpid()}-{new_id('')[:8]}"
        # Bounded: many streams publishing at once wait for a connection instead of each opening one (a
        # connection storm on a busy machine ends in connect timeouts). Any: redis-py's reply types are
        # unions of every decoding; replies here are bytes.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=REDIS_CONNECTIONS,
            timeout=10,
            socket_connect_timeout=5,
            health_check_interval=30,
            redis_connect_func=self._connected,
        )
        self._run_id: bytes | None = None  # of the Redis server this replica last connected to
        self.redis: Any = aioredis.Redis(connection_pool=pool)
        self._release = self.redis.register_script(_RELEASE)
        self._renew = self.redis.register_script(_RENEW)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listener: asyncio.Task[None] | None = None
        self._locks: SessionLocks | None = None
        # Called when another replica (or this one) announces a rotated or removed credential.
        self.on_credentials_changed = on_credentials_changed
        self.encoder = encoder

    async def _connected(self, connection: Any) -> None:
        """Each new connection to Redis: a Redis that restarted since the last one (its run id changed) may have
        loaded an older snapshot (persistence on), whose budget spend misses the calls posted after it. That is a
        loss of state too: its epoch goes, so the budget counters are rebuilt from the database and the calls in
        flight (redis_counters.py), as after a restart without persistence."""
        from .redis_counters import EPOCH_KEY

        await connection.on_connect()
        await connection.send_command("INFO", "server")
        info = await connection.read_response()
        run_id = next((line[7:].strip() for line in bytes(info).splitlines() if line.startswith(b"run_id:")), b"")
        if self._run_id is not None and run_id != self._run_id:
            await connection.send_command("DEL", EPOCH_KEY)
            await connection.read_response()
            log.warning("Redis restarted; its budget counters are rebuilt")
        self._run_id = run_id

    async def start(self, locks: SessionLocks) -> None:
        """Check Redis answers and listen for aborts meant for this replica's turns."""
        from .errors import StorageError

        try:
            await self.redis.ping()
        except Exception as e:  # noqa: BLE001 - redis-py raises its own ConnectionError, OSError, timeouts
            raise StorageError(f"The gateway could not reach Redis at [storage] redis_url: {e}.") from e
        self._locks = locks
        pubsub = self.redis.pubsub()
        await pubsub.subscribe(ABORT_CHANNEL, CREDENTIALS_CHANNEL)
        self._listener = asyncio.create_task(self._listen(pubsub), name="agentspace-abort-listener")

    async def _listen(self, pubsub: Any) -> None:
        while True:
            try:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except asyncio.CancelledError:
                await pubsub.aclose()
                raise
            except Exception as e:  # noqa: BLE001 - Redis gone for a moment: keep listening
                warn_limited(log, "redis-abort-channel", "lost the Redis abort channel; reconnecting: %r", e)
                await asyncio.sleep(1)
                continue
            if message is None or self._locks is None:
                continue
            if message["channel"] in (CREDENTIALS_CHANNEL, CREDENTIALS_CHANNEL.encode()):
                if self.on_credentials_changed is not None:
                    self.on_credentials_changed()
                continue
            session_id = message["data"].decode() if isinstance(message["data"], bytes) else str(message["data"])
            turn = self._locks.get(session_id)
            if turn is not None:
                log.info("abort of session %s from another replica", session_id)
                turn.abort()

    async def health(self, timeout: float) -> str | None:
        """None when Redis answers a PING within ``timeout``, else why not."""
        try:
            async with asyncio.timeout(timeout):
                await self.redis.ping()
        except TimeoutError:
            return f"Redis did not answer within {timeout:g} s"
        except Exception as e:  # noqa: BLE001 - redis-py's ConnectionError, OSError
            return f"The gateway could not reach Redis at [storage] redis_url: {e}"
        return None

    # --- the stream lock --------------------------------------------------------------------------

    async def claim(self, turn: RunningTurn) -> bool:
        """Take the session's lock for ``turn``; False when another turn (on any replica) holds it."""
        value = f"{self.replica_id}:{turn.message_id}"
        return bool(await self.redis.set(lock_key(turn.session_id), value, nx=True, px=self.lock_ttl_ms))

    async def release(self, turn: RunningTurn) -> None:
        with contextlib.suppress(Exception):
            await self._release(keys=[lock_key(turn.session_id)], args=[f"{self.replica_id}:{turn.message_id}"])

    async def running_stream(self, session_id: str) -> str | None:
        """The stream key of the turn streaming in ``session_id`` on some replica, or None."""
        value = await self.redis.get(lock_key(session_id))
        if value is None:
            return None
        return stream_key(value.decode().rsplit(":", 1)[1])

    async def request_abort(self, session_id: str) -> bool:
        """Ask the replica running the session's turn to abort it; False when none is streaming."""
        if await self.redis.get(lock_key(session_id)) is None:
            return False
        await self.redis.publish(ABORT_CHANNEL, session_id)
        return True

    def announce_credentials_changed(self) -> None:
        """Tell every replica to check its sockets' credentials now (fire and forget: each replica also
        checks on its own every few seconds)."""
        task = asyncio.create_task(self._announce(), name="announce-credentials")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _announce(self) -> None:
        try:
            await self.redis.publish(CREDENTIALS_CHANNEL, b"changed")
        except Exception:  # noqa: BLE001 - the replicas' periodic checks still close the sockets
            log.warning("could not announce a credential change through Redis", exc_info=True)

    # --- publishing a running turn --------------------------------------------------------------

    def publish(self, turn: RunningTurn) -> None:
        """Mirror ``turn`` into Redis until it ends, renewing its lock; the lock is released at the end."""
        task = asyncio.create_task(self._publish(turn), name=f"publish-{turn.session_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, turn: RunningTurn) -> None:
        key = stream_key(turn.message_id)
        renew = asyncio.create_task(self._keep_lock(turn))
        encoder = self.encoder()
        try:
            async for batch in turn.batches():
                data = b"".join(map(encoder.encode, batch))
                end = isinstance(batch[-1], (StreamEnd, StreamError))
                fields: dict[str, bytes] = {"d": data}
                if end:
                    fields["e"] = _END
                try:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        pipe.xadd(key, fields, maxlen=STREAM_CAP, approximate=True)
                        pipe.expire(key, STREAM_TTL_SECONDS)
                        await pipe.execute()
                except Exception:  # noqa: BLE001 - the turn goes on; resumes elsewhere miss this burst
                    log.warning("could not publish the stream of session %s to Redis", turn.session_id, exc_info=True)
        finally:
            renew.cancel()
            await self.release(turn)

    async def _keep_lock(self, turn: RunningTurn) -> None:
        """Renew the lock while the turn runs. A lock Redis lost (a restart) is taken again; a lock another
        turn took meanwhile ends this turn (two answers must not write one session at once)."""
        value = f"{self.replica_id}:{turn.message_id}"
        while True:
            await asyncio.sleep(self.lock_ttl_ms / 3000)
            try:
                renewed = await self._renew(keys=[lock_key(turn.session_id)], args=[value, self.lock_ttl_ms])
            except Exception as e:  # noqa: BLE001 - retried at the next renewal
                warn_limited(log, "renew-lock", "could not renew the stream lock of session %s: %r", turn.session_id, e)
                continue
            if renewed == 2:
                log.warning("the stream lock of session %s was gone from Redis; taken again", turn.session_id)
            elif not renewed:
                log.warning("the stream lock of session %s is held by another turn; ending this one", turn.session_id)
                turn.abort("lock lost")
                return

    async def follow(self, key: str, session_id: str) -> AsyncIterator[bytes]:
        """The stream's chunks from its start, then live until its end. Ends with an error chunk when the
        lock of the turn is gone without an end (its replica died) or Redis cannot be read."""
        last = "0-0"
        quiet = 0  # empty reads in a row while the lock is gone
        while True:
            try:
                async with asyncio.timeout(FOLLOW_READ_SECONDS):
                    reply = await self.redis.xread({key: last}, count=100, block=1000)
                    if not reply:
                        # The owner releases the lock just before it publishes the end: give the end a moment.
                        quiet = quiet + 1 if await self.redis.get(lock_key(session_id)) is None else 0
                        ended = quiet >= 3 and await self._ended(key)
            except Exception as e:  # noqa: BLE001 - Redis gone: the resume says so and ends
                warn_limited(log, "follow", "a resumed stream of session %s lost Redis: %r", session_id, e)
                yield self._error_chunk("The gateway lost the stream it was relaying (Redis); reload the session.")
                return
            if not reply:
                if quiet >= 3 and not ended:
                    yield self._error_chunk("The replica streaming this answer stopped; reload the session.")
                    return
                continue
            for _, entries in reply:
                for entry_id, fields in entries:
                    last = entry_id
                    yield fields[b"d"]
                    if fields.get(b"e") == _END:
                        return

    def _error_chunk(self, message: str) -> bytes:
        """The stream's error part and its end, as a turn that failed sends them."""
        return self.encoder().encode(StreamError("SERVICE_UNAVAILABLE", message))

    async def _ended(self, key: str) -> bool:
        entries = await self.redis.xrevrange(key, count=1)
        return bool(entries) and entries[0][1].get(b"e") == _END

    async def aclose(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)
        await self.redis.aclose()
        await self.redis.connection_pool.disconnect()


class RedisSessionLocks(InProcessLocks):
    """The session locks shared by replicas: held here and in Redis (``Cluster.claim``)."""

    def __init__(self, cluster: Cluster) -> None:
        super().__init__()
        self.cluster = cluster

    async def claim(self, turn: RunningTurn) -> None:
        self.hold(turn)  # before the first await: a second request here is refused at once
        try:
            claimed = await self.cluster.claim(turn)
        except Exception as e:  # noqa: BLE001 - Redis down: a 503 that says so, no traceback (not our defect)
            self.forget(turn)
            log.warning("the stream lock of session %s could not be taken (Redis): %r", turn.session_id, e)
            raise ApiError(
                "SERVICE_UNAVAILABLE",
                "The gateway could not reach Redis; nothing was sent.",
                retry_after=OUTAGE_RETRY_SECONDS,
            ) from None
        if not claimed:
            self.forget(turn)
            raise ApiError("STREAM_IN_PROGRESS", STREAM_IN_PROGRESS_MESSAGE)

    async def release(self, turn: RunningTurn) -> None:
        await self.cluster.release(turn)
