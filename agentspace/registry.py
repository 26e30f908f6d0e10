"""The registry of one server process: what the plugins registered (providers, context sections, tools,
usage sinks), the stores, the turns streaming now, and the writes waiting for a retry.

Transports reach it through the service layer (``service.Service``); the pipeline runs turns against it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pluggy

from . import pricing
from .catalog import deprecation_message, plugin_models, suggestion, unknown_model
from .config import Config, ConfigError
from .errors import StorageError
from .logs import warn_limited
from .lru import LRU
from .observe import notify
from .pending import PendingWrites
from .providers.base import Provider, model_prefix
from .sink_queue import SinkQueue
from .sinks import UsageSink, delivery, sink_name
from .types import ContextSectionBuilder, ModelInfo, Tool, UsageRecord

if TYPE_CHECKING:
    from .cluster import Cluster
    from .limits import Guard, Reservation
    from .pipeline import Turn
    from .routing import Router
    from .storage.ledger import Ledger
    from .storage.protocols import BlobStoreAPI, ClientStoreAPI, SessionStoreAPI, Storage, UsageStoreAPI

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
    # The queues of the sinks that are not awaited (``sinks.delivery``), made at the first record or start.
    sink_queues: dict[int, SinkQueue] = field(default_factory=dict)
    # session id -> the turn streaming in it; one at a time per session, across transports.
    active: dict[str, Turn] = field(default_factory=dict)
    # Bounded: model ids come from clients, and a provider may claim any id with its prefix.
    _model_info: LRU[str, ModelInfo] = field(default_factory=LRU)
    _unknown: LRU[str, str | None] = field(default_factory=LRU)  # model -> why it is a typo (None: it is not)
    # Store writes that failed, retried until they succeed or the server stops.
    pending: PendingWrites = field(default_factory=PendingWrites)
    # The backend ``[storage] backend`` chose; None only for registries built by hand.
    storage: Storage | None = None
    # What replicas share through Redis ([storage] redis_url): stream locks, running streams, aborts.
    cluster: Cluster | None = None
    # The clients (README.md#teams-and-budgets) and the checks before every provider call.
    clients: ClientStoreAPI = field(init=False)
    guard: Guard = field(init=False)
    # The write-ahead journal of the provider calls in flight (calls.py, storage/ledger.py).
    ledger: Ledger = field(init=False)
    # The model groups and the state their choices read (routing.py).
    router: Router = field(init=False)
    # The bytes of the files sessions hold, by SHA-256 (attachments.py).
    blobs: BlobStoreAPI = field(init=False)

    def __post_init__(self) -> None:
        from .limits import Guard
        from .routing import Router
        from .storage.embedded.clients import ClientStore

        backend_clients = self.storage.clients if self.storage is not None else None
        self.clients = backend_clients if backend_clients is not None else ClientStore(self.config.data_dir)
        self.guard = Guard(self.clients, self.usage, self.model_info)
        from .storage.ledger import Ledger

        self.ledger = Ledger(self.config.data_dir if self.storage is not None else None)
        self.router = Router(self.config.groups)
        from .storage.embedded.blobs import FileBlobStore

        backend_blobs = self.storage.blobs if self.storage is not None else None
        self.blobs = backend_blobs if backend_blobs is not None else FileBlobStore(self.config.data_dir)

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
        for pattern in pricing.unserved_patterns(config, gw.providers):
            raise ConfigError(
                config.source,
                f'pricing."{pattern}"',
                f"no registered provider serves {pattern.partition('/')[0]!r} models, so the pattern matches "
                "nothing (is the provider plugin installed? agentspace plugins)",
            )
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
                problem = self._unknown.get(model) if model in self._unknown else self._check_name(model)
                if problem:
                    raise ModelNotFound(problem)
                return provider
        hint = suggestion(model, plugin_models(self.providers))
        raise ModelNotFound(f"No provider serves {model!r}.{hint} Run: agentspace models")

    def _check_name(self, model: str) -> str | None:
        """A typo'd model is MODEL_NOT_FOUND with a suggestion, before a key or an upstream is asked."""
        problem = unknown_model(self.config, model, plugin_models(self.providers))
        self._unknown[model] = problem
        return problem

    def model_info(self, model: str) -> ModelInfo:
        """Price, limits and capabilities of ``model``: the one lookup for pricing, reservations, the context
        window and the model lists (the cost map, then the provider's ``model_info``, then ``[pricing]``)."""
        group = self.router.group(model)
        if group is not None:
            # A call to a group reserves at its dearest deployment; the record prices the one that answered.
            infos = [self.model_info(d.model) for d in group.deployments]
            return max(infos, key=lambda i: (i.output_per_mtok, i.input_per_mtok))
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

    # --- usage ----------------------------------------------------------------------------------

    def _queue(self, sink: UsageSink) -> SinkQueue:
        queue = self.sink_queues.get(id(sink))
        if queue is None:
            queue = self.sink_queues[id(sink)] = SinkQueue(sink)
        return queue

    async def start(self) -> None:
        """When the server starts: the queued sinks' ``start`` (open their clients) and workers."""
        for sink in self.sinks:
            if delivery(sink) == "queued":
                await self._queue(sink).start()

    async def record_usage(
        self, record: UsageRecord, reservation: Reservation | None = None
    ) -> StorageError | OSError | None:
        """Store one record and hand it to every other sink; the failure when the store of record failed,
        else None. The record then settles the call's ``reservation`` (its client's budget and minute,
        ``limits.Guard``).

        The store of record (``delivery = "record"``) is awaited; when it fails (``StorageError``,
        ``OSError``: disk full, I/O error) the record is written again later (``pending``). ``inline``
        sinks are awaited and their failures logged; every other sink gets the record through its own queue
        (``sinks.SinkQueue``), so it neither delays nor fails the turn.
        """
        failed: StorageError | OSError | None = None
        for sink in self.sinks:
            kind = delivery(sink)
            if kind == "queued":
                self._queue(sink).offer(record)
                continue
            started = time.monotonic()
            try:
                await sink.record(record)
            except (StorageError, OSError) as e:
                if kind != "record":
                    log.exception("usage sink %r failed", sink_name(sink))
                    continue
                log.exception("usage sink %r could not store record %s; retrying", sink_name(sink), record.id)
                self.pending.add(
                    f"usage record {record.id} in sink {sink_name(sink)!r}",
                    functools.partial(sink.record, record),
                )
                failed = e
            except Exception:
                log.exception("usage sink %r failed", sink_name(sink))
            notify(self.pm.hook.store_written, store=f"usage:{sink_name(sink)}", seconds=time.monotonic() - started)
        await self.guard.settle(reservation, record)
        return failed

    async def aclose(self) -> None:
        await self.pending.aclose()  # the last try of writes that failed, before the stores close
        # The queued sinks drain together (each for its own bounded time), then close.
        await asyncio.gather(*(queue.aclose() for queue in self.sink_queues.values()))
        await self.ledger.aclose()
        if self.cluster is not None:
            await self.cluster.aclose()  # after the turns: their locks are released
        plugins: list[tuple[str, object]] = [("usage sink", s) for s in self.sinks if delivery(s) != "queued"]
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
