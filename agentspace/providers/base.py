"""What a provider plugin implements. Registered through the ``register_providers`` hook."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol, runtime_checkable

from ..events import ProviderEvent
from ..types import ChatMessage, ModelInfo, Tool


@dataclass(slots=True)
class ThinkingSettings:
    """Extended thinking for one call; ``adaptive`` for models that accept only ``{"type": "adaptive"}``."""

    budget_tokens: int = 8000
    adaptive: bool = False


@dataclass(slots=True)
class ProviderRequest:
    model: str  # the full id, e.g. "anthropic/claude-sonnet-4-5"
    system: str
    messages: list[ChatMessage]
    model_info: ModelInfo
    max_tokens: int = 4096
    tools: list[Tool] = field(default_factory=list)
    # Thinking as configured; providers apply it only to models that support it (``model_info`` or their API).
    thinking: ThinkingSettings | None = None
    api_key: str | None = None
    base_url: str | None = None
    # The provider's own [providers.NAME] table, for options beyond base_url and keys.
    options: dict[str, Any] = field(default_factory=dict)
    # Sampling parameters a /v1 client set: "temperature", "top_p", "stop" (a list of strings); each provider
    # passes on those its API takes.
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return self.model.split("/", 1)[0]

    @property
    def model_name(self) -> str:
        """The id without our ``provider/`` prefix, as the upstream API knows it."""
        return self.model.split("/", 1)[1] if "/" in self.model else self.model


@runtime_checkable
class Provider(Protocol):
    """A source of model output.

    ``claims`` says whether this provider serves a model id; the first registered provider that claims
    an id serves it (built-in catch-alls are registered last). ``stream`` yields text, reasoning, source
    and tool-call events and ends with exactly one ``ProviderFinish``; failures raise ``ProviderError``.
    """

    name: str

    def claims(self, model: str) -> bool: ...

    def stream(self, request: ProviderRequest) -> AsyncIterator[ProviderEvent]: ...


def model_prefix(model: str) -> str:
    return model.split("/", 1)[0] if "/" in model else ""
