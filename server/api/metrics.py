"""Prometheus metrics, one ``CollectorRegistry`` per app (so several apps never collide).

Request counts/latency come from an ASGI middleware; token counters from the routes; the
engine's gauges and cache counters come from one ``EngineClient.snapshot()`` per scrape.

Per-adapter series (``prolora_adapter_*{adapter=...}``: requests, prompt and generated tokens,
running and waiting requests, residency, load seconds) come from the same snapshot. Their
labels are bounded: at most ``ADAPTER_LABEL_LIMIT`` adapter ids, picked by traffic and kept
once picked (a counter summed under ``other`` would otherwise drop each time an adapter left
it) until the adapter is deleted; every other adapter is summed under ``adapter="other"`` and
the base model is ``adapter=""``. With ``--api-key`` set these series go only to scrapes that
present a valid key (they name adapters), unless ``--metrics-adapter-labels open``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from dataclasses import field
from typing import Any, Iterable, Iterator, Mapping

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from ..engine.client import EngineClient
from ..engine.engine import EngineStats
from ..engine.residency import LOAD_SECONDS_BUCKETS, LoadTimes, ResidentAdapterInfo
from ..engine.scheduler import AdapterTraffic
from .auth import has_api_key

PREFIX = "prolora"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
ADAPTER_LABEL_LIMIT = 32  # adapter ids with their own label; the rest are summed under "other"
BASE_LABEL = ""  # the base model's requests (never an adapter id: ids have 1-64 characters)
OTHER_LABEL = "other"  # every adapter without its own label (one named "other" included)


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
class AdapterSeries:
    """The per-adapter part of one scrape, already folded to its bounded labels."""

    traffic: dict[str, AdapterTraffic] = field(default_factory=dict)  # by label
    resident: dict[str, int] = field(default_factory=dict)  # adapters resident, by label
    load_times: dict[str, LoadTimes] = field(default_factory=dict)  # by label (no base)


@dataclass
class ScrapeState:
    """What one scrape reports beyond the HTTP counters (None: no engine running)."""

    stats: EngineStats | None = None
    num_registered: int = 0
    adapters: AdapterSeries | None = None  # None: not shown to this scrape
    replicas: dict[str, EngineStats] = field(default_factory=dict)  # scale-out: by replica id


class AdapterLabels:
    """Which adapter ids get their own label: up to ``limit``, the busiest (by requests) of
    those not labelled yet filling free places; a labelled id keeps its label until the
    engine forgets it (the adapter was deleted)."""

    def __init__(self, limit: int = ADAPTER_LABEL_LIMIT) -> None:
        if limit < 0:
            raise ValueError(f"the adapter label limit must be >= 0, got {limit}")
        self.limit = limit
        self.labelled: set[str] = set()

    def update(self, known: Iterable[str], traffic: Mapping[str | None, AdapterTraffic]) -> None:
        known = {adapter_id for adapter_id in known if adapter_id != OTHER_LABEL}
        self.labelled &= known
        free = self.limit - len(self.labelled)
        if free > 0:
            newcomers = sorted(known - self.labelled,
                               key=lambda a: (-(traffic[a].requests if a in traffic else 0), a))
            self.labelled.update(newcomers[:free])

    def label(self, adapter_id: str | None) -> str:
        if adapter_id is None:
            return BASE_LABEL
        return adapter_id if adapter_id in self.labelled else OTHER_LABEL

    def fold(self, traffic: Mapping[str | None, AdapterTraffic],
             resident: list[ResidentAdapterInfo], load_times: Mapping[str, LoadTimes]) -> AdapterSeries:
        """Pick the labels for this snapshot and sum every series under them."""
        self.update({*(a for a in traffic if a is not None), *(r.adapter_id for r in resident),
                     *load_times}, traffic)
        series = AdapterSeries(traffic={BASE_LABEL: AdapterTraffic(), OTHER_LABEL: AdapterTraffic()},
                               resident={OTHER_LABEL: 0}, load_times={OTHER_LABEL: LoadTimes()})
        for adapter_id, entry in traffic.items():
            total = series.traffic.setdefault(self.label(adapter_id), AdapterTraffic())
            for name in ("requests", "prompt_tokens", "generated_tokens", "running", "waiting"):
                setattr(total, name, getattr(total, name) + getattr(entry, name))
        for info in resident:
            label = self.label(info.adapter_id)
            series.resident[label] = series.resident.get(label, 0) + 1
        for adapter_id, times in load_times.items():
            total = series.load_times.setdefault(self.label(adapter_id), LoadTimes())
            total.count += times.count
            total.sum_seconds += times.sum_seconds
            total.bucket_counts = [a + b for a, b in zip(total.bucket_counts, times.bucket_counts)]
        for label in self.labelled:  # every labelled adapter has every series
            series.traffic.setdefault(label, AdapterTraffic())
            series.resident.setdefault(label, 0)
            series.load_times.setdefault(label, LoadTimes())
        return series


def _adapter_families(series: AdapterSeries) -> Iterator[Any]:
    traffic = sorted(series.traffic.items())
    for name, doc, attr in (
        ("adapter_requests", "requests accepted, by adapter", "requests"),
        ("adapter_prompt_tokens", "prompt tokens of accepted requests (each of n choices is "
         "one request), by adapter", "prompt_tokens"),
        ("adapter_generated_tokens", "tokens generated, by adapter", "generated_tokens"),
    ):
        family = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=["adapter"])
        for label, entry in traffic:
            family.add_metric([label], getattr(entry, attr))
        yield family
    for name, doc, attr in (("adapter_running_requests", "requests in the running batch, by "
                             "adapter", "running"),
                            ("adapter_waiting_requests", "requests waiting to be scheduled, by "
                             "adapter", "waiting")):
        family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=["adapter"])
        for label, entry in traffic:
            family.add_metric([label], getattr(entry, attr))
        yield family
    resident = GaugeMetricFamily(f"{PREFIX}_adapter_resident", "adapters resident in the device "
                                 "cache under this label (0 or 1; how many for other)",
                                 labels=["adapter"])
    for label, count in sorted(series.resident.items()):
        resident.add_metric([label], count)
    yield resident
    load = HistogramMetricFamily(f"{PREFIX}_adapter_load_seconds", "seconds to read an adapter "
                                 "and copy it into the device cache, per cold load",
                                 labels=["adapter"])
    bounds = [str(float(b)) for b in LOAD_SECONDS_BUCKETS] + ["+Inf"]
    for label, times in sorted(series.load_times.items()):
        cumulative, buckets = 0, []
        for bound, count in zip(bounds, times.bucket_counts):
            cumulative += count
            buckets.append((bound, cumulative))
        load.add_metric([label], buckets, times.sum_seconds)
    yield load


class EngineCollector(Collector):
    """Reports the engine, cache and registry state read for the current scrape."""

    def __init__(self, adapter_label_limit: int = ADAPTER_LABEL_LIMIT) -> None:
        self.current = ScrapeState()
        self.labels = AdapterLabels(adapter_label_limit)

    def _gauges(self, stats: EngineStats, num_registered: int) -> Iterator[GaugeMetricFamily]:
        cache = stats.adapter_cache or _NO_CACHE
        for name, doc, value in (
            ("queue_depth", "requests waiting to be scheduled", stats.num_waiting),
            ("running_requests", "requests in the running batch", stats.num_running),
            ("batch_size", "sequences in the last engine step", stats.last_batch_size),
            ("kv_blocks_used", "KV cache blocks in use", stats.kv_blocks_used),
            ("kv_blocks_total", "KV cache blocks in total", stats.kv_blocks_total),
            ("kv_blocks_cached", "KV cache blocks holding prefix-cached content", stats.kv_blocks_cached),
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

    def _prefix_counters(self, stats: EngineStats) -> Iterator[CounterMetricFamily]:
        hits, queries = stats.prefix_cache_hits, stats.prefix_cache_queries
        for name, doc, value in (("hits", "prompt KV blocks reused from the prefix cache", hits),
                                 ("misses", "prompt KV blocks looked up and not cached", queries - hits)):
            yield CounterMetricFamily(f"{PREFIX}_prefix_cache_{name}", doc, value=value)

    def _replica_families(self, replicas: dict[str, EngineStats]) -> Iterator[Any]:
        """Scale-out (server/scaleout): the unlabelled series above are the sums over the
        replicas; these are each replica's own, labelled by its id."""
        for kind, name, doc, value in (
            (GaugeMetricFamily, "queue_depth", "requests waiting", lambda s: s.num_waiting),
            (GaugeMetricFamily, "running_requests", "requests in the running batch", lambda s: s.num_running),
            (GaugeMetricFamily, "kv_blocks_used", "KV cache blocks in use", lambda s: s.kv_blocks_used),
            (GaugeMetricFamily, "kv_blocks_total", "KV cache blocks in total", lambda s: s.kv_blocks_total),
            (GaugeMetricFamily, "adapters_resident", "adapters resident in the device cache",
             lambda s: (s.adapter_cache or _NO_CACHE).num_resident),
            (GaugeMetricFamily, "adapter_resident_bytes", "bytes of resident adapter weights",
             lambda s: (s.adapter_cache or _NO_CACHE).used_bytes),
            (CounterMetricFamily, "adapter_cache_loads", "adapters loaded into the device cache",
             lambda s: (s.adapter_cache or _NO_CACHE).loads),
            (CounterMetricFamily, "requests", "requests accepted", lambda s: s.num_requests),
            (CounterMetricFamily, "generated_tokens", "tokens generated", lambda s: s.generated_tokens),
        ):
            family = kind(f"{PREFIX}_replica_{name}", f"{doc}, by engine replica", labels=["replica"])
            for replica_id, stats in sorted(replicas.items()):
                family.add_metric([replica_id], value(stats))
            yield family

    def collect(self) -> Iterator[Any]:
        stats = self.current.stats
        if stats is None:
            return
        yield from self._gauges(stats, self.current.num_registered)
        yield from self._counters(stats.adapter_cache or _NO_CACHE)
        yield from self._prefix_counters(stats)
        if self.current.replicas:
            yield from self._replica_families(self.current.replicas)
        if self.current.adapters is not None:
            yield from _adapter_families(self.current.adapters)


