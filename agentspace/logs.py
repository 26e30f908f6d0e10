"""Logging set-up for the server: one format, the configured level, secrets redacted.

Secrets (provider API keys, the gateway token) are registered with ``register_secret`` by the code that
reads them (the vault, the token file). From the first registration on, every log record created in the
process has them replaced by ``[redacted]`` (message, arguments and traceback), whichever handler
later writes it: ours, pytest's, or one a plugin adds.

The server's handler writes one line per record: control characters in the message (a newline, a carriage
return, a terminal escape) are escaped, so no value a client or an upstream sends can forge a log line.

Warnings a client can cause over and over (a new unknown model id per request) go through ``warn_limited``:
one line per kind of warning per interval, the next one saying how many were left out.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from typing import Any

from .config import Config

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REDACTED = "[redacted]"
# Shorter values would redact ordinary words; real keys and tokens are far longer.
MIN_SECRET_LENGTH = 8

# C0 controls but tab, DEL, C1 controls (NEL is a line break to some readers), the Unicode line and paragraph
# separators, and lone surrogates (which cannot even be encoded for the log file).
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r"}

# Longest first: a secret that contains another (a key and its prefix) is replaced whole, never in part.
_secrets: tuple[str, ...] = ()
_secret_bytes: tuple[bytes, ...] = ()  # the same, encoded: what relayed bytes are searched for
_lock = threading.Lock()
_base_factory: Any = None


def register_secret(value: str | None) -> None:
    """Keep ``value`` out of every log record from now on."""
    global _secrets, _secret_bytes, _base_factory
    if not value or len(value) < MIN_SECRET_LENGTH or value in _secrets:
        return
    with _lock:
        _secrets = tuple(sorted({*_secrets, value}, key=len, reverse=True))
        _secret_bytes = tuple(s.encode("utf-8", "surrogatepass") for s in _secrets)
        if _base_factory is None:
            _base_factory = logging.getLogRecordFactory()
            logging.setLogRecordFactory(_redacting_factory)


WARN_INTERVAL_SECONDS = 60.0
_warned: dict[str, tuple[float, int]] = {}  # key -> (when last logged, how many left out since)


def warn_limited(
    logger: logging.Logger, key: str, msg: str, *args: Any, interval: float = WARN_INTERVAL_SECONDS
) -> bool:
    """``logger.warning(msg, *args)`` at most once per ``interval`` for ``key`` (a kind of warning, not a
    value a client chooses: the keys stay few). Returns whether it was logged."""
    now = time.monotonic()
    with _lock:
        last, left_out = _warned.get(key, (None, 0))
        if last is not None and now - last < interval:
            _warned[key] = (last, left_out + 1)
            return False
        _warned[key] = (now, 0)
    if left_out:
        msg += " (%d more like it in the last %.0fs not logged)"
        args = (*args, left_out, interval)
    logger.warning(msg, *args)
    return True


def redact(text: str) -> str:
    """``text`` with every registered secret replaced."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def redact_bytes(data: bytes) -> bytes:
    """``data`` (an upstream's answer relayed to a client) with every registered secret replaced: an
    upstream that echoes the key it was sent must not hand the gateway's key to the caller."""
    for secret in _secret_bytes:
        if secret in data:
            data = data.replace(secret, REDACTED.encode())
    return data


class StreamRedactor:
    """``redact_bytes`` over a stream relayed as it arrives: a secret split across two reads is replaced
    too. The end of a read that could begin a secret is held back until the next read (or ``flush``);
    an event stream's reads end in a blank line, which begins no secret, so nothing is held in practice."""

    __slots__ = ("_held", "_secrets")

    def __init__(self) -> None:
        self._held = b""
        self._secrets = _secret_bytes

    def feed(self, chunk: bytes) -> bytes:
        if not self._secrets:
            return chunk
        data = self._held + chunk if self._held else chunk
        for secret in self._secrets:
            if secret in data:
                data = data.replace(secret, REDACTED.encode())
        keep = len(data)
        for secret in self._secrets:  # the earliest start of a secret's beginning that ends the data
            first = secret[:1]
            pos = data.find(first, max(0, len(data) - len(secret) + 1))
            while pos != -1 and pos < keep:
                if secret.startswith(data[pos:]):
                    keep = pos
                    break
                pos = data.find(first, pos + 1)
        self._held = data[keep:]
        return data[:keep]

    def flush(self) -> bytes:
        held, self._held = self._held, b""
        return held


def redact_headers(headers: dict[str, str]) -> dict[str, str]:
    """Relayed headers with every registered secret replaced in their values."""
    return {k: redact(v) for k, v in headers.items()}


def _has_secret(text: str) -> bool:
    return any(secret in text for secret in _secrets)


def _redacting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record: logging.LogRecord = _base_factory(*args, **kwargs)
    try:
        message = record.getMessage()
    except Exception:  # a bad format string: the handler reports it as usual
        return record
    if _has_secret(message):
        record.msg, record.args = redact(message), None
    if record.exc_info and record.exc_info[0] is not None:
        # Formatters use exc_text when it is set; an exception message may quote a key (e.g. a URL).
        text = logging.Formatter().formatException(record.exc_info)
        if _has_secret(text):
            record.exc_text = redact(text)
    if record.stack_info and _has_secret(record.stack_info):
        record.stack_info = redact(record.stack_info)
    return record


def escape_controls(text: str) -> str:
    """``text`` with every control character written as an escape (``\\n``, ``\\x1b``, ``\\u2028``)."""
    return _CONTROL.sub(_escape, text) if _CONTROL.search(text) else text


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _SHORT_ESCAPES.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


class EscapingFormatter(logging.Formatter):
    """Formats the message (``msg % args``) with its control characters escaped: one record, one line.
    A traceback that follows keeps its own lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


class MalformedRequests(logging.Filter):
    """aiohttp logs each request it cannot parse (a byte no URL has, two Host headers) at ERROR with its
    traceback: anyone who reaches the port could fill the log with them. Such a request is answered 400 by
    aiohttp all the same; here it becomes one warning line, at most one per ``WARN_INTERVAL_SECONDS``."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, HttpProcessingError):
            return True
        first = str(error.message).strip().splitlines()[0] if str(error.message).strip() else type(error).__name__
        warn_limited(
            logging.getLogger("agentspace.server"), "malformed-request", "malformed request refused: %s", first
        )
        return False


def configure_logging(config: Config) -> None:
    level = getattr(logging, str(config["logging"]["level"]).upper())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EscapingFormatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # litellm and httpx (httpx2: the anthropic SDK's) log every request (URLs, sometimes headers) at INFO;
    # keep them quiet.
    for noisy in ("LiteLLM", "litellm", "httpx", "httpcore", "httpx2", "httpcore2", "anthropic"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequests) for f in server_log.filters):
        server_log.addFilter(MalformedRequests())
