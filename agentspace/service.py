"""The one door: the operations every transport offers, once: chat start, sessions, usage, models, context
inspection, clients, and the ``/v1`` endpoints' provider calls.

Transports (the WebSocket at ``/gateway``, ``POST /api/chat``, the REST routes, ``/api/clients``, the web app's
routes and every ``/v1`` endpoint) parse their wire format, call this module and encode the answer; none reads
the registry itself (``tests/test_import_graph.py``). Everything refused here is an ``ApiError`` with a protocol code;
each transport turns it into its own wire error in one place (``errors.HTTP_STATUS`` gives HTTP statuses).

Input is checked here, at the edge, before it reaches the stores or a log line: ids have a length limit and
a character set, and JSON is parsed by ``parse_json``, which refuses nesting too deep to decode. Nothing
here imports aiohttp.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from . import attachments, tokens
from .calls import Ceiling, ProviderCall, messages_body_ceiling
from .catalog import group_like, usable_models, without_keyless_plugin_models
from .clients import ADMIN, Client, apply_settings, name_problem, settings_problems
from .config import Config
from .context import inspect_session
from .context_policy import compact_session
from .direct_call import DirectCall
from .errors import ApiError, SessionDamaged
from .export import EXPORT_FORMATS, export_session
from .limits import SHUTTING_DOWN_MESSAGE
from .periods import parse_since
from .pipeline import ChatRequest, Turn, owns_now, running, start_turn
from .providers.base import Provider, ProviderRequest, ThinkingSettings
from .registry import ModelNotFound, Registry
from .routed_call import start_direct
from .routing import Group, deployment_states
from .session_locks import SessionWork
from .storage.errors import ClientExists, ClientNotFound, SessionNotFound
from .storage.reports import REPORTS, merge_named
from .storage.search import search_sessions
from .storage.shapes import SESSION_ID, TITLE_LENGTH, Listing, as_seen
from .types import LONE_SURROGATE, ChatMessage, FilePart, Tool, clean_text, now_iso
from .vault import resolve_key

# ``GET /healthz``'s statuses (docs/deploy.md): every one but "ok" is a 503, so a load balancer sends calls elsewhere.
HEALTH_STATUSES = ("ok", "unavailable", "shutting down")
# How long the health check waits for Redis to answer a PING.
HEALTH_REDIS_SECONDS = 2.0

# How long stopping an answer waits for it to be stored (an abort ends its call at once; this is a bound).
STOP_WAIT_SECONDS = 5.0

# Ids are stored, logged and echoed: plain ASCII of bounded length, so none can carry a line break, a
# terminal escape or a lone surrogate. Model ids cover the providers' forms ("anthropic/claude-sonnet-4-5",
# "bedrock/anthropic.claude-3-sonnet-20240229-v1:0", "vertex_ai/claude-3-5-sonnet@20240620").
MAX_MODEL_ID = 200
MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+=-]*")
# Message ids come from clients (the AI SDK's generateId, UUIDs) or are ours (msg_<hex>).
MAX_MESSAGE_ID = 128
MESSAGE_ID = re.compile(r"[A-Za-z0-9._:@+=-]+")
# WebSocket request ids are echoed in every reply; a longer one, or one that cannot be encoded, is refused.
MAX_REQUEST_ID = 256


def session_owner(session: dict[str, Any]) -> str:
    """The caller a stored session belongs to (sessions from before clients existed are the admin's)."""
    return str(session.get("client") or ADMIN)


def invalid(fields: dict[str, str]) -> ApiError:
    """An ``INVALID_MESSAGE`` naming each field that is wrong (``fields``: path -> what is wrong)."""
    return ApiError(
        "INVALID_MESSAGE",
        "; ".join(f"{path}: {problem}" if path else problem for path, problem in fields.items()),
        fields,
    )


# --- validation at the edge ---------------------------------------------------------------------


def parse_json(text: str | bytes, what: str = "the body") -> Any:
    """Decode JSON; ``INVALID_MESSAGE`` when it is not JSON, not UTF-8, or nested too deep to decode
    (``[`` x 3000 exhausts the decoder's recursion: a refusal, not a traceback)."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise invalid({"": f"{what} must be JSON (UTF-8, nested at most a few hundred levels)"}) from None


def _no_constant(name: str) -> Any:
    """``NaN``, ``Infinity`` and ``-Infinity``: Python's decoder takes them, JSON has no such numbers."""
    raise ValueError(f"{name} is not JSON")


def session_label_problem(value: Any) -> str | None:
    """What is wrong with a session id to look usage up by, or None: a session's id, or the label a /v1
    session header files usage under (any text: its first 200 characters, ``v1_common.session_id``)."""
    if not isinstance(value, str) or not value.strip() or len(value) > 200:
        return "must be a session id, or the name a /v1 session header gave (1-200 characters)"
    if any(ord(c) < 0x20 or ord(c) == 0x7F or 0xD800 <= ord(c) <= 0xDFFF for c in value):
        return "must hold no control characters"
    return None


def session_id_problem(value: Any) -> str | None:
    """What is wrong with a session id (it names a file), or None."""
    if value is None:
        return "required"
    if isinstance(value, str) and SESSION_ID.fullmatch(value):
        return None
    return "must be 1-128 characters from A-Z, a-z, 0-9, '_' and '-'"


def model_id_problem(value: Any) -> str | None:
    """What is wrong with the shape of a model id, or None; whether a provider serves it is checked later
    (``MODEL_NOT_FOUND``)."""
    if not isinstance(value, str):
        return "must be a string"
    if len(value) > MAX_MODEL_ID or not MODEL_ID.fullmatch(value):
        return f"must be a model id (provider/model) of at most {MAX_MODEL_ID} characters from A-Z, a-z, 0-9 and . _ : / @ + = -"
    return None


def message_id_problem(value: Any) -> str | None:
    """What is wrong with a client's message id, or None."""
    if not isinstance(value, str):
        return "must be a string"
    if len(value) > MAX_MESSAGE_ID or not MESSAGE_ID.fullmatch(value):
        return f"must be at most {MAX_MESSAGE_ID} characters from A-Z, a-z, 0-9 and . _ : @ + = -"
    return None


def checked(value: Any, path: str, problem: Callable[[Any], str | None]) -> str:
    """``value`` if ``problem`` finds nothing wrong with it, else ``INVALID_MESSAGE`` naming ``path``."""
    if (what := problem(value)) is not None:
        raise invalid({path: what})
    return value


def request_id_ok(value: Any) -> bool:
    """A WebSocket request id that can be echoed: an integer, or a bounded string without lone surrogates."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and len(value) <= MAX_REQUEST_ID and not LONE_SURROGATE.search(value)


@dataclass
class ChatInput:
    """The fields of a chat request, as each transport names them (their paths in error messages)."""

    content: Any
    session_id: Any = None
    model: Any = None
    message_id: Any = None
    paths: dict[str, str] = field(default_factory=dict)

    def path(self, name: str) -> str:
        return self.paths.get(name, name)


def chat_request(
    chat: ChatInput,
    *,
    client: str,
    endpoint: str = "ws",
    create_if_missing: bool = False,
    history: list[dict[str, Any]] | None = None,
    files: list[FilePart] | None = None,
) -> ChatRequest:
    """Check a chat request's fields, the one validator for every transport; every problem is a field error.
    ``files``: what the message attaches (``attachments.py``); with files, the text may be empty."""
    errors: dict[str, str] = {}
    if not isinstance(chat.content, str):
        errors[chat.path("content")] = "required: a string"
    elif not chat.content.strip() and not files:
        errors[chat.path("content")] = "must not be empty"
    optional = (("session_id", session_id_problem), ("model", model_id_problem), ("message_id", message_id_problem))
    for name, problem in optional:
        value = getattr(chat, name)
        if value is not None and (what := problem(value)) is not None:
            errors[chat.path(name)] = what
    if errors:
        raise invalid(errors)
    return ChatRequest(
        clean_text(chat.content),
        chat.session_id,
        chat.model,
        client=client,
        endpoint=endpoint,
        create_if_missing=create_if_missing,
        import_messages=history or [],
        user_message_id=chat.message_id,
        files=list(files or []),
    )


# --- the operations -----------------------------------------------------------------------------


def _checked_limit(limit: object) -> int:
    """A listing's or a search's ``limit``: an integer from 1 to ``MAX_SEARCH_LIMIT``."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_SEARCH_LIMIT:
        raise invalid({"limit": f"must be an integer from 1 to {MAX_SEARCH_LIMIT}"})
    return limit


@dataclass
class CompactFor:
    """The session an on-demand compaction runs for (``context_policy.TurnLike``)."""

    session_id: str
    model: str
    client: str
    endpoint: str


MAX_QUERY_LENGTH = 500
# A search answers the most recent matches: this many unless the caller asks for more, at most MAX_SEARCH_LIMIT.
SEARCH_LIMIT = 50
MAX_SEARCH_LIMIT = 1000

# Longer than the titles made from a first message, still one line in a sidebar.
MAX_TITLE_LENGTH = 4 * TITLE_LENGTH


# Stored session ids are at most this long (storage.embedded.sessions.SESSION_ID).
MAX_SESSION_ID = 128


def scope_suffix(client: str) -> str:
    """What a client's own session ids end with when stored (see ``Service.resolve``)."""
    return "-c" + hashlib.sha256(client.encode()).hexdigest()[:10]


class Service:
    """What a client may ask of the gateway, whichever transport it speaks.

    Session ids are scoped to their caller: an id a client names (``/api/chat``'s ``id``, ``sessionId``)
    names a session in its own namespace (``resolve``): stored as named while no one else has that id, else
    as ``<id>-c<hash of the client>``, and shown to the client as ``<id>`` either way. Another client's id is
    then indistinguishable from a free one: it starts (or continues) a session of the caller's own.

    ``shutting_down`` is set when shutdown begins: no new turn starts after it, on any transport.
    ``caller`` is who asks: "admin" (the gateway token) sees everything, a client its own sessions,
    its own usage and the models it may use; another client's session is ``SESSION_NOT_FOUND``.
    """

    def __init__(
        self, gw: Registry, shutting_down: asyncio.Event, caller: str = ADMIN, credential: str | None = None
    ) -> None:
        self.gw = gw
        self.shutting_down = shutting_down
        self.caller = caller
        # The SHA-256 of the client key the request authenticated with: each provider call checks it is still
        # the client's (a key rotated while a request's body was arriving sends nothing).
        self.credential = credential

    @property
    def config(self) -> Config:
        """The gateway's settings (what the transports read: body limits, origins, disconnect policy)."""
        return self.gw.config

    async def resolve(self, session_id: str) -> str:
        """The stored id of the session a caller names. The admin's ids are stored as they are. A client's
        id names, in order: its own session of that id; its scoped session (``<id>-c<hash>``); the id itself
        when no one has it (a new session, stored as named); else (another's) a new scoped session of its
        own. The same id of two clients is thus never one session, and neither can tell the other's exists."""
        if self.caller == ADMIN:
            return session_id
        suffix = scope_suffix(self.caller)
        scoped = session_id + suffix
        if await self._session_of_caller(session_id):
            return session_id
        if await self._session_of_caller(scoped):
            return scoped
        if session_id not in self.gw.locks and not await self.gw.sessions.exists(session_id):
            return session_id  # free: stored as named
        if len(scoped) > MAX_SESSION_ID:
            raise invalid({"id": f"a client's session ids are at most {MAX_SESSION_ID - len(suffix)} characters"})
        return scoped

    async def _session_of_caller(self, session_id: str) -> bool:
        """Whether ``session_id`` is the caller's (running or stored)."""
        if len(session_id) > MAX_SESSION_ID:
            return False
        turn = running(self.gw, session_id)
        if turn is not None:
            return await self._turn_of_caller(turn, session_id)
        session = await self.gw.sessions.get(session_id)
        return session is not None and await owns_now(self.gw, self.caller, session)

    async def _turn_of_caller(self, turn: Turn, session_id: str) -> bool:
        """Whether the answer running in ``session_id`` is the caller's: its client's, and for a client, in a
        session made since the client was (an earlier client of the name, removed, may still be streaming)."""
        if turn.client != self.caller:
            return False
        if self.caller == ADMIN:
            return True
        session = await self.gw.sessions.get(session_id)
        return session is not None and await owns_now(self.gw, self.caller, session)

    def visible(self, stored_id: str) -> str:
        """The id the caller knows a stored session by (``resolve`` undone)."""
        suffix = scope_suffix(self.caller) if self.caller != ADMIN else None
        if suffix is not None and stored_id.endswith(suffix) and len(stored_id) > len(suffix):
            return stored_id[: -len(suffix)]
        return stored_id

    def _shown(self, session: dict[str, Any]) -> dict[str, Any]:
        return session if self.caller == ADMIN else {**session, "id": self.visible(str(session.get("id")))}

    async def start_chat(self, request: ChatRequest) -> Turn:
        if self.shutting_down.is_set():
            raise ApiError("SERVICE_UNAVAILABLE", SHUTTING_DOWN_MESSAGE)
        if request.client != self.caller:
            raise ApiError("FORBIDDEN", "A chat request must be made as its caller.")
        if request.session_id is not None:
            request = dataclasses.replace(request, session_id=await self.resolve(request.session_id))
        return await start_turn(self.gw, request)

    async def resumable_turn(self, session_id: str) -> Turn | None:
        """The caller's running answer in the session, None when nothing streams; SESSION_NOT_FOUND for a
        session of another client (named by the id the caller gave: the stored one would tell it is taken)."""
        stored = await self.resolve(session_id)
        turn = running(self.gw, stored)
        if self.caller == ADMIN:
            return turn
        if turn is not None:
            if not await self._turn_of_caller(turn, stored):
                raise _not_found(session_id)
            return turn
        await self._owned(session_id)
        return None

    async def stream_elsewhere(self, stored_id: str) -> AsyncIterator[bytes] | None:
        """The UI message stream of the answer running in the session on another replica (Redis), from its
        first chunk, or None when none is."""
        cluster = self.gw.cluster
        key = await cluster.running_stream(stored_id) if cluster is not None else None
        if cluster is None or key is None:
            return None
        return cluster.follow(key, stored_id)

    async def _owned(self, session_id: str) -> dict[str, Any]:
        session = await self.gw.sessions.get(await self.resolve(session_id))
        if session is None or not await owns_now(self.gw, self.caller, session):
            raise _not_found(session_id)
        return session

    async def list_sessions(self, limit: object = None) -> tuple[Listing, bool]:
        """Every readable session (the caller's own, for a client), most recent activity first, the ``limit``
        most recent only when given (as a search's), and the damaged files the listing skipped; and whether more
        sessions are there."""
        if limit is not None:
            limit = _checked_limit(limit)
        listing = await self.gw.sessions.listing()
        if self.caller != ADMIN:
            client = await self.gw.clients.get(self.caller)
            mine = [
                self._shown(s)
                for s in listing.sessions
                if s.get("client") == self.caller and (client is None or client.owns_since(s.get("createdAt")))
            ]
            listing = Listing(mine, [])
        if limit is None:
            return listing, False
        return Listing(listing.sessions[:limit], listing.damaged_files), len(listing.sessions) > limit

    async def get_session(self, session_id: str) -> dict[str, Any]:
        """The session with its messages; file parts carry their bytes as a ``data:`` URL (``url``)."""
        session = await self._owned(checked(session_id, "id", session_id_problem))
        return self._shown(await attachments.with_urls(self.gw, as_seen(session)))

    async def delete_session(self, session_id: str) -> None:
        checked(session_id, "id", session_id_problem)
        if self.caller != ADMIN:
            session_id = str((await self._owned(session_id))["id"])
        if await self._streaming(session_id):
            raise ApiError("STREAM_IN_PROGRESS", "This session is streaming an answer; wait for it to end.")
        if not await self.gw.sessions.delete(session_id):
            raise _not_found(session_id)
        await self.gw.blobs.release(session_id)  # the files no other session uses go with it

    async def _streaming(self, session_id: str) -> bool:
        """Whether an answer streams in the session, here or (with Redis) on another replica."""
        if session_id in self.gw.locks:
            return True
        return self.gw.cluster is not None and await self.gw.cluster.running_stream(session_id) is not None

    async def stop_answer(self, session_id: str) -> None:
        """Stop the caller's running answer in the session (``chat.abort``: what was generated is kept); returns
        once it is stored and the session free (a stop button, then the next question at once)."""
        nothing = ApiError("NOT_FOUND", f"No answer is streaming in session {session_id!r}.")
        try:
            turn = await self.resumable_turn(checked(session_id, "id", session_id_problem))
        except ApiError as e:  # none of the caller's (a free id, another client's session): nothing of its own streams
            if e.code != "SESSION_NOT_FOUND":
                raise
            raise nothing from None
        if turn is not None and not turn.done:
            turn.abort()
            await until_stopped(turn)
        elif self.gw.cluster is None or not await self.gw.cluster.request_abort(await self.resolve(session_id)):
            raise nothing  # nothing streams here, nor (with Redis) on another replica

    async def rename_session(self, session_id: str, title: object) -> dict[str, Any]:
        """Give the caller's session a title; returns its summary."""
        session_id = str((await self._owned(checked(session_id, "id", session_id_problem)))["id"])
        if not isinstance(title, str) or not title.strip():
            raise invalid({"title": "required: a non-empty string"})
        title = " ".join(clean_text(title).split())
        if len(title) > MAX_TITLE_LENGTH:
            raise invalid({"title": f"at most {MAX_TITLE_LENGTH} characters"})
        try:
            await self.gw.sessions.set_title(session_id, title)
        except SessionNotFound:
            raise _not_found(session_id) from None
        session = self._shown(await self._owned(session_id))
        return {k: v for k, v in session.items() if k != "messages"}

    async def inspect_context(
        self,
        session_id: str | None,
        model: str | None = None,
        paths: tuple[str, str] = ("id", "model"),
        user_message: object = None,
    ) -> dict[str, Any]:
        """What the next call in the session would send; ``model`` (if given) must be served by a provider;
        ``user_message`` (if given) is the message about to be sent, measured with the rest."""
        session_id = checked(session_id, paths[0], session_id_problem)
        if self.caller != ADMIN:
            session_id = str((await self._owned(session_id))["id"])
        if model is not None:
            await self.check_model(checked(model, paths[1], model_id_problem))
        if user_message is not None and not isinstance(user_message, str):
            raise invalid({"userMessage": "must be a string"})
        draft = clean_text(user_message) if isinstance(user_message, str) else None
        await tokens.loaded()
        inspection = await inspect_session(self.gw, session_id, model, draft)
        if inspection is None:
            raise _not_found(self.visible(session_id))
        return {**inspection, "sessionId": self.visible(session_id)}

    async def compact_session(self, session_id: object, *, field: str = "id") -> dict[str, Any]:
        """Summarise every turn of the caller's session but the latest (``context_policy.compact_session``);
        ``field``: the id's name in the request, for a refusal."""
        session = await self._owned(checked(session_id, field, session_id_problem))
        stored = str(session["id"])  # a client's session is stored under its own id, not the one it knows
        if await self._streaming(stored):
            raise ApiError("STREAM_IN_PROGRESS", "This session is streaming an answer; wait for it to end.")
        model = session.get("model") or self.gw.default_model
        who = CompactFor(stored, model, str(session.get("client") or self.caller), endpoint="compact")
        # Held as a turn holds it: a second compaction, or a turn (which may compact too), is refused while the
        # summary is bought, or both would buy one and store it.
        work = SessionWork(stored, who.client)
        await self.gw.locks.claim(work)
        try:
            return {**await compact_session(self.gw, who), "sessionId": self.visible(stored)}
        finally:
            await self.gw.locks.release(work)
            self.gw.locks.forget(work)

    async def search_sessions(self, query: object, limit: object = None, *, field: str = "q") -> tuple[Listing, bool]:
        """The caller's sessions whose title or messages contain ``query`` (case-insensitive), most recent first,
        each with a ``match`` snippet, at most ``limit`` (``SEARCH_LIMIT`` when None), with the session files the
        search could not read (as the listing: for the admin); and whether more matched. ``field``: the query's
        name in the request, for a refusal."""
        if not isinstance(query, str) or not query.strip():
            raise invalid({field: "required: a non-empty string"})
        if len(query) > MAX_QUERY_LENGTH:
            raise invalid({field: f"at most {MAX_QUERY_LENGTH} characters"})
        limit = _checked_limit(SEARCH_LIMIT if limit is None else limit)
        if self.caller == ADMIN:
            found = await search_sessions(self.gw.sessions, clean_text(query), limit=limit + 1)
            return Listing(found.sessions[:limit], found.damaged_files), len(found.sessions) > limit
        # As in the listing: the caller's own sessions, not an earlier client's of the same name, by the ids
        # the caller knows them by.
        client = await self.gw.clients.get(self.caller)
        since = client.created_at if client is not None else None
        found = await search_sessions(
            self.gw.sessions, clean_text(query), client=self.caller, since=since, limit=limit + 1
        )
        return Listing([self._shown(s) for s in found.sessions[:limit]], []), len(found.sessions) > limit

    async def export_session(self, session_id: object, fmt: object) -> tuple[str, str]:
        """The caller's session as ``md`` or ``json``: (the document, its media type)."""
        session = await self._owned(checked(session_id, "id", session_id_problem))
        if fmt not in EXPORT_FORMATS:
            raise invalid({"format": f"must be one of {', '.join(EXPORT_FORMATS)}"})
        return export_session(self._shown(session), str(fmt))  # the caller's id, never the stored one

    async def check_model(self, model: str) -> None:
        await self.provider(model)

    async def usage(
        self,
        session_id: str | None = None,
        since: str | None = None,
        by: str = "model",
        paths: tuple[str, str, str] = ("sessionId", "since", "by"),
    ) -> dict[str, Any]:
        """Tokens and cost per model (the ``usage.report`` shape), or grouped as ``by`` says (``storage.embedded.usage.REPORTS``);
        a client gets its own records only."""
        if by not in REPORTS:
            raise invalid({paths[2]: f"must be one of {', '.join(REPORTS)}"})
        stored_id = False  # the id of a session (else only a label a /v1 session header gave, README)
        if session_id is not None:
            checked(session_id, paths[0], session_label_problem)
            stored_id = session_id_problem(session_id) is None
            if stored_id and self.caller != ADMIN:  # a session of its own by that id; else a /v1 header's label
                try:
                    stored = await self.resolve(session_id)
                except SessionDamaged:  # its records are intact: the caller's own of that id (as the CLI reports)
                    stored = session_id
                if stored != session_id and await self.gw.sessions.exists(stored):
                    session_id = stored
        when = None
        if since:
            try:
                when = parse_since(since)
            except ValueError as e:
                raise invalid({paths[1]: str(e)}) from None
        client = None if self.caller == ADMIN else self.caller
        if client is None and stored_id and session_id is not None:
            try:
                client = await self._session_owner(session_id)
            except SessionDamaged:  # whose it was cannot be read: every record of the id, as the CLI reports
                client = None
        if client is not None and self.caller != ADMIN:  # not an earlier client's of the same name
            current = await self.gw.clients.get(client)
            if current is not None and current.since is not None:
                when = current.since if when is None else max(when, current.since)
        report = await self.gw.usage.report(by=by, since=when, session_id=session_id, client=client)
        if self.caller == ADMIN:
            return report
        # The server's files are the admin's to know of, as a listing's damagedFiles (docs/protocol.md).
        report = {**report, "damagedFiles": []}
        if "perSession" in report:  # the ids the client knows its sessions by
            report["perSession"] = self._per_session_as_known(report["perSession"])
        return report

    def _per_session_as_known(self, per_stored_id: dict[str, Any]) -> dict[str, Any]:
        """A client's totals per session under the ids it knows: its scoped session (``<id>-c<hash>``) and
        its /v1 calls filed under the label ``<id>`` are one name to it, so their totals are summed."""
        per_session: dict[str, Any] = {}
        for sid, totals in per_stored_id.items():
            merge_named(per_session, self.visible(sid), totals)
        for totals in per_session.values():  # float sums carry noise below a nano-dollar (as reports round)
            for name in ("totalCost", "serverToolCost"):
                totals[name] = round(totals[name], 10)
        return per_session

    async def _session_owner(self, session_id: str) -> str | None:
        """Whose session ``session_id`` is (None when no session has that id). Session ids name a session in
        their caller's own namespace: another client's ``X-Agentspace-Session: <that id>`` files its usage
        under its own (client, id), never in the owner's report of the session. The gateway token's session
        shows its records and those that name no client (older ones), not a client's of the same id."""
        session = await self.gw.sessions.get(session_id)
        return None if session is None else session_owner(session)

    async def models(self) -> list[dict[str, Any]]:
        # The same list as `agentspace models --json`; it reads the vault and the cost map, so off the loop.
        models = await asyncio.to_thread(usable_models, self.gw.config, self.gw.providers)
        models = await without_keyless_plugin_models(self.gw.config, self.gw.providers, models)
        client = await self.gw.guard.client(self.caller)
        if client is None:
            return models
        return [m for m in models if client.model_allowed(str(m.get("id")))]

    # --- the /v1 endpoints: one stateless provider call each ------------------------------------

    def group(self, model: str) -> Group | None:
        """The model group named ``model`` ([models.groups]), or None."""
        return self.gw.router.group(model)

    def group_like(self, name: str) -> str | None:
        """The model group whose name ``name`` is a typo of, or None."""
        return group_like(name, self.gw.router.groups)

    async def provider(self, model: str) -> Provider:
        """The provider serving ``model``; ``MODEL_NOT_FOUND`` (with the closest known id the caller may use)
        when none does."""
        try:
            return self.gw.provider_for(model)
        except ModelNotFound as e:
            raise ApiError("MODEL_NOT_FOUND", await self.gw.not_found_message(self.caller, e)) from None

    def provider_request(
        self,
        model: str,
        system: str,
        messages: list[ChatMessage],
        tools: list[Tool],
        max_tokens: int | None,
        reasoning_budget: int | None,
        params: dict[str, Any],
    ) -> ProviderRequest:
        """A ProviderRequest of exactly what the client sent: no context section, no gateway tool."""
        gw = self.gw
        prefix = model.split("/", 1)[0]
        settings = gw.config.provider_settings(prefix)
        info = gw.model_info(model)
        thinking = None
        if reasoning_budget is not None:  # the provider applies it only where the model supports it
            thinking = ThinkingSettings(reasoning_budget, info.adaptive_thinking_only)
        return ProviderRequest(
            model=model,
            system=system,
            messages=messages,
            model_info=info,
            max_tokens=max_tokens or int(gw.config["chat"]["max_tokens"]),
            tools=tools,
            thinking=thinking,
            api_key=resolve_key(gw.config, prefix),
            base_url=settings["base_url"],
            options=settings,
            params=params,
        )

    def provider_call(self, model: str, session_id: str | None, endpoint: str, fallbacks: bool = False) -> ProviderCall:
        """The caller's call to ``model`` (``calls.ProviderCall``: admitted, reserved, written ahead, one usage
        record); ``session_id`` is the label the client sent, if any. With ``fallbacks``, the call goes on to
        the model's ``[models] fallbacks`` when it fails before its first output (and is reserved so)."""
        return ProviderCall(
            self.gw,
            model,
            session_id=session_id,
            client=self.caller,
            endpoint=endpoint,
            credential=self.credential,
            fallbacks=fallbacks and bool(self.gw.config["models"]["fallbacks"].get(model)),
        )

    def messages_ceiling(self, model: str, body: dict[str, Any]) -> Ceiling:
        """The most a Messages API ``body`` relayed as it is may cost (its reservation)."""
        return messages_body_ceiling(self.gw, model, body)

    async def start_call(self, call: ProviderCall, request: ProviderRequest, *, whole: bool = False) -> DirectCall:
        """Start an admitted call on its model, or over a model group's deployments (``routed_call.py``);
        ``whole``: answered in one body, not streamed."""
        return await start_direct(self.gw, request, call, whole=whole)

    async def health(self) -> dict[str, str]:
        """Whether this replica can serve: ``status`` (``HEALTH_STATUSES``), with ``storage`` (why it cannot be
        reached), and ``database`` and ``redis`` ("ok" or the reason) where the gateway uses them."""
        if self.shutting_down.is_set():  # draining: a load balancer sends new calls elsewhere
            return {"status": "shutting down"}
        body = {"status": "ok"}
        problem = await self.gw.storage.health()
        if problem is not None:
            body.update(status="unavailable", storage=problem)
        if self.gw.storage.shared:
            body["database"] = problem or "ok"
        if self.gw.cluster is not None:
            problem = await self.gw.cluster.health(HEALTH_REDIS_SECONDS)
            body["redis"] = problem or "ok"
            if problem is not None:
                body["status"] = "unavailable"
        return body

    # --- the model groups' deployments, clients and credentials: the gateway token only ---------

    def _admin_only(self, what: str) -> None:
        if self.caller != ADMIN:
            raise ApiError("FORBIDDEN", f"{what} are shown to the gateway token only.")

    async def deployments(self) -> list[dict[str, Any]]:
        """The state of every deployment of the model groups (routing.py)."""
        self._admin_only("The deployments")
        return await deployment_states(self.gw.router)

    async def _public(self, client: Client) -> dict[str, Any]:
        posted, in_flight = await self.gw.guard.spend(client)
        return client.public(posted, self.gw.guard.clock(), in_flight)

    async def _client(self, name: str) -> Client:
        client = await self.gw.clients.get(name)
        if client is None:
            raise ApiError("NOT_FOUND", f"No client {name!r}.")
        return client

    async def list_clients(self) -> list[dict[str, Any]]:
        """Every client with its spend in the current period (no key, no key hash)."""
        self._admin_only("The clients")
        return [await self._public(c) for c in await self.gw.clients.list()]

    async def get_client(self, name: str) -> dict[str, Any]:
        self._admin_only("The clients")
        return await self._public(await self._client(name))

    async def add_client(self, settings: object) -> tuple[dict[str, Any], str]:
        """Add a client named in ``settings``; the client and its key (shown this once: only its hash is kept)."""
        self._admin_only("The clients")
        body = client_settings(settings)
        name = body.pop("name", None)
        if (problem := name_problem(name)) is not None:
            raise invalid({"name": problem})
        client = Client(name=name, key_hash="", created_at=now_iso())
        apply_settings(client, body)
        try:
            key = await self.gw.clients.add(client)
        except ClientExists:
            raise ApiError("INVALID_MESSAGE", f"A client {name!r} exists already.", {"name": "taken"}) from None
        return await self._public(client), key

    async def update_client(self, name: str, settings: object) -> dict[str, Any]:
        """Change a client's budget, period, rate limits or models (null clears a limit)."""
        self._admin_only("The clients")
        body = client_settings(settings)
        if "name" in body:
            raise invalid({"name": "a client cannot be renamed; add a new one"})
        try:
            client = await self.gw.clients.update(name, lambda c: apply_settings(c, body))
        except ClientNotFound:
            raise ApiError("NOT_FOUND", f"No client {name!r}.") from None
        if self.gw.alerts is not None and ("budgetUsd" in body or "period" in body):
            # A budget lowered below the spend alerts now, not at the client's next record.
            await self.gw.alerts.budget_changed(name)
        return await self._public(client)

    async def remove_client(self, name: str) -> None:
        """Remove a client: its key stops working (its open sockets close: ``credentials_changed``)."""
        self._admin_only("The clients")
        try:
            await self.gw.clients.remove(name)
        except ClientNotFound:
            raise ApiError("NOT_FOUND", f"No client {name!r}.") from None
        self.credentials_changed()

    async def rotate_client(self, name: str) -> tuple[dict[str, Any], str]:
        """A new key for the client (returned, once); the old one is refused from now on."""
        self._admin_only("The clients")
        try:
            key = await self.gw.clients.rotate(name)
        except ClientNotFound:
            raise ApiError("NOT_FOUND", f"No client {name!r}.") from None
        self.credentials_changed()
        return await self._public(await self._client(name)), key

    def credentials_changed(self) -> None:
        """A key was rotated or removed: tell the other replicas (this one's sockets: the transport's part)."""
        if self.gw.cluster is not None:
            self.gw.cluster.announce_credentials_changed()

    async def key_holders(self) -> dict[str, str]:
        """The hash of each client key -> its client's name (which open sockets still hold a valid key)."""
        return {c.key_hash: c.name for c in await self.gw.clients.list()}


CLIENT_SETTINGS = ("budgetUsd", "period", "rpm", "tpm", "models")


def client_settings(body: object) -> dict[str, Any]:
    """A client's settings as a request body gives them (``clients.settings_problems``), ``name`` allowed."""
    if not isinstance(body, dict):
        raise invalid({"": "the body must be a JSON object"})
    unknown = [k for k in body if k not in (*CLIENT_SETTINGS, "name")]
    if unknown:
        raise invalid({k: f"unknown field; expected one of {', '.join(CLIENT_SETTINGS)}" for k in unknown})
    if problems := settings_problems(body):
        raise invalid(problems)
    return dict(body)


async def until_stopped(turn: Turn, *also: asyncio.Task[Any] | None) -> None:
    """Wait (at most STOP_WAIT_SECONDS) for an aborted turn to end: its answer stored, its session free, and
    ``also`` (a transport's task sending its last frames) done."""
    tasks = [task for task in (turn.task, *also) if task is not None and not task.done()]
    if tasks:
        await asyncio.wait(tasks, timeout=STOP_WAIT_SECONDS)


def _not_found(session_id: str) -> ApiError:
    return ApiError("SESSION_NOT_FOUND", f"No session {session_id!r}.")
