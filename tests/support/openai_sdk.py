"""What a test reads from the official openai SDK's streams."""

from __future__ import annotations

from typing import Any

import openai
import pytest


async def text_until_error(stream: Any) -> str:
    """The text a Chat Completions stream delivered before it ended with an error (which it must)."""
    got = []
    with pytest.raises(openai.APIError):
        async for c in stream:
            if c.choices:
                got.append(c.choices[0].delta.content or "")
    return "".join(got)
