"""Storage: where sessions, usage records, clients and the ledger live, behind one interface.

``protocols`` (the store protocols and ``Storage``, what a backend opens), ``shapes`` (the stored
documents as ``TypedDict``s, and the rules every backend shares: session ids, titles), ``errors`` (raised
the same by every backend), ``reports`` (the usage reports), ``backends`` (the built-in backends by name),
``ledger`` (each process's write-ahead journal), ``search`` (session search over any store), ``atomic``
(whole-file atomic writes, damaged files moved aside) and ``datadir_lock`` (one server per data directory, and
where it keeps its data).
One subpackage per backend, split by job: ``embedded`` (the ``tinydb`` backend: files in the data
directory) and ``postgres``; neither imports the other (``tests/test_storage_layout.py``).
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
