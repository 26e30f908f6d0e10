"""Authentication, origin and host checks, and rate limits (docs/protocol.md#authentication).

- Every route but ``/healthz`` needs the gateway token or a client key, compared in constant
  time. The caller (``admin`` for the gateway token, else the client's name) is resolved once per request
  and put on the request (``caller(request)``); admin routes (``/api/clients``) answer 403 to a client.
- Requests carrying an ``Origin`` outside ``[server] allowed_origins`` are refused (a web page on another
  site must not drive a local gateway), and so is a ``Host`` that is not ours: DNS rebinding makes an
  attacker's domain resolve to 127.0.0.1, but the browser still sends the attacker's host name.
- Failed authentication is counted per source (loopback is one source: a local process spreading guesses
  over 127/8 is still one; IPv6 counts per /64), and a source past its allowance gets 429 / RATE_LIMITED
  instead of 401. The right token is always accepted, from anywhere: no local process that fails on
  purpose can lock the owner out (the token's 256 random bits, not the limit, are what stop guessing; the
  limit keeps a flood of guesses cheap to refuse and visible in the log).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from .clients import ADMIN, hash_key, looks_like_key
from .config import Config
from .errors import StorageError, outage_error
from .gateway_token import TokenFile, token_matches
from .transports import bodies, state, v1_errors

log = logging.getLogger(__name__)

MAX_FAILURES = 10  # per source: a burst of this many, then one per FAILURE_WINDOW_SECONDS / MAX_FAILURES
FAILURE_WINDOW_SECONDS = 60.0
# Sources tracked at most; past it the one that failed least recently is forgotten (constant work per failure).
MAX_SOURCES = 4096


def failure_source(address: str | None) -> str:
    """The key failures are counted under: "loopback" for 127/8 and ::1, the /64 of an IPv6 address, else
    the address itself."""
    try:
        ip = ipaddress.ip_address((address or "").split("%", 1)[0])
    except ValueError:
        return address or "unknown"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "loopback"
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class AuthFailures:
    """Failed authentications per source, as a leaky bucket: each failure adds one, the level drains by
    ``limit`` per ``window``, and a source is blocked while its level is above ``limit - 1`` (a burst of
    ``limit`` failures, then one every ``window / limit`` seconds). Each failure costs constant work, and at
    most ``max_sources`` sources are tracked.
    """

    def __init__(
        self, limit: int = MAX_FAILURES, window: float = FAILURE_WINDOW_SECONDS, max_sources: int = MAX_SOURCES
    ) -> None:
        self.limit = limit
        self.window = window
        self.max_sources = max_sources
        self._levels: OrderedDict[str, tuple[float, float]] = OrderedDict()  # source -> (level, when), oldest first

    def __len__(self) -> int:
        return len(self._levels)

    def _level(self, source: str, now: float) -> float:
        entry = self._levels.get(source)
        if entry is None:
            return 0.0
        level, at = entry
        return max(0.0, level - (now - at) * self.limit / self.window)

    def blocked(self, address: str | None) -> bool:
        return self._level(failure_source(address), time.monotonic()) > self.limit - 1

    def free_in(self, address: str | None) -> float:
        """Seconds until a blocked source's level drains back to where its next attempt is let in."""
        excess = self._level(failure_source(address), time.monotonic()) - (self.limit - 1)
        return max(excess, 0.0) * self.window / self.limit

    def add(self, address: str | None) -> None:
        source, now = failure_source(address), time.monotonic()
        before = self._level(source, now)
        # Capped: one who goes on failing stays blocked, and is let go within two windows of stopping.
        self._levels[source] = (min(before + 1.0, 2.0 * self.limit), now)
        self._levels.move_to_end(source)
        if len(self._levels) > self.max_sources:
            self._levels.popitem(last=False)
        if before <= self.limit - 1 < before + 1.0:
            log.warning("too many failed authentications from %s; answering them with RATE_LIMITED", source)


# The app's gateway token and failed-auth table (aiohttp AppKeys, owned here).
TOKEN_FILE = web.AppKey("token_file", TokenFile)
AUTH_FAILURES = web.AppKey("auth_failures", AuthFailures)


# The caller of an authenticated request: "admin" (the gateway token) or a client's name.
CALLER_KEY = web.RequestKey("caller", str)
# The SHA-256 of the client key or gateway token a request authenticated with: a long-lived socket's calls (and
# a request's, made when its body has arrived) check it is still the caller's (limits.Guard).
CREDENTIAL_KEY = web.RequestKey("credential", str)
# Paths only the gateway token may use.
ADMIN_PATHS = ("/api/clients",)
# The routes plugins added (``register_routes``): the gateway token only, as docs/plugins.md says; a plugin's
# handler has no way to tell one client from another.
PLUGIN_ROUTES = web.AppKey("plugin_routes", frozenset)
_touches: set[asyncio.Task[None]] = set()


