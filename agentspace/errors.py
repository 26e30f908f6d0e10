"""The one error type the service layer raises, and the one table from error code to HTTP status.

Every transport reports an ``ApiError`` the same way: the WebSocket as ``error {requestId, code, message}``,
HTTP routes as ``{"error": {"code", "message", "fields"?}}`` with ``http_status(code)``. Messages are safe
for clients: no key material, no internal details.
"""

from __future__ import annotations

from typing import Any

# Error code -> HTTP status. A code missing here is a client error (400).
HTTP_STATUS: dict[str, int] = {
    "INVALID_MESSAGE": 400,
    "MODEL_NOT_FOUND": 400,
    "UNAUTHORIZED": 401,
    "FORBIDDEN": 403,
    "MODEL_NOT_ALLOWED": 403,
    "SESSION_NOT_FOUND": 404,
    "NOT_FOUND": 404,
    "REQUEST_TIMEOUT": 408,
    "STREAM_IN_PROGRESS": 409,
    "SESSION_DAMAGED": 409,
    "PAYLOAD_TOO_LARGE": 413,
    "CONTEXT_TOO_LONG": 413,
    "UNSUPPORTED_MEDIA_TYPE": 415,
    "NO_API_KEY": 424,
    "RATE_LIMITED": 429,
    "BUDGET_EXCEEDED": 429,
    "LLM_ERROR": 502,
    "STORAGE_ERROR": 503,
    "SERVICE_UNAVAILABLE": 503,
    "INTERNAL_ERROR": 500,
}

# The Retry-After of a 503 for a dependency out of reach (Redis, the database) or a write the store refused
# (STORAGE_ERROR: a full disk, the database down): try again in a second, as the SDKs do once told (without it
# they back off on their own, and a client of the HTTP API is not told to retry).
OUTAGE_RETRY_SECONDS = 1.0


def http_status(code: str) -> int:
    return HTTP_STATUS.get(code, 400)


class ApiError(Exception):
    """A request refused or failed, with a protocol error code (docs/protocol.md#errors) and a message for the client.

    ``fields`` maps a request field to what is wrong with it (validation errors); ``retry_after`` is in
    seconds, for ``RATE_LIMITED``, ``BUDGET_EXCEEDED``, ``STORAGE_ERROR`` (always) and an outage's
    ``SERVICE_UNAVAILABLE``; ``limited`` is what a ``RATE_LIMITED`` ran out of
    (``"requests"`` or ``"tokens"``: OpenAI's error type for each).
    """

    def __init__(
        self,
        code: str,
        message: str,
        fields: dict[str, str] | None = None,
        *,
        retry_after: float | None = None,
        limited: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fields = fields
        if retry_after is None and code == "STORAGE_ERROR":
            retry_after = OUTAGE_RETRY_SECONDS  # every STORAGE_ERROR, wherever raised: waiting may cure it
        self.retry_after = retry_after
        self.limited = limited

    @property
    def status(self) -> int:
        return http_status(self.code)

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.fields:
            body["fields"] = self.fields
        return body


class SessionDamaged(ApiError):
    """A session file that cannot be read; the server has moved it aside and logged the path (a reader such as
    the CLI leaves it where it is: ``moved=False``)."""

    def __init__(self, session_id: str, *, moved: bool = True) -> None:
        where = "its file was moved aside (see the server log, or run:" if moved else "its file is kept as it is (run:"
        super().__init__(
            "SESSION_DAMAGED", f"Session {session_id!r} is damaged and cannot be read; {where} agentspace doctor)."
        )


class StorageError(ApiError):
    """A write to the store failed (disk full, I/O error): nothing is reported as stored that is not."""

    def __init__(
        self, message: str = "The gateway could not store this; the answer is kept in memory and the write retried."
    ) -> None:
        super().__init__("STORAGE_ERROR", message)


def outage_error(e: BaseException) -> ApiError | None:
    """``SERVICE_UNAVAILABLE`` (503) for a dependency the gateway cannot reach now (the database, Redis, the
    data directory), the same for every caller and every API; None for anything else (a defect of ours).
    redis-py's errors are recognised by their module: redis is an optional dependency."""
    if isinstance(e, StorageError):
        return e  # STORAGE_ERROR, a 503 too, as the gateway token's requests get it
    if type(e).__module__.startswith("redis."):
        return ApiError(
            "SERVICE_UNAVAILABLE",
            "The gateway could not reach Redis; try again in a moment.",
            retry_after=OUTAGE_RETRY_SECONDS,
        )
    if isinstance(e, (OSError, TimeoutError)):
        return ApiError(
            "SERVICE_UNAVAILABLE",
            "The gateway could not reach its storage; try again in a moment.",
            retry_after=OUTAGE_RETRY_SECONDS,
        )
    return None
