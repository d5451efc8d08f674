"""The FastAPI app factory. The lifespan builds (or adopts) the engine and the registry, starts
the engine's step loop, and stops it on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool

from prolora_serve.adapters.registry import AdapterRegistry
from prolora_serve.adapters.weights import CompactAdapter

from ..config import ServerConfig
from ..engine.client import EngineClient
from ..engine.startup_heap import frozen_startup_heap
from ..engine.threads import confine_this_thread, run_on_passing_thread
from . import adapters, chat, completions, dashboard, lora_adapters, metrics, models
from .auth import require_api_key
from .errors import install_error_handlers

log = logging.getLogger(__name__)
VERSION = "0.1.0"


class DeferredAdapterSource:
    """The engine needs an adapter source at construction, the registry needs the engine's
    model shapes: this stands in for the registry until it exists."""

    def __init__(self) -> None:
        self.registry: AdapterRegistry | None = None

    def _target(self) -> AdapterRegistry:
        if self.registry is None:
            raise RuntimeError("the adapter registry is not open yet")
        return self.registry

    def load_adapter(self, adapter_id: str) -> CompactAdapter:
        return self._target().load_adapter(adapter_id)

    def has_adapter(self, adapter_id: str) -> bool:
        return self.registry is not None and self.registry.has_adapter(adapter_id)


@dataclass
class Runtime:
    engine: EngineClient
    registry: AdapterRegistry


def _build_engine(config: ServerConfig, source: DeferredAdapterSource) -> EngineClient:
    from prolora_serve.server.engine.async_engine import AsyncLLMEngine

    return AsyncLLMEngine.from_config(config.engine, adapter_source=source)


def open_runtime(config: ServerConfig, engine: EngineClient | None = None,
                 registry: AdapterRegistry | None = None) -> Runtime:
    """Load the model (unless given), open the registry against its shapes, start the engine."""
    source = DeferredAdapterSource()
    engine = engine if engine is not None else _build_engine(config, source)
    if registry is None:
        registry = AdapterRegistry(config.adapter_dir, engine.model.linear_shapes,
                                   config.max_upload_size)
    source.registry = registry
    for directory in config.register:
        added = registry.register_directory(directory)
        log.info("registered %d adapters from %s", len(added), directory)
    engine.start()
    return Runtime(engine, registry)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = app.state
    confine_this_thread()  # the event loop's own tensor work, if any, never opens a team
    # On a thread that ends with the load: loading opens an OpenMP team on its thread, which
    # would throttle the step thread's for as long as it lived (server/engine/threads.py).
    runtime = await asyncio.to_thread(run_on_passing_thread, open_runtime, state.config,
                                      state.engine_arg, state.registry_arg)
    state.engine, state.registry = runtime.engine, runtime.registry
    state.model_name = runtime.engine.model.name
    backends = runtime.engine.model.backends
    log.info("kernels: adapters %s, decode attention %s", backends.adapter, backends.decode_attention)
    state.started_at = time.time()
    with frozen_startup_heap() as heap:  # thawed after shutdown, so that exit frees it
        log.info("%s", heap)
        log.info("serving %s with %d registered adapters", state.model_name, len(runtime.registry))
        try:
            yield
        finally:
            state.stopping = True
            await run_in_threadpool(runtime.engine.shutdown)
            state.engine = None


def _require_key_on_v1(request: Request) -> None:
    if request.url.path.startswith("/v1/"):
        require_api_key(request)


def create_app(config: ServerConfig, engine: EngineClient | None = None,
               registry: AdapterRegistry | None = None) -> FastAPI:
    """The server app. ``engine``/``registry`` may be given (already built); otherwise the
    lifespan builds them from ``config``. Either way the lifespan starts and stops the engine."""
    app = FastAPI(title="prolora-serve", version=VERSION, lifespan=_lifespan,
                  description="Multi-adapter (PRoLoRA) LLM inference with an OpenAI-style API")
    state = app.state
    state.config, state.engine_arg, state.registry_arg = config, engine, registry
    state.engine, state.registry, state.model_name, state.stopping = None, None, None, False
    state.metrics = metrics.ServerMetrics()
    app.add_middleware(metrics.MetricsMiddleware, metrics=state.metrics)
    install_error_handlers(app)
    for module in (completions, chat, models, adapters, lora_adapters, metrics):
        app.include_router(module.router)
    app.include_router(dashboard.router, dependencies=[Depends(_require_key_on_v1)])
    return app
