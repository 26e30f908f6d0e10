"""agentspace: a self-hosted, plugin-based LLM gateway.

Everything a plugin needs is importable from here (``from agentspace import hookimpl, Provider, ...``);
the modules these names live in may move, these imports will not. ``agentspace.testing`` has the helpers
for plugin tests. See docs/plugins.md.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .cli.common import command_config, config_options
    from .config import Config, ConfigError, load_config
    from .events import (
        ProviderError,
        ProviderEvent,
        ProviderFinish,
        ReasoningDelta,
        ResponseStarted,
        SourceEvent,
        TextDelta,
        ToolCallEvent,
        UsageReport,
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

# Each name's module, imported on first use (PEP 562): ``python -m agentspace usage`` starts without the
# provider, event and hook modules a report does not need.
_EXPORTS = {
    "Config": ".config",
    "ConfigError": ".config",
    "load_config": ".config",
    "command_config": ".cli.common",
    "config_options": ".cli.common",
    "ProviderError": ".events",
    "ProviderEvent": ".events",
    "ProviderFinish": ".events",
    "ReasoningDelta": ".events",
    "ResponseStarted": ".events",
    "SourceEvent": ".events",
    "TextDelta": ".events",
    "ToolCallEvent": ".events",
    "UsageReport": ".events",
    "hookimpl": ".hookspecs",
    "Provider": ".providers.base",
    "ProviderRequest": ".providers.base",
    "ThinkingSettings": ".providers.base",
    "DropRecord": ".sinks",
    "UsageSink": ".sinks",
    "count_tokens": ".tokens",
    "ChatMessage": ".types",
    "ContextRequest": ".types",
    "ContextSection": ".types",
    "ContextSectionBuilder": ".types",
    "Cost": ".types",
    "ModelInfo": ".types",
    "Part": ".types",
    "PriceTier": ".types",
    "ReasoningPart": ".types",
    "SourcePart": ".types",
    "TextPart": ".types",
    "TokenUsage": ".types",
    "Tool": ".types",
    "ToolCallPart": ".types",
    "ToolResultPart": ".types",
    "UsageRecord": ".types",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    # hooks and configuration
    "hookimpl",
    "Config",
    "ConfigError",
    "load_config",
    # commands (register_commands)
    "command_config",
    "config_options",
    # providers (register_providers)
    "Provider",
    "ProviderRequest",
    "ThinkingSettings",
    "ProviderEvent",
    "TextDelta",
    "ReasoningDelta",
    "ResponseStarted",
    "SourceEvent",
    "ToolCallEvent",
    "UsageReport",
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
