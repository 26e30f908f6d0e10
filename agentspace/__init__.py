"""agentspace: a self-hosted, plugin-based LLM gateway.

Everything a plugin needs is importable from here (``from agentspace import hookimpl, Provider, ...``);
the modules these names live in may move, these imports will not. ``agentspace.testing`` has the helpers
for plugin tests. See docs/plugins.md.
"""

from .config import Config, ConfigError, load_config
from .events import (
    ProviderError,
    ProviderEvent,
    ProviderFinish,
    ReasoningDelta,
    SourceEvent,
    TextDelta,
    ToolCallEvent,
)
from .hookspecs import hookimpl
from .providers.base import Provider, ProviderRequest, ThinkingSettings
from .sinks import DropRecord, UsageSink
from .tokens import count_tokens
from .types import (
    ChatMessage,
    ContextRequest,
    ContextSection,
    ContextSectionBuilder,
    Cost,
    ModelInfo,
    Part,
    PriceTier,
    ReasoningPart,
    SourcePart,
    TextPart,
    TokenUsage,
    Tool,
    ToolCallPart,
    ToolResultPart,
    UsageRecord,
)

__version__ = "0.1.0"

__all__ = [
    # hooks and configuration
    "hookimpl",
    "Config",
    "ConfigError",
    "load_config",
    # providers (register_providers)
    "Provider",
    "ProviderRequest",
    "ThinkingSettings",
    "ProviderEvent",
    "TextDelta",
    "ReasoningDelta",
    "SourceEvent",
    "ToolCallEvent",
    "ProviderFinish",
    "ProviderError",
    "ModelInfo",
    "PriceTier",
    "count_tokens",
    # messages
    "ChatMessage",
    "Part",
    "TextPart",
    "ReasoningPart",
    "SourcePart",
    "ToolCallPart",
    "ToolResultPart",
    # context sections (register_context_sections) and tools (register_tools)
    "ContextRequest",
    "ContextSection",
    "ContextSectionBuilder",
    "Tool",
    # usage (register_usage_sinks)
    "UsageRecord",
    "UsageSink",
    "DropRecord",
    "TokenUsage",
    "Cost",
    "__version__",
]
