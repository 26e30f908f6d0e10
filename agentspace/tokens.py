"""Token estimates with tiktoken, offline.

tiktoken downloads its encoding files on first use; litellm ships them in its package (named by the SHA-1
of their download URL, which is how tiktoken's cache looks files up). Pointing ``TIKTOKEN_CACHE_DIR`` at
that folder makes the first use work without a network. We locate the folder without importing litellm.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import threading
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from .lru import LRU

if TYPE_CHECKING:
    import tiktoken  # imported when first needed: it costs start-up time

ENCODING = "o200k_base"
# The older encoding (GPT-4, GPT-3.5, OpenAI's embedding models): as many tokens as o200k_base for English, up
# to twice as many for other scripts -- as other providers' tokenizers are. A reservation counts with both.
OLDER_ENCODING = "cl100k_base"

# Texts at least this long have their count remembered (``count_tokens``): a session's history is counted again
# on every turn (the context-window check, the inspector's calibration, reservations), and tiktoken takes about
# a millisecond per 5 KB, so without it a 2 MB session cost hundreds of milliseconds of the event loop per turn.
# Short texts too: tokenizing a 200-character answer takes about 8 µs, looking its count up about 1 µs (a hash
# that a str caches), and a session of 2,000 short messages re-tokenized its short answers on every turn (about
# 6 ms) with a 256-character threshold. Below this one, tokenizing costs about what the lookup does.
CACHED_CHARS = 16
# Counts remembered, most recently used first: a few integers each (about 10 MB at most).
CACHED_COUNTS = 65_536


def bundled_tiktoken_dir() -> str | None:
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "litellm_core_utils" / "tokenizers"
    return str(folder) if folder.is_dir() else None


def load_in_background() -> None:
    """Load the encoding on a thread now (about half a second): a server's first count, at the end of its first
    turn, would otherwise wait for it on the event loop."""
    threading.Thread(target=_encoding, name="agentspace-load-tiktoken", daemon=True).start()


async def loaded() -> None:
    """Wait, off the event loop, until the encoding is loaded: a request may come while ``load_in_background``'s
    thread still loads it (seconds on a loaded machine, beside the providers' imports), and a count on the loop
    would wait for that thread's lock with every other client waiting too. Awaited where a request's counting
    starts (a turn, a provider call, a context inspection); once loaded, a flag's check."""
    global _ready
    if not _ready:
        await asyncio.to_thread(_encoding)
        _ready = True


def _encoding() -> tiktoken.Encoding:
    with _loading:  # once, whichever thread asks first; the others wait for it
        return _load_encoding()


@lru_cache(maxsize=4)
def _load_encoding(name: str = ENCODING) -> tiktoken.Encoding:
    if "TIKTOKEN_CACHE_DIR" not in os.environ:
        folder = bundled_tiktoken_dir()
        if folder:
            os.environ["TIKTOKEN_CACHE_DIR"] = folder
    import tiktoken

    return tiktoken.get_encoding(name)


def _older_encoding() -> tiktoken.Encoding:
    with _loading:
        return _load_encoding(OLDER_ENCODING)


def count_tokens(text: str) -> int:
    """Estimated tokens of ``text`` (o200k_base; close to, not equal to, what each provider counts). A long
    text's count is remembered by its length and hash, so counting the same text again costs a hash of it."""
    if not text:
        return 0
    if len(text) < CACHED_CHARS:
        return len(_encoding().encode(text, disallowed_special=()))
    key = (len(text), hash(text))  # a collision needs two texts of one length with one 64-bit hash
    with _cache_lock:
        count = _cache.get(key)
    if count is None:
        count = len(_encoding().encode(text, disallowed_special=()))
        with _cache_lock:
            _cache[key] = count
    return count


def count_ceiling_tokens(text: str) -> int:
    """The most tokens ``text`` may be billed as, for a reservation: ``count_tokens``, and for text beyond ASCII
    the larger of it and the older encoding's count (other scripts cost some tokenizers up to twice as many)."""
    count = count_tokens(text)
    if text.isascii():
        return count
    if len(text) < CACHED_CHARS:
        return max(count, len(_older_encoding().encode(text, disallowed_special=())))
    key = (-len(text), hash(text))  # the older encoding's counts, apart from count_tokens' (negative lengths)
    with _cache_lock:
        older = _cache.get(key)
    if older is None:
        older = len(_older_encoding().encode(text, disallowed_special=()))
        with _cache_lock:
            _cache[key] = older
    return max(count, older)


_loading = threading.Lock()
_ready = False  # the encoding is loaded (``loaded``)
_cache: LRU[tuple[int, int], int] = LRU(CACHED_COUNTS)
_cache_lock = threading.Lock()  # counts are made on worker threads too
