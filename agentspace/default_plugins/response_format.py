"""Built-in formatting prompt (the ``response_format`` section): ``[chat] formatting_prompt``.

Registered ``trylast`` so that any plugin implementing ``formatting_prompt`` replaces it.
"""

from __future__ import annotations

from ..config import Config
from ..hookspecs import hookimpl


@hookimpl(trylast=True)
def formatting_prompt(config: Config, model: str) -> str | None:
    return str(config["chat"]["formatting_prompt"])
