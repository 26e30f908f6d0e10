"""Crash-safe stores: sessions and usage records as tinydb files under the data directory.

``atomic`` (whole-file atomic writes, damaged files moved aside), ``tinydb_file`` (the file layout),
``store_thread`` (where the file work runs), ``datadir_lock`` (one server per data directory),
``sessions`` and ``usage`` (the stores and the usage reports).
"""

from .atomic import StoreCorrupt
from .datadir_lock import DataDirLock, DataDirLocked
from .embedded.sessions import SessionStore
from .embedded.usage import UsageStore
from .errors import InvalidSessionId, MessageNotFound, SessionExists, SessionNotFound
from .reports import usage_by_day, usage_report
from .shapes import Listing

__all__ = [
    "DataDirLock",
    "DataDirLocked",
    "InvalidSessionId",
    "Listing",
    "MessageNotFound",
    "SessionExists",
    "SessionNotFound",
    "SessionStore",
    "StoreCorrupt",
    "UsageStore",
    "usage_by_day",
    "usage_report",
]
