"""The registry of one server process: what the plugins registered (providers, context sections, tools,
usage sinks), the stores, the checks before each call, the session locks, the ledger and the model lookup.

It is assembled once, at start, by the composition root (``gateway.assemble``) and never changed afterwards.
Transports reach it through the service layer (``service.Service``); the pipeline runs turns against it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import pluggy

from . import pricing
from .catalog import closest, deprecation_message, group_like, plugin_models, suggestion, unknown_model
from .clients import ADMIN
from .config import Config
from .logs import warn_limited
from .lru import LRU
from .pending import PendingWrites
from .providers.base import Provider, claims, is_builtin, model_prefix
from .sinks import CLOSE_SECONDS, UsageSink, delivery
from .types import ContextSectionBuilder, ModelInfo, Tool

if TYPE_CHECKING:
    from .alerts import BudgetAlerts
    from .cluster import Cluster
    from .limits import Guard
    from .recording import Recorder
    from .routing import Router
    from .session_locks import SessionLocks
    from .storage.ledger import Ledger
    from .storage.protocols import BlobStoreAPI, ClientStoreAPI, SessionStoreAPI, Storage, UsageStoreAPI

log = logging.getLogger(__name__)


class ModelNotFound(Exception):
    """No provider serves a model; ``suggested``: the closest known id its message offers (`` Did you mean``)."""

    def __init__(self, message: str, model: str = "", suggested: str | None = None) -> None:
        super().__init__(message)
        self.model, self.suggested = model, suggested


@dataclass(frozen=True)
class Plugins:
    """What the plugins registered at start (``register_*`` hooks), never changed afterwards."""

    providers: tuple[Provider, ...] = ()
    section_builders: tuple[ContextSectionBuilder, ...] = ()
    tools: Mapping[str, Tool] = field(default_factory=dict)
    sinks: tuple[UsageSink, ...] = ()


class Models:
    """Which provider serves a model, and its price, limits and capabilities."""

    def __init__(self, config: Config, providers: tuple[Provider, ...], router: Router) -> None:
        self.config = config
        self.providers = providers
        self.router = router
        # Bounded: model ids come from clients, and a provider may claim any id with its prefix.
        self._model_info: LRU[str, ModelInfo] = LRU()
        # model -> why it is a typo and the id it suggests (None: it is not)
        self._unknown: LRU[str, tuple[str, str | None] | None] = LRU()

    def provider_for(self, model: str) -> Provider:
        """The provider serving ``model``; raises ModelNotFound with a message for the client. A model group is
        served by its first deployment's provider (each call picks its deployment, ``routing.py``)."""
        group = self.router.group(model)
        if group is not None:
            return self.provider_for(group.deployments[0].model)
        if "/" not in model or not model_prefix(model) or model.endswith("/"):
            raise self._mistyped_group(model) or ModelNotFound(
                f"Model ids look like provider/model, e.g. anthropic/claude-sonnet-4-6; got {model!r}"
            )
        for provider in self.providers:
            if claims(provider, model):
                # The cost map lists the built-in providers' models, not a plugin's (one serving ollama/... or
                # deepseek/... ids itself): its claim is its word.
                if is_builtin(provider):
                    problem = self._unknown.get(model) if model in self._unknown else self._check_name(model)
                    if problem:
                        raise self._mistyped_group(model, problem[1]) or ModelNotFound(problem[0], model, problem[1])
                return provider
        close = closest(model, plugin_models(self.providers))
        raise self._mistyped_group(model, close) or ModelNotFound(
            f"No provider serves {model!r}.{suggestion(close)} Run: agentspace models", model, close
        )

    def _mistyped_group(self, model: str, other: str | None = None) -> ModelNotFound | None:
        """A model group's name mistyped, as sent or with the provider prefix a /v1 endpoint gives a bare
        ``claude-*`` name: the group is offered, unless ``other`` (the closest model id) is closer."""
        close = group_like(model, self.router.groups, other)
        if close is None:
            return None
        return ModelNotFound(f"Unknown model {model!r}.{suggestion(close)} Run: agentspace models", model, close)

    def _check_name(self, model: str) -> tuple[str, str | None] | None:
        """A typo'd model is MODEL_NOT_FOUND with a suggestion, before a key or an upstream is asked."""
        extra = plugin_models(self.providers)
        message = unknown_model(self.config, model, extra)
        problem = None if message is None else (message, closest(model, extra))
        self._unknown[model] = problem
        return problem

    def not_found_for(self, error: ModelNotFound, allowed: Callable[[str], bool]) -> str:
        """``error``'s message for a client that may use the models ``allowed`` lets through: a suggested id it
        may not use is replaced by the closest it may (or none)."""
        message = str(error)
        if error.suggested is None or allowed(error.suggested):
            return message
        close = closest(error.model, plugin_models(self.providers), allowed)
        return message.replace(suggestion(error.suggested), suggestion(close))

    def model_info(self, model: str) -> ModelInfo:
        """Price, limits and capabilities of ``model``: the one lookup for pricing, reservations, the context
        window and the model lists (the cost map, then the provider's ``model_info``, then ``[pricing]``)."""
        group = self.router.group(model)
        if group is not None:
            # A call to a group reserves at its dearest deployment; the record prices the one that answered.
            # Its window and output are the smallest deployment's (as the model lists say): a context fitted
            # to them fits whichever deployment the call is drawn to.
            infos = [self.model_info(d.model) for d in group.deployments]
            dearest = max(infos, key=lambda i: (i.output_per_mtok, i.input_per_mtok))
            return replace(
                dearest,
                context_window=min((i.context_window for i in infos if i.context_window), default=None),
                max_output_tokens=min((i.max_output_tokens for i in infos if i.max_output_tokens), default=None),
            )
        info = self._model_info.get(model)
        if info is None:
            try:
                provided = pricing.provided_info(self.providers, model)
            except Exception:  # a provider plugin's bug must not stop a call: the other sources still count
                log.exception("the provider of %s could not describe it (its model_info)", model)
                provided = {}
            info = self._model_info[model] = pricing.model_info(self.config, model, provided)
            if not info.price_known:
                warn_limited(
                    log,
                    "no-price",
                    'no price known for %s; using the fallback price (set [pricing."%s"])',
                    model,
                    model,
                )
            note = deprecation_message(model, info.deprecation_date)
            if note:
                log.warning("%s", note)
        return info

    @property
    def default_model(self) -> str:
        return str(self.config["models"]["default"])