async def credential_caller(app: web.Application, token: str) -> str | None:
    """Who ``token`` belongs to now: "admin" for the gateway token, a client's name for its key, else None.
    The client store is read afresh when its file changed, so a rotated or removed key is refused at once."""
    if token_matches(app[TOKEN_FILE].current(), token):
        return ADMIN
    if not looks_like_key(token):
        return None
    gw = app.get(state.REGISTRY)
    if gw is None:
        return None
    client = await gw.clients.get_by_key(token)
    return None if client is None else client.name


async def token_caller(request: web.Request, token: str) -> str | None:
    """``credential_caller``, noting the client's last use."""
    name = await credential_caller(request.app, token)
    if name is None:
        return name
    request[CREDENTIAL_KEY] = hash_key(token)  # checked again at each provider call (limits.Guard)
    if name == ADMIN:
        return name
    gw = request.app[state.REGISTRY]
    # Last use, written at most once a minute per key: a rotated key, or a client added again under a removed
    # one's name, has its first use written at once.
    if gw.clients.should_touch(request[CREDENTIAL_KEY], time.monotonic()):
        task = asyncio.get_running_loop().create_task(_touch(gw.clients, name))
        _touches.add(task)
        task.add_done_callback(_touches.discard)
    return name


async def _touch(clients: object, name: str) -> None:
    try:
        await clients.touch(name)  # type: ignore[attr-defined]
    except StorageError as e:  # an outage, said once by the request path: no traceback
        log.warning("could not record the last use of client %s: %s", name, e)
    except Exception:
        log.warning("could not record the last use of client %s", name, exc_info=True)


def caller(request: web.Request) -> str:
    """The authenticated caller of ``request`` (set by the middleware, or by the WebSocket's own auth)."""
    return request[CALLER_KEY]


def auth_failed(request: web.Request) -> None:
    request.app[AUTH_FAILURES].add(request.remote)


def auth_blocked(request: web.Request) -> bool:
    """Whether failures from this request's source are answered with RATE_LIMITED."""
    return request.app[AUTH_FAILURES].blocked(request.remote)


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def api_token(request: web.Request) -> str | None:
    """The token a request carries: ``Authorization: Bearer``, or on ``/v1/*`` also ``x-api-key`` (the
    header the Anthropic SDK and Claude Code send)."""
    token = bearer_token(request)
    if token is None and request.path.startswith("/v1/"):
        token = request.headers.get("x-api-key", "").strip() or None
    return token


async def bearer_caller(request: web.Request) -> str | None:
    """The caller the request's token names (also sets it on the request), else None (a failure counted)."""
    token = api_token(request)
    if token is None:
        return None
    who = await token_caller(request, token)
    if who is not None:
        request[CALLER_KEY] = who
        return who
    auth_failed(request)
    return None


def message_limiter(config: Config) -> Callable[[], bool]:
    """A token bucket per connection: ``[server] messages_per_minute``, which a client may also send at once
    (the bucket holds a minute's worth and refills at the per-minute rate)."""
    rate = config["server"]["messages_per_minute"] / 60.0
    capacity = max(1.0, float(config["server"]["messages_per_minute"]))
    tokens = capacity
    last = time.monotonic()

    def allow() -> bool:
        nonlocal tokens, last
        now = time.monotonic()
        tokens = min(capacity, tokens + (now - last) * rate)
        last = now
        if tokens >= 1.0:
            tokens -= 1.0
            return True
        return False

    return allow


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def _allowed_hosts(config: Config, request: web.Request) -> set[str] | None:
    server = config["server"]
    if server["host"] in ("0.0.0.0", "::", "") and not server["allowed_hosts"]:
        return None  # listening everywhere without a list: the operator chose not to check
    names = {"127.0.0.1", "localhost", "[::1]", "::1", str(server["host"])}
    names.update(str(h).lower() for h in server["allowed_hosts"])
    return names


def host_allowed(config: Config, request: web.Request) -> bool:
    allowed = _allowed_hosts(config, request)
    if allowed is None:
        return True
    host = request.headers.get("Host", "")
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return name.lower() in allowed


