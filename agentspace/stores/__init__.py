"""Crash-safe stores on tinydb: sessions and usage records under the data directory."""

from .files import DataDirLock, DataDirLocked, StoreCorrupt
from .sessions import (
    InvalidSessionId,
    MessageNotFound,
    SessionExists,
    SessionNotFound,
    SessionStore,
)
from .usage import UsageStore, usage_by_day, usage_report

__all__ = [
    "DataDirLock",
    "DataDirLocked",
    "InvalidSessionId",
    "MessageNotFound",
    "SessionExists",
    "SessionNotFound",
    "SessionStore",
    "StoreCorrupt",
    "UsageStore",
    "usage_by_day",
    "usage_report",
]
