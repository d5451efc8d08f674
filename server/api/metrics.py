"""Prometheus metrics, one ``CollectorRegistry`` per app (so several apps never collide).

Request counts/latency come from an ASGI middleware; token counters from the routes; the
engine's gauges and cache counters come from one ``EngineClient.snapshot()`` per scrape.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..engine.client import EngineClient
from ..engine.engine import EngineStats

PREFIX = "prolora"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass
class _EmptyCacheStats:
    """Stands in when the engine runs without an adapter cache."""

    budget_bytes: int = 0
    used_bytes: int = 0
    num_resident: int = 0
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0


_NO_CACHE = _EmptyCacheStats()


@dataclass
class ScrapeState:
    """What one scrape reports beyond the HTTP counters (None: no engine running)."""

    stats: EngineStats | None = None
    num_registered: int = 0


class EngineCollector(Collector):
    """Reports the engine, cache and registry state read for the current scrape."""

    def __init__(self) -> None:
        self.current = ScrapeState()

    def _gauges(self, stats: EngineStats, num_registered: int) -> Iterator[GaugeMetricFamily]:
        cache = stats.adapter_cache or _NO_CACHE
        for name, doc, value in (
            ("queue_depth", "requests waiting to be scheduled", stats.num_waiting),
            ("running_requests", "requests in the running batch", stats.num_running),
            ("batch_size", "sequences in the last engine step", stats.last_batch_size),
            ("kv_blocks_used", "KV cache blocks in use", stats.kv_blocks_used),
            ("kv_blocks_total", "KV cache blocks in total", stats.kv_blocks_total),
            ("kv_cache_bytes", "bytes of the KV cache", stats.kv_cache_bytes),
            ("base_model_bytes", "bytes of the resident base model", stats.base_model_bytes),
            ("adapter_cache_budget_bytes", "adapter cache byte budget", cache.budget_bytes),
            ("adapter_resident_bytes", "bytes of resident adapter weights", cache.used_bytes),
            ("adapters_resident", "adapters resident in the device cache", cache.num_resident),
            ("adapters_registered", "adapters in the registry", num_registered),
        ):
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)

    def _counters(self, cache: Any) -> Iterator[CounterMetricFamily]:
        for name, doc in (("hits", "adapter cache hits"), ("misses", "adapter cache misses"),
                          ("loads", "adapters loaded into the device cache"),
                          ("evictions", "adapters evicted from the device cache")):
            yield CounterMetricFamily(f"{PREFIX}_adapter_cache_{name}", doc, value=getattr(cache, name))

    def collect(self) -> Iterator[Any]:
        stats = self.current.stats
        if stats is None:
            return
        yield from self._gauges(stats, self.current.num_registered)
        yield from self._counters(stats.adapter_cache or _NO_CACHE)


class ServerMetrics:
    """The app's metric objects and its private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(f"{PREFIX}_http_requests", "HTTP requests by endpoint and status",
                                ["method", "endpoint", "status"], registry=self.registry)
        self.latency = Histogram(f"{PREFIX}_http_request_duration_seconds",
                                 "HTTP request time to the last byte", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "prompt tokens processed",
                                     registry=self.registry)
        self.generated_tokens = Counter(f"{PREFIX}_generated_tokens", "tokens generated",
                                        registry=self.registry)
        self.engine_collector = EngineCollector()
        self.registry.register(self.engine_collector)

    def record_tokens(self, prompt: int, generated: int) -> None:
        self.prompt_tokens.inc(prompt)
        self.generated_tokens.inc(generated)

    def render(self, scrape: ScrapeState) -> bytes:
        # no await between setting and rendering: concurrent scrapes cannot interleave here
        self.engine_collector.current = scrape
        return generate_latest(self.registry)


def _endpoint(scope: dict[str, Any]) -> str:
    """The route template (``/adapters/{adapter_id}``), never a raw unmatched path: bounded labels."""
    route = scope.get("route")
    if route is not None:
        return route.path
    return scope["path"] if "endpoint" in scope else "unmatched"  # plain Starlette routes


class MetricsMiddleware:
    """Counts every HTTP request by endpoint and final status; times it to the last byte."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}
        start = time.perf_counter()

        async def send_and_watch(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            endpoint = _endpoint(scope)
            self.metrics.requests.labels(scope["method"], endpoint, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


router = APIRouter(tags=["operations"])


@router.get("/metrics", response_class=Response, summary="Prometheus metrics")
async def get_metrics(request: Request) -> Response:
    state = request.app.state
    engine: EngineClient | None = state.engine
    registry = state.registry
    scrape = ScrapeState((await engine.snapshot()).stats if engine is not None else None,
                         len(registry) if registry is not None else 0)
    return Response(state.metrics.render(scrape), media_type=CONTENT_TYPE_LATEST)