@dataclass(frozen=True, eq=False)
class Registry:
    config: Config
    pm: pluggy.PluginManager
    # The backend ``[storage] backend`` chose (docs/deploy.md) and its stores.
    storage: Storage
    sessions: SessionStoreAPI
    usage: UsageStoreAPI
    clients: ClientStoreAPI
    # The bytes of the files sessions hold, by SHA-256 (attachments.py).
    blobs: BlobStoreAPI
    plugins: Plugins
    models: Models
    # The checks before every provider call (README.md#teams-and-budgets).
    guard: Guard
    # The write-ahead journal of the provider calls in flight (calls.py, storage/ledger.py).
    ledger: Ledger
    # Where each usage record goes (the sinks), and the writes waiting for a retry.
    recorder: Recorder
    # The model groups and the state their choices read (routing.py).
    router: Router
    # The turns streaming now, one per session, across transports (and replicas).
    locks: SessionLocks
    # What replicas share through Redis ([storage] redis_url): stream locks, running streams, aborts.
    cluster: Cluster | None = None
    # The budget alerts ([alerts] thresholds; alerts.py), also one of the recorder's sinks.
    alerts: BudgetAlerts | None = None

    @property
    def providers(self) -> tuple[Provider, ...]:
        return self.plugins.providers

    @property
    def section_builders(self) -> tuple[ContextSectionBuilder, ...]:
        return self.plugins.section_builders

    @property
    def tools(self) -> Mapping[str, Tool]:
        return self.plugins.tools

    @property
    def pending(self) -> PendingWrites:
        return self.recorder.pending

    def provider_for(self, model: str) -> Provider:
        return self.models.provider_for(model)

    async def not_found_message(self, caller: str, error: ModelNotFound) -> str:
        """``error``'s message for ``caller``: a client is offered only a model its allowlist lets it use."""
        client = await self.clients.get(caller) if caller != ADMIN and error.suggested else None
        return str(error) if client is None else self.models.not_found_for(error, client.model_allowed)

    def model_info(self, model: str) -> ModelInfo:
        return self.models.model_info(model)

    @property
    def default_model(self) -> str:
        return self.models.default_model

    async def aclose(self) -> None:
        await self.recorder.aclose()  # the last try of writes that failed, before the stores close
        await self.ledger.aclose()
        if self.cluster is not None:
            await self.cluster.aclose()  # after the turns: their locks are released
        plugins: list[tuple[str, object]] = [("usage sink", s) for s in self.recorder.sinks if delivery(s) != "queued"]
        plugins += [("provider", p) for p in self.providers]
        for kind, plugin in plugins:
            close = getattr(plugin, "aclose", None)
            if close is not None:
                try:
                    # Bounded, as a queued sink's: a plugin hanging in its aclose must not keep the server up.
                    await asyncio.wait_for(close(), CLOSE_SECONDS)
                except TimeoutError:
                    name = getattr(plugin, "name", plugin)
                    log.error("closing %s %r took more than %.0fs; left behind", kind, name, CLOSE_SECONDS)
                except Exception:
                    log.exception("closing %s %r failed", kind, getattr(plugin, "name", plugin))
        await self.sessions.aclose()
        await self.usage.aclose()
        await self.storage.aclose()
