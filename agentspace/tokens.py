"""Token estimates with tiktoken, offline.

tiktoken downloads its encoding files on first use; litellm ships them in its package (named by the SHA-1
of their download URL, which is how tiktoken's cache looks files up). Pointing ``TIKTOKEN_CACHE_DIR`` at
that folder makes the first use work without a network. We locate the folder without importing litellm.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tiktoken  # imported when first needed: it costs start-up time

ENCODING = "o200k_base"


def bundled_tiktoken_dir() -> str | None:
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "litellm_core_utils" / "tokenizers"
    return str(folder) if folder.is_dir() else None


@lru_cache(maxsize=1)
def _encoding() -> tiktoken.Encoding:
    if "TIKTOKEN_CACHE_DIR" not in os.environ:
        folder = bundled_tiktoken_dir()
        if folder:
            os.environ["TIKTOKEN_CACHE_DIR"] = folder
    import tiktoken

    return tiktoken.get_encoding(ENCODING)


def count_tokens(text: str) -> int:
    """Estimated tokens of ``text`` (o200k_base; close to, not equal to, what each provider counts)."""
    if not text:
        return 0
    return len(_encoding().encode(text, disallowed_special=()))
