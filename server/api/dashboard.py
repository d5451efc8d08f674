"""The capacity dashboard: the page, its static assets, ``/v1/capacity`` and the live state.

Mount with ``app.include_router(dashboard.router)``. The routes read ``app.state.engine``
(an ``EngineClient``, or None) and ``app.state.registry`` (an AdapterRegistry, or None).
"""

from __future__ import annotations

import dataclasses
import time
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from ...adapters.accounting import AdapterVariant
from ...adapters.config import AdapterConfigError, ProLoRAConfig
from ..engine.client import EngineClient, EngineSnapshot, ModelInfo
from ..engine.residency import AdapterCacheStats, ResidentAdapterInfo
from . import capacity
from .errors import APIError, error_response

STATIC = resources.files(__package__) / "static"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
               ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}

router = APIRouter(tags=["dashboard"])
router.include_router(capacity.router)


# --- the page -----------------------------------------------------------------------------
@router.get("/", include_in_schema=False)
def root() -> RedirectResponse:
    """A browser pointed at the server lands on the dashboard."""
    return RedirectResponse("/dashboard")


@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
def dashboard_page() -> HTMLResponse:
    return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"),
                        headers={"Cache-Control": "no-cache"})


def _static_names() -> set[str]:
    return {entry.name for entry in STATIC.iterdir()
            if entry.is_file() and any(entry.name.endswith(s) for s in MEDIA_TYPES)}


@router.get("/dashboard/static/{name}", include_in_schema=False)
def dashboard_asset(name: str) -> Response:
    # Only files that exist in the package's static folder: no path ever reaches the disk.
    if name not in _static_names():
        return error_response(APIError(404, f"no dashboard asset named {name!r}", code="not_found"))
    suffix = name[name.rfind("."):]
    return Response((STATIC / name).read_bytes(), media_type=MEDIA_TYPES[suffix],
                    headers={"Cache-Control": "no-cache"})


# --- live state ---------------------------------------------------------------------------
def config_label(config: dict[str, Any]) -> str:
    """``LoRA r=16`` / ``PRoLoRA r=32 u=4 m=n=7`` for an adapter_config dict."""
    try:
        parsed = ProLoRAConfig.from_json_dict(config)
        variant = AdapterVariant(parsed.r, parsed.unshared_r, parsed.reduce_lora_A_x, parsed.reduce_lora_B_x)
    except (AdapterConfigError, TypeError):
        return "unrecognized config"
    return variant.label


def _adapter_json(adapter_id: str, config: Any, num_params: int, nbytes: int) -> dict[str, Any]:
    config = dict(config)
    return {"id": adapter_id, "label": config_label(config), "config": config,
            "num_params": int(num_params), "nbytes": int(nbytes)}


COLD_LIMIT = 200  # cold adapters sent (the page shows 200 rows); num_cold counts them all


def _cold(registry: Any, resident_ids: set[str]) -> tuple[list[dict[str, Any]], int | None]:
    """The first ``COLD_LIMIT`` registered, not resident adapters (id order) and how many
    there are: a store of 10,000 adapters is one query of a page, not 10,000 entries."""
    if registry is None:
        return [], None
    records = registry.list(limit=COLD_LIMIT + len(resident_ids))
    cold = [_adapter_json(rec.adapter_id, rec.config, rec.num_params, rec.nbytes)
            for rec in records if rec.adapter_id not in resident_ids][:COLD_LIMIT]
    return cold, len(registry) - sum(1 for adapter_id in resident_ids if adapter_id in registry)


def _resident(resident: list[ResidentAdapterInfo]) -> list[dict[str, Any]]:
    entries = sorted(resident, key=lambda info: info.last_used, reverse=True)
    return [{**_adapter_json(info.adapter_id, info.config, info.num_params, info.nbytes),
             "last_used": float(info.last_used), "in_use": int(info.in_use)} for info in entries]