def origin_allowed(config: Config, request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    # Our own origin is the web app we serve (the Host was checked first: not a rebound name).
    return (
        origin is None
        or origin in config["server"]["allowed_origins"]
        or origin == f"{request.scheme}://{request.host}"
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def security_middleware(config: Config) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not host_allowed(config, request):
            return _forbidden(request, "Host not allowed; add it to [server] allowed_hosts.")
        if not origin_allowed(config, request):
            return _forbidden(request, "Origin not allowed; add it to [server] allowed_origins.")
        if _open_without_token(config, request):
            return await handler(request)
        token = api_token(request)
        try:
            who = await token_caller(request, token) if token is not None else None
        except Exception as e:
            return lookup_failed(request, e)
        if who is None:
            return _unauthenticated(request, token)
        if who != ADMIN and request.path.startswith(ADMIN_PATHS):
            return error_response(403, "FORBIDDEN", "Only the gateway token may manage clients.")
        if who != ADMIN and request.path == "/metrics":  # every client's names, tokens and cost
            return error_response(403, "FORBIDDEN", "Only the gateway token may read /metrics.")
        if who != ADMIN and request.match_info.route in request.app.get(PLUGIN_ROUTES, ()):
            return error_response(403, "FORBIDDEN", "Only the gateway token may use a plugin's routes.")
        request[CALLER_KEY] = who
        return await bodies.close_after(request, await handler(request))

    return middleware


def _forbidden(request: web.Request, message: str) -> web.Response:
    """403 for a Host or Origin not allowed, in the API's own shape on /v1 (its SDKs parse no other)."""
    if request.path.startswith("/v1/"):
        return v1_errors.error_response(request, 403, message)
    return error_response(403, "FORBIDDEN", message)


def _open_without_token(config: Config, request: web.Request) -> bool:
    """Whether the request's path is served without the token (the middleware's later checks skipped)."""
    if request.path == "/healthz" or request.path == "/gateway" or request.method == "OPTIONS":
        return True  # /gateway authenticates itself (header or first frame)
    if request.method in ("GET", "HEAD") and (request.path == "/" or request.path.startswith("/assets/")):
        return True  # the web app's page and files: no secret; it signs in itself
    # Scrapers without the token, when the operator opened /metrics.
    return request.path == "/metrics" and bool(config["metrics"]["public"])


def lookup_failed(request: web.Request, e: Exception) -> web.Response:
    """The caller could not be looked up: a store outage is a 503; anything else is raised again."""
    # A client key is looked up in the store: a database down is a 503 in the API's own shape, as
    # for the gateway token's requests, not a traceback and aiohttp's text/plain 500.
    if (outage := outage_error(e)) is None:
        raise e
    log.warning("%s %s: the caller could not be looked up: %s", request.method, request.path, outage.message)
    if request.path.startswith("/v1/"):  # the drop-in APIs answer in their own error shape
        return v1_errors.error_response(request, 503, outage.message, headers={"Retry-After": "1"})
    response = error_response(503, outage.code, outage.message)
    if outage.retry_after is not None:
        response.headers["Retry-After"] = str(max(1, math.ceil(outage.retry_after)))
    return response


def _unauthenticated(request: web.Request, token: str | None) -> web.Response:
    """No token or a wrong one: 401, or 429 once the address failed too often (a wrong token counts)."""
    v1 = request.path.startswith("/v1/")  # the drop-in APIs answer in their own error shape
    blocked = auth_blocked(request)
    if token is not None:
        auth_failed(request)
    if blocked:
        # RATE_LIMITED carries Retry-After everywhere: when this source's next attempt is let in.
        retry = {"Retry-After": str(max(1, math.ceil(request.app[AUTH_FAILURES].free_in(request.remote))))}
        if v1:
            return _v1_error(request, 429, "Too many failed authentications; try again later.", retry)
        response = error_response(429, "RATE_LIMITED", "Too many failed authentications; try again later.")
        response.headers.update(retry)
        return response
    if v1:
        return _v1_error(
            request,
            401,
            "Send the gateway token as x-api-key or Authorization: Bearer; run 'agentspace token' to see it.",
        )
    return error_response(401, "UNAUTHORIZED", "Send Authorization: Bearer <token>; run 'agentspace token' to see it.")


def _v1_error(request: web.Request, status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    # A key that is wrong, revoked or rotated stays so: x-should-retry, which both SDKs and Claude Code honour,
    # says not to try it again (Claude Code retried a 401 ten times over minutes, and looked hung).
    if status == 401:
        headers = {"x-should-retry": "false"}
    return v1_errors.error_response(
        request, status, message, code="invalid_api_key" if status == 401 else None, headers=headers
    )
