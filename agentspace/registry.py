"""The registry of one server process: what the plugins registered (providers, context sections, tools,
usage sinks), the stores, the turns streaming now, and the writes waiting for a retry.

Transports reach it through the service layer (``service.Service``); the pipeline runs turns against it.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pluggy

from . import pricing
from .catalog import deprecation_message
from .config import Config
from .errors import StorageError
from .lru import LRU
from .observe import notify
from .pending import PendingWrites
from .providers.base import Provider, model_prefix
from .sinks import UsageSink
from .types import ContextSectionBuilder, ModelInfo, Tool, UsageRecord

if TYPE_CHECKING:
    from .cluster import Cluster
    from .limits import Guard, Reservation
    from .pipeline import Turn
    from .routing import Router
    from .stores.base import ClientStoreAPI, SessionStoreAPI, Storage, UsageStoreAPI
    from .stores.ledger import Ledger

log = logging.getLogger(__name__)


class ModelNotFound(Exception):
    pass


@dataclass
class Registry:
    config: Config
    pm: pluggy.PluginManager
    sessions: SessionStoreAPI
    usage: UsageStoreAPI
    providers: list[Provider] = field(default_factory=list)
    section_builders: list[ContextSectionBuilder] = field(default_factory=list)
    tools: dict[str, Tool] = field(default_factory=dict)
    sinks: list[UsageSink] = field(default_factory=list)
    # session id -> the turn streaming in it; one at a time per session, across transports.
    active: dict[str, Turn] = field(default_factory=dict)
    # Bounded: model ids come from clients, and a provider may claim any id with its prefix.
    _model_info: LRU[str, ModelInfo] = field(default_factory=LRU)
    # Store writes that failed, retried until they succeed or the server stops.
    pending: PendingWrites = field(default_factory=PendingWrites)
    # The backend ``[storage] backend`` chose (SPEC 13); None only for registries built by hand.
    storage: Storage | None = None
    # What replicas share through Redis ([storage] redis_url): stream locks, running streams, aborts.
    cluster: Cluster | None = None
    # The clients (SPEC 11) and the checks before every provider call.
    clients: ClientStoreAPI = field(init=False)
    guard: Guard = field(init=False)
    # The write-ahead journal of the provider calls in flight (calls.py, stores/ledger.py).
    ledger: Ledger = field(init=False)
    # The model groups and the state their choices read (routing.py).
    router: Router = field(init=False)

    def __post_init__(self) -> None:
        from .limits import Guard
        from .routing import Router
        from .stores.clients import ClientStore

        backend_clients = self.storage.clients if self.storage is not None else None
        self.clients = backend_clients if backend_clients is not None else ClientStore(self.config.data_dir)
        self.guard = Guard(self.clients, self.usage, self.model_info)
        from .stores.ledger import Ledger

        self.ledger = Ledger(self.config.data_dir if self.storage is not None else None)
        self.router = Router(self.config.groups)

    @classmethod
    def create(cls, config: Config, pm: pluggy.PluginManager, storage: Storage | None = None) -> Registry:
        from .default_plugins.storage import open_storage

        storage = storage or open_storage(config, pm)
        gw = cls(config, pm, storage.sessions, storage.usage, storage=storage)
        if storage.sink is not None:
            gw.sinks.append(storage.sink)
        pm.hook.register_providers(register=gw.providers.append, config=config)
        pm.hook.register_context_sections(register=gw.section_builders.append, config=config)
        pm.hook.register_tools(register=gw._add_tool, config=config)
        pm.hook.register_usage_sinks(register=gw.sinks.append, config=config)
        return gw

    def _add_tool(self, tool: Tool) -> None:
        if tool.name in self.tools:
            log.warning("tool %r registered twice; the later registration wins", tool.name)
        self.tools[tool.name] = tool

    # --- models ---------------------------------------------------------------------------------

    def provider_for(self, model: str) -> Provider:
        """The provider serving ``model``; raises ModelNotFound with a message for the client. A model group is
        served by its first deployment's provider (each call picks its deployment, ``routing.py``)."""
        group = self.router.group(model)
        if group is not None:
            return self.provider_for(group.deployments[0].model)
        if "/" not in model or not model_prefix(model) or model.endswith("/"):
            raise ModelNotFound(f"Model ids look like provider/model, e.g. anthropic/claude-sonnet-4-6; got {model!r}")
        for provider in self.providers:
            if provider.claims(model):
                return provider
        raise ModelNotFound(f"No provider serves {model!r}. Run: agentspace models")

    def model_info(self, model: str) -> ModelInfo:
        group = self.router.group(model)
        if group is not None:
            # A call to a group reserves at its dearest deployment; the record prices the one that answered.
            infos = [self.model_info(d.model) for d in group.deployments]
            return max(infos, key=lambda i: (i.output_per_mtok, i.input_per_mtok))
        info = self._model_info.get(model)
        if info is None:
            info = self._model_info[model] = pricing.model_info(self.config, model)
            if not info.price_known:
                log.warning('no price known for %s; using the fallback price (set [pricing."%s"])', model, model)
            note = deprecation_message(model, info.deprecation_date)
            if note:
                log.warning("%s", note)
        return info

    @property
    def default_model(self) -> str:
        return str(self.config["models"]["default"])

    # --- usage ----------------------------------------------------------------------------------

    async def record_usage(
        self, record: UsageRecord, reservation: Reservation | None = None
    ) -> StorageError | OSError | None:
        """Send one record to every sink, each write awaited; the failure when a sink's store failed, else
        None. The record then settles the call's ``reservation`` (its client's budget and minute, ``limits.Guard``).

        A sink whose store failed (``StorageError``, ``OSError``: disk full, I/O error) gets the record again
        later (``pending``); any other failure of a sink is logged and does not stop the others.
        """
        failed: StorageError | OSError | None = None
        for sink in self.sinks:
            started = time.monotonic()
            try:
                await sink.record(record)
            except (StorageError, OSError) as e:
                log.exception(
                    "usage sink %r could not store record %s; retrying", getattr(sink, "name", sink), record.id
                )
                self.pending.add(
                    f"usage record {record.id} in sink {getattr(sink, 'name', sink)!r}",
                    functools.partial(sink.record, record),
                )
                failed = e
            except Exception:
                log.exception("usage sink %r failed", getattr(sink, "name", sink))
            store = f"usage:{getattr(sink, 'name', 'sink')}"
            notify(self.pm.hook.store_written, store=store, seconds=time.monotonic() - started)
        await self.guard.settle(reservation, record)
        return failed

    async def aclose(self) -> None:
        await self.pending.aclose()  # the last try of writes that failed, before the stores close
        await self.ledger.aclose()
        if self.cluster is not None:
            await self.cluster.aclose()  # after the turns: their locks are released
        plugins: list[tuple[str, object]] = [("usage sink", s) for s in self.sinks]
        plugins += [("provider", p) for p in self.providers]
        for kind, plugin in plugins:
            close = getattr(plugin, "aclose", None)
            if close is not None:
                try:
                    await close()
                except Exception:
                    log.exception("closing %s %r failed", kind, getattr(plugin, "name", plugin))
        await self.sessions.aclose()
        await self.usage.aclose()
        if self.storage is not None:
            await self.storage.aclose()
