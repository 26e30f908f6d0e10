"""The OpenAI Chat Completions wire format (``/v1/chat/completions``), translated to and from our types."""

from __future__ import annotations

from typing import Any

# HTTP status -> OpenAI's error type.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    502: "server_error",
    503: "server_error",
}


def error_body(status: int, message: str, *, code: str | None = None, error_type: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type or ERROR_TYPES.get(status, "server_error"),
                      "param": param, "code": code}}
