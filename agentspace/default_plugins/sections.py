"""Built-in context section: the configured system prompt (``[chat] system_prompt``)."""

from __future__ import annotations

from collections.abc import Callable

from ..config import Config
from ..hookspecs import hookimpl
from ..types import ContextRequest, ContextSection, ContextSectionBuilder


@hookimpl(trylast=True)
def register_context_sections(register: Callable[[ContextSectionBuilder], None], config: Config) -> None:
    def build(request: ContextRequest) -> str:
        return str(request.config["chat"]["system_prompt"])

    register(ContextSection("system_prompt", build))
