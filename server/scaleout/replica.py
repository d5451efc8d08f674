"""One engine replica of the Ray Serve deployment: an in-process ``AsyncLLMEngine``.

Every replica builds its engine from the same ``EngineConfig`` and reads the same adapter
directory through a ``RegistryReader`` (read-only: only the ingress's registry writes the
store). Requests arrive from the ingress's ``RayEngineClient`` through a Ray Serve handle.

**Two notions of "loaded", one rule.** Ray Serve's multiplexing keeps, per replica, an LRU of at
most K model ids (``@serve.multiplexed(max_num_models_per_replica=K)``); the router sends a
request carrying an id to a replica that lists it. The engine keeps its own byte-budget LRU of
resident weights (``AdapterCache``), whose reference counts keep every adapter a running
request uses. The rule:

- the engine's cache alone owns the weights. Ray's list only steers routing: the multiplexed
  loader prepares the adapter in the engine's cache (``prepare_adapter``: read from disk, staged
  for the pool), and Ray dropping an id from its list (``RoutedAdapter.__del__``) frees nothing,
  so Ray can never evict weights a running request holds;
- K is what the byte budget holds: ``--replica-max-adapters``, else ``--adapter-memory`` over
  the resident bytes of the largest adapter registered at the replica's first adapter request
  (a LoRA r=16 on every projection when there is none). Adapters of very different sizes, or
  much larger ones uploaded later, call for ``--replica-max-adapters``. Both LRUs see the same requests in the same order, and
  K of the largest adapters fit the budget at once, so every id Ray lists for a replica is one
  whose weights that replica's engine still holds (or is reading), and the engine evicts only
  what Ray has already dropped (the reverse of the first point).

**Deletes and re-uploads.** The ingress awaits ``forget_adapter`` on every replica before a
delete returns. As a second line, each request on an adapter compares the record's version
(``RegistryReader.version``: its stat) with the one its cached weights were read under, and
forgets the adapter first if they differ: a replica that missed a broadcast (restarting, or
unreachable for a moment) still never serves the old weights of a re-uploaded id.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any, AsyncIterator, Callable

from prolora_serve.adapters.accounting import ModelShape, adapter_num_params, lora
from prolora_serve.adapters.registry import AdapterNotFoundError, RegistryError, RegistryReader
from prolora_serve.adapters.weights import CompactAdapter

from ..config import ServerConfig
from ..engine.async_engine import AsyncLLMEngine
from ..engine.errors import EngineError
from ..engine.sampling import SamplingParams
from ..engine.startup_heap import freeze_startup_heap, thaw_startup_heap
from .protocol import (ReplicaDescription, ReplicaFailed, ReplicaIdentity, ReplicaSnapshot,
                       ReplicaStarted)

log = logging.getLogger(__name__)
FALLBACK_ADAPTER = lora(16)  # sizes K when no adapter is registered at start-up
# Errors that belong to the request (sent to the ingress as data); anything else is a bug and
# is raised (Ray logs it and the ingress answers 500).
REQUEST_ERRORS = (EngineError, RegistryError, ValueError)


class VersionedSource:
    """The engine's adapter source: the store's reader, noting which record version each
    adapter's weights were read under."""

    def __init__(self) -> None:
        self.reader: RegistryReader | None = None
        self._versions: dict[str, Any] = {}
        self._lock = threading.Lock()

    def has_adapter(self, adapter_id: str) -> bool:
        return self.reader is not None and self.reader.has_adapter(adapter_id)

    def load_adapter(self, adapter_id: str) -> CompactAdapter:
        if self.reader is None:
            raise AdapterNotFoundError(f"adapter {adapter_id!r} does not exist (store not open)")
        version = self.reader.version(adapter_id)  # before the weights: a change is seen later
        adapter = self.reader.load_adapter(adapter_id)
        with self._lock:
            self._versions[adapter_id] = version
        return adapter

    def stale(self, adapter_id: str) -> bool:
        """Weights were read under another record than the one committed now."""
        with self._lock:
            read = self._versions.get(adapter_id)
        return read is not None and self.reader is not None and read != self.reader.version(adapter_id)

    def forget(self, adapter_id: str) -> None:
        with self._lock:
            self._versions.pop(adapter_id, None)


class RoutedAdapter:
    """What Ray Serve's multiplexed LRU holds for one adapter id on this replica. Dropping it
    (Ray calls ``__del__`` on eviction, and Python may again) frees nothing: see the module doc."""

    def __init__(self, adapter_id: str, nbytes: int, on_drop: Callable[[str], None]) -> None:
        self.adapter_id = adapter_id
        self.nbytes = nbytes
        self._on_drop: Callable[[str], None] | None = on_drop

    def __del__(self) -> None:
        on_drop, self._on_drop = self._on_drop, None
        if on_drop is not None:
            on_drop(self.adapter_id)


