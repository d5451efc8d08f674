"""One ``EngineSnapshot`` for a set of replicas: the sums, with each replica's own kept.

Counters, queue lengths, KV blocks and bytes add up over replicas (two replicas hold two copies
of the base model and two KV caches); the adapter cache's stats add up field by field (its load
time histograms too); an adapter resident on several replicas is listed once, with its running
requests summed and its latest use. Fields are summed by type, so counters added to the engine
later are covered without a change here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ..engine.client import EngineSnapshot
from ..engine.residency import LoadTimes, ResidentAdapterInfo
from ..engine.scheduler import AdapterTraffic


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def merge_values(values: list[Any]) -> Any:
    """The sum of like values: numbers add, dataclasses and dicts add field by field / key by
    key (``LoadTimes`` buckets too), None stays None where every value is None; anything else
    is the first value."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    first = present[0]
    if _is_number(first):
        return sum(present)
    if isinstance(first, LoadTimes):
        merged = LoadTimes()
        for times in present:
            merged.count += times.count
            merged.sum_seconds += times.sum_seconds
            merged.bucket_counts = [a + b for a, b in zip(merged.bucket_counts, times.bucket_counts)]
        return merged
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        return dataclasses.replace(first, **{
            f.name: merge_values([getattr(v, f.name) for v in present])
            for f in dataclasses.fields(first) if f.init})
    if isinstance(first, dict):
        keys = list(dict.fromkeys(k for v in present for k in v))
        return {k: merge_values([v[k] for v in present if k in v]) for k in keys}
    return first


def _merge_resident(lists: list[list[ResidentAdapterInfo]]) -> list[ResidentAdapterInfo]:
    merged: dict[str, ResidentAdapterInfo] = {}
    for entries in lists:
        for info in entries:
            seen = merged.get(info.adapter_id)
            if seen is None:
                merged[info.adapter_id] = dataclasses.replace(info, config=dict(info.config))
            else:
                seen.in_use += info.in_use
                seen.last_used = max(seen.last_used, info.last_used)
    return list(merged.values())


def _merge_traffic(maps: list[dict[str | None, AdapterTraffic]]) -> dict[str | None, AdapterTraffic]:
    merged: dict[str | None, AdapterTraffic] = {}
    for traffic in maps:
        for adapter_id, entry in traffic.items():
            total = merged.setdefault(adapter_id, AdapterTraffic())
            for f in dataclasses.fields(AdapterTraffic):
                setattr(total, f.name, getattr(total, f.name) + getattr(entry, f.name))
    return merged


def merge_snapshots(snapshots: Mapping[str, EngineSnapshot]) -> EngineSnapshot:
    """The deployment as one engine; ``replicas`` holds the parts (at least one)."""
    if not snapshots:
        raise ValueError("no replica snapshot to merge")
    parts = list(snapshots.values())
    return EngineSnapshot(stats=merge_values([s.stats for s in parts]),
                          resident=_merge_resident([s.resident for s in parts]),
                          adapters=_merge_traffic([s.adapters for s in parts]),
                          replicas=dict(snapshots))
