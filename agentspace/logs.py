"""Logging set-up for the server: one format, the configured level, secrets redacted."""

from __future__ import annotations

import logging
import sys

from .config import Config

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(config: Config) -> None:
    level = getattr(logging, str(config["logging"]["level"]).upper())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # litellm and httpx log request details (URLs, sometimes headers) at INFO; keep them quiet.
    for noisy in ("LiteLLM", "litellm", "httpx", "httpcore", "anthropic"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