class ServerMetrics:
    """The app's metric objects and its private registry."""

    def __init__(self, adapter_label_limit: int | None = None) -> None:
        """``adapter_label_limit``: adapter ids with their own label (``ADAPTER_LABEL_LIMIT``)."""
        if adapter_label_limit is None:
            adapter_label_limit = ADAPTER_LABEL_LIMIT  # read now: a test may lower it
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
        self.engine_collector = EngineCollector(adapter_label_limit)
        self.registry.register(self.engine_collector)

    def record_tokens(self, prompt: int, generated: int) -> None:
        self.prompt_tokens.inc(prompt)
        self.generated_tokens.inc(generated)

    def adapter_series(self, snapshot: Any) -> AdapterSeries:
        """The snapshot's per-adapter series under their bounded labels (the label choice is
        updated on every scrape, shown or not, so every scraper sees the same labels)."""
        cache = snapshot.stats.adapter_cache
        return self.engine_collector.labels.fold(
            snapshot.adapters, snapshot.resident,
            getattr(cache, "load_times", None) or {})

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
    scrape = ScrapeState(num_registered=len(registry) if registry is not None else 0)
    if engine is not None:
        snapshot = await engine.snapshot()
        scrape.stats = snapshot.stats
        scrape.replicas = {replica_id: part.stats for replica_id, part in snapshot.replicas.items()}
        series = state.metrics.adapter_series(snapshot)
        if state.config.metrics_adapter_labels == "open" or has_api_key(request):
            scrape.adapters = series
    return Response(state.metrics.render(scrape), media_type=CONTENT_TYPE_LATEST)
