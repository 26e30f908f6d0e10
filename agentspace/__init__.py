"""agentspace: a self-hosted, plugin-based LLM gateway."""

from .hookspecs import hookimpl
from .types import (
    ChatMessage,
    ContextRequest,
    ContextSection,
    TokenUsage,
    Tool,
    UsageRecord,
)

__version__ = "0.1.0"

__all__ = [
    "ChatMessage",
    "ContextRequest",
    "ContextSection",
    "TokenUsage",
    "Tool",
    "UsageRecord",
    "__version__",
    "hookimpl",
]
