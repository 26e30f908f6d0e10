"""Authentication, origin and host checks, and rate limits (SPEC section 9).

- Every route but ``/healthz`` needs the gateway token, compared in constant time.
- Requests carrying an ``Origin`` outside ``[server] allowed_origins`` are refused (a web page on another
  site must not drive a local gateway), and so is a ``Host`` that is not ours: DNS rebinding makes an
  attacker's domain resolve to 127.0.0.1, but the browser still sends the attacker's host name.
- Failed authentication is rate-limited per client address, loopback included (a local web page can
  brute-force a loopback server as well as anyone).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from .config import Config
from .gateway_token import token_matches

MAX_FAILURES = 10  # per address and window before further attempts are refused outright
FAILURE_WINDOW_SECONDS = 60.0


# Past this many tracked addresses, expired entries are swept on the next failure.
SWEEP_ADDRESSES = 1024


class AuthFailures:
    """Sliding-window count of failed authentications per client address.

    Each address keeps only its last ``limit`` failures: enough to decide, and an attacker who goes on
    failing stays blocked (each attempt renews the window) without growing the memory it costs us.
    """

    def __init__(self, limit: int = MAX_FAILURES, window: float = FAILURE_WINDOW_SECONDS) -> None:
        self.limit = limit
        self.window = window
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, address: str) -> deque[float]:
        q = self._failures.get(address)
        if q is None:
            return deque()
        cutoff = time.monotonic() - self.window
        while q and q[0] < cutoff:
            q.popleft()
        if not q:
            del self._failures[address]
        return q

    def blocked(self, address: str) -> bool:
        return len(self._recent(address)) >= self.limit

    def add(self, address: str) -> None:
        if len(self._failures) >= SWEEP_ADDRESSES:
            for other in list(self._failures):
                self._recent(other)
        self._recent(address)
        self._failures.setdefault(address, deque(maxlen=self.limit)).append(time.monotonic())


def _address(request: web.Request) -> str:
    return request.remote or "unknown"


def token_ok(request: web.Request, token: str) -> bool:
    """Compare ``token`` with the current gateway token, unless this address is rate-limited."""
    state = _state()
    if request.app[state.AUTH_FAILURES].blocked(_address(request)):
        return False
    return token_matches(request.app[state.TOKEN_FILE].current(), token)


def auth_failed(request: web.Request) -> None:
    request.app[_state().AUTH_FAILURES].add(_address(request))


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def bearer_ok(request: web.Request) -> bool:
    token = bearer_token(request)
    if token is None:
        return False
    if token_ok(request, token):
        return True
    auth_failed(request)
    return False


def message_limiter(config: Config) -> Callable[[], bool]:
    """A token bucket per connection: ``[server] messages_per_minute``, bursts up to a tenth of it."""
    rate = config["server"]["messages_per_minute"] / 60.0
    capacity = max(10.0, config["server"]["messages_per_minute"] / 10.0)
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
    return origin is None or origin in config["server"]["allowed_origins"] or origin == f"{request.scheme}://{request.host}"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def security_middleware(config: Config) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not host_allowed(config, request):
            return error_response(403, "FORBIDDEN", "Host not allowed; add it to [server] allowed_hosts.")
        if not origin_allowed(config, request):
            return error_response(403, "FORBIDDEN", "Origin not allowed; add it to [server] allowed_origins.")
        if request.path == "/healthz" or request.path == "/gateway" or request.method == "OPTIONS":
            return await handler(request)  # /gateway authenticates itself (header or first frame)
        if request.method in ("GET", "HEAD") and (request.path == "/" or request.path.startswith("/assets/")):
            return await handler(request)  # the web app's page and files: no secret; it signs in itself
        if request.app[_state().AUTH_FAILURES].blocked(_address(request)):
            return error_response(429, "RATE_LIMITED", "Too many failed authentications; try again later.")
        if not bearer_ok(request):
            return error_response(401, "UNAUTHORIZED", "Send Authorization: Bearer <token>; run 'agentspace token' to see it.")
        return await handler(request)

    return middleware


def _state():  # type: ignore[no-untyped-def]
    # transports.state imports this module for AuthFailures; import it late to avoid the cycle.
    from .transports import state

    return state