def routing_capacity(config: ServerConfig, engine: AsyncLLMEngine, reader: RegistryReader) -> int:
    """K for ``@serve.multiplexed``: see the module doc."""
    if config.scaleout.replica_max_adapters is not None:
        return config.scaleout.replica_max_adapters
    cache = engine.adapter_cache
    if cache is None:
        return 1
    import torch

    element = torch.empty((), dtype=cache.pool.dtype).element_size()
    largest = max((record.num_params for record in reader.records()), default=None)
    if largest is None:
        shape = ModelShape.from_config(engine.model.hf_config)
        largest = adapter_num_params(shape, FALLBACK_ADAPTER.config())
    return max(1, cache.budget_bytes // max(1, largest * element))


class EngineReplica:
    """The engine replica deployment's class (``deploy.py`` wraps it in ``serve.deployment``)."""

    def __init__(self, config: ServerConfig) -> None:
        from ray import serve

        import torch

        torch.set_num_threads(config.threads or max(1, int(config.scaleout.replica_cpus)))
        self.source = VersionedSource()
        self.engine = AsyncLLMEngine.from_config(config.engine, adapter_source=self.source)
        config.adapter_dir.mkdir(parents=True, exist_ok=True)
        self.source.reader = RegistryReader(config.adapter_dir, self.engine.model.linear_shapes)
        self.engine.start()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._config = config
        self.max_adapters: int | None = config.scaleout.replica_max_adapters  # K, once known
        self.routing_evictions = 0  # ids Ray's LRU dropped (bookkeeping only: nothing is freed)
        self._route_adapter: Callable[[str], Any] | None = None  # made on the first adapter request
        log.info("engine replica %s (pid %d): %s", self.replica_id, os.getpid(), self.engine.model.name)
        # the step thread runs in this process, not the ingress's: its heap is frozen here
        heap = freeze_startup_heap()
        log.info("engine replica %s: %s", self.replica_id, heap)

    def _routing_capacity(self) -> int:
        if self.max_adapters is None:
            self.max_adapters = routing_capacity(self._config, self.engine, self.source.reader)
        return self.max_adapters

    def _router_list(self) -> Callable[[str], Any]:
        """Ray Serve's multiplexed loader for this replica, made on the first request on an
        adapter: K is sized from the adapters registered then (the ingress registers
        ``--register`` directories after the replicas start), so it is made on the instance,
        not on the class (Ray Serve finds a multiplexed function stored on the instance)."""
        if self._route_adapter is None:
            from ray import serve

            async def prepare(adapter_id: str) -> RoutedAdapter:
                nbytes = await asyncio.wrap_future(self.engine.engine.prepare_adapter(adapter_id))
                return RoutedAdapter(adapter_id, nbytes, self._routing_dropped)

            capacity = self._routing_capacity()
            self._route_adapter = serve.multiplexed(max_num_models_per_replica=capacity)(prepare)
            log.info("engine replica %s: Ray's routing list holds up to %d adapters",
                     self.replica_id, capacity)
        return self._route_adapter

    def _routing_dropped(self, adapter_id: str) -> None:
        self.routing_evictions += 1
        log.debug("replica %s: Ray's routing list dropped %s (its weights stay in the engine's "
                  "cache until that evicts them)", self.replica_id, adapter_id)

    # --- requests -----------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       adapter_id: str | None = None) -> AsyncIterator[Any]:
        """``ReplicaStarted``, then the engine's output deltas; the request's own error ends the
        stream as a ``ReplicaFailed`` (anything else is raised: Ray hands it to the ingress as a
        ``RayTaskError``). Cancelling the stream aborts the request (the engine's
        ``generate`` aborts when closed early)."""
        from ray import serve

        yield ReplicaStarted(self.replica_id)
        try:
            if adapter_id is not None:
                await self._forget_if_stale(adapter_id)
                if serve.get_multiplexed_model_id() == adapter_id:
                    await self._router_list()(adapter_id)
            async for output in self.engine.generate(request_id, prompt_ids, params, adapter_id):
                yield output
        except REQUEST_ERRORS as err:  # the request's own error (a 4xx, a stopped engine)
            yield ReplicaFailed.of(err)

    async def complete(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       adapter_id: str | None = None) -> tuple[str, str | ReplicaFailed]:
        """One whole request on this replica, as (replica id, its text or the error): with
        ``handle.broadcast`` it reaches every replica (tests, the benchmark's checks)."""
        text = ""
        try:
            if adapter_id is not None:
                await self._forget_if_stale(adapter_id)
            async for output in self.engine.generate(request_id, prompt_ids, params, adapter_id):
                text += output.text
        except REQUEST_ERRORS as err:
            return self.replica_id, ReplicaFailed.of(err)
        return self.replica_id, text

    async def _forget_if_stale(self, adapter_id: str) -> None:
        if self.source.stale(adapter_id):
            log.warning("replica %s: adapter %s changed on disk since it was read (a missed "
                        "forget); reading it again", self.replica_id, adapter_id)
            await self.forget_adapter(adapter_id)

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    async def forget_adapter(self, adapter_id: str) -> str:
        await self.engine.forget_adapter(adapter_id)
        self.source.forget(adapter_id)
        return self.replica_id

    # --- state --------------------------------------------------------------------------------
    async def describe(self) -> ReplicaDescription:
        return ReplicaDescription(self.engine.model, self.engine.tokenizer)

    def routing_ids(self) -> list[str]:
        """The ids Ray Serve's multiplexed LRU holds here, least recent first (what the router
        sends here). Read from Ray's wrapper, a private structure: empty if it moved."""
        if self._route_adapter is None:
            return []
        wrapper = getattr(getattr(self._route_adapter, "__wrapped__", None),
                          "__serve_multiplex_wrapper", None)
        return list(getattr(wrapper, "models", {}))

    async def identify(self) -> ReplicaIdentity:
        capacity = self.max_adapters if self.max_adapters is not None else \
            routing_capacity(self._config, self.engine, self.source.reader)  # not fixed yet
        return ReplicaIdentity(self.replica_id, os.getpid(), capacity, self.routing_evictions,
                               self.routing_ids())

    async def snapshot(self) -> ReplicaSnapshot:
        return ReplicaSnapshot(self.replica_id, await self.engine.snapshot())

    def check_health(self) -> None:
        """Ray Serve calls this periodically; a stopped step loop gets the replica restarted."""
        if not self.engine.is_running:
            raise RuntimeError(f"engine replica {self.replica_id}: the step loop is not running")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None and engine.is_running:
            engine.shutdown()
        thaw_startup_heap()