def _cache_json(cache: AdapterCacheStats | None) -> dict[str, Any] | None:
    if cache is None:  # an engine built without an adapter source
        return None
    hits, misses = cache.hits, cache.misses
    return {"budget_bytes": cache.budget_bytes, "used_bytes": cache.used_bytes,
            "hits": hits, "misses": misses, "loads": cache.loads, "evictions": cache.evictions,
            "hit_rate": hits / (hits + misses) if hits + misses else None}


def _pick(stats: dict[str, Any], *names: str) -> dict[str, Any]:
    return {name: stats[name] for name in names}


def _engine_json(model: ModelInfo, snapshot: EngineSnapshot) -> dict[str, Any]:
    stats = dataclasses.asdict(snapshot.stats)
    return {
        "model": model.name,
        "backends": dataclasses.asdict(model.backends),
        "base_model_bytes": stats["base_model_bytes"],
        "kv_cache": _pick(stats, "kv_cache_bytes", "kv_blocks_total", "kv_blocks_used",
                          "kv_blocks_cached"),
        "prefix_cache": {"hits": stats["prefix_cache_hits"],
                         "misses": stats["prefix_cache_queries"] - stats["prefix_cache_hits"]},
        "scheduler": _pick(stats, "num_waiting", "num_running", "last_batch_size", "last_batch_tokens"),
        "counters": _pick(stats, "num_requests", "num_finished", "num_aborted", "num_preemptions",
                          "num_steps", "prompt_tokens", "generated_tokens"),
        "adapter_cache": _cache_json(snapshot.stats.adapter_cache),
    }


def _replicas_json(snapshot: EngineSnapshot) -> list[dict[str, Any]]:
    """Each engine replica of a scale-out deployment (server/scaleout): its queue, KV cache,
    adapter cache and resident adapters (most recently used first). Empty in process."""
    replicas = []
    for replica_id, part in snapshot.replicas.items():
        stats = dataclasses.asdict(part.stats)
        resident = sorted(part.resident, key=lambda info: info.last_used, reverse=True)
        replicas.append({
            "id": replica_id,
            "scheduler": _pick(stats, "num_waiting", "num_running"),
            "kv_cache": _pick(stats, "kv_cache_bytes", "kv_blocks_total", "kv_blocks_used"),
            "adapter_cache": _cache_json(part.stats.adapter_cache),
            "counters": _pick(stats, "num_requests", "num_finished", "generated_tokens"),
            "resident": [info.adapter_id for info in resident],
        })
    return replicas


def _no_engine_json() -> dict[str, Any]:
    return {"model": None, "backends": None, "base_model_bytes": None, "kv_cache": None,
            "prefix_cache": None,
            "scheduler": None, "counters": None, "adapter_cache": None}


def dashboard_state(model: ModelInfo | None, snapshot: EngineSnapshot | None,
                    registry: Any) -> dict[str, Any]:
    """What is resident now, what is registered but cold (the first ``COLD_LIMIT``, and
    ``num_cold`` in all), and the engine's counters."""
    resident = _resident(snapshot.resident) if snapshot is not None else []
    resident_ids = {entry["id"] for entry in resident}
    cold, num_cold = _cold(registry, resident_ids)
    running = model is not None and snapshot is not None
    state = _engine_json(model, snapshot) if running else _no_engine_json()
    return {**state, "time": time.time(), "engine_running": running,
            "num_registered": len(registry) if registry is not None else None,
            "resident": resident, "cold": cold, "num_cold": num_cold,
            "replicas": _replicas_json(snapshot) if snapshot is not None else []}


@router.get("/v1/dashboard/state", summary="Live memory and adapter-cache state for the dashboard")
async def get_dashboard_state(request: Request) -> dict[str, Any]:
    state = request.app.state
    engine: EngineClient | None = state.engine
    if engine is None:
        return dashboard_state(None, None, state.registry)
    return dashboard_state(engine.model, await engine.snapshot(), state.registry)
