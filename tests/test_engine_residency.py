"""Adapter residency: LRU eviction, refcounts, the byte budget, forget, counters, errors."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from prolora_serve.adapters.config import ProLoRAConfig
from prolora_serve.adapters.weights import CompactAdapter
from prolora_serve.kernels import AdapterWeightPool
from prolora_serve.adapters.registry import AdapterNotFoundError
from prolora_serve.server.engine.errors import AdapterTooLargeError
from prolora_serve.server.engine.residency import AdapterCache

SHAPES = {f"model.layers.{i}.self_attn.{p}": (24, 40) for i in range(2) for p in ("q_proj", "v_proj")}


def make_adapter(seed: int, r: int = 4) -> CompactAdapter:
    config = ProLoRAConfig(r=r, unshared_r=1, reduce_lora_A_x=3, reduce_lora_B_x=2, lora_alpha=8,
                           target_modules=("q_proj", "v_proj"))
    return CompactAdapter.random(config, SHAPES, torch.Generator().manual_seed(seed))


class FakeSource:
    """An in-memory AdapterSource; ``gate`` (when set) holds every load until released."""

    def __init__(self, adapters: dict[str, CompactAdapter]) -> None:
        self.adapters = dict(adapters)
        self.gate: threading.Event | None = None
        self.reads = 0

    def has_adapter(self, adapter_id: str) -> bool:
        return adapter_id in self.adapters

    def load_adapter(self, adapter_id: str) -> CompactAdapter:
        if self.gate is not None:
            assert self.gate.wait(10)
        self.reads += 1
        if adapter_id not in self.adapters:
            raise AdapterNotFoundError(f"adapter {adapter_id!r} is not registered")
        return self.adapters[adapter_id]


def adapter_bytes(adapter: CompactAdapter) -> int:
    return adapter.num_params * 4  # the pool is float32


def make_cache(ids: list[str], fits: int) -> tuple[AdapterCache, FakeSource]:
    source = FakeSource({a: make_adapter(i) for i, a in enumerate(ids)})
    budget = fits * adapter_bytes(source.adapters[ids[0]])
    return AdapterCache(AdapterWeightPool("cpu", torch.float32), budget, source), source


def acquire_now(cache: AdapterCache, adapter_id: str) -> int | None:
    """Acquire, waiting for the background read if the first attempt started one."""
    slot = cache.acquire(adapter_id)
    if slot is None:
        cache.prepare(adapter_id).result(timeout=10)
        slot = cache.acquire(adapter_id, first_lookup=False)
    return slot


def resident_ids(cache: AdapterCache) -> set[str]:
    return {info.adapter_id for info in cache.resident()}


def test_miss_loads_in_the_background_then_hits() -> None:
    cache, source = make_cache(["a"], fits=2)
    source.gate = threading.Event()
    assert cache.acquire("a") is None  # the read is blocked: acquire must not wait for it
    assert cache.acquire("a", first_lookup=False) is None
    source.gate.set()
    cache.prepare("a").result(timeout=10)
    slot = cache.acquire("a", first_lookup=False)
    assert slot == 0 and cache.acquire("a") == 0
    assert (cache.hits, cache.misses, cache.loads, cache.evictions) == (1, 1, 1, 0)
    assert source.reads == 1
    info = cache.resident()[0]
    assert info.in_use == 2 and info.num_params == source.adapters["a"].num_params
    assert info.nbytes == cache.pool.slot_nbytes(0) == adapter_bytes(source.adapters["a"])
    assert info.config["r"] == 4


def test_lru_evicts_the_least_recently_used_idle_adapter() -> None:
    cache, _ = make_cache(["a", "b", "c", "d"], fits=3)
    for adapter_id in ("a", "b", "c"):
        cache.release(acquire_now(cache, adapter_id))
    cache.release(acquire_now(cache, "a"))  # a is now the most recent; b the least
    cache.release(acquire_now(cache, "d"))
    assert resident_ids(cache) == {"a", "c", "d"}
    cache.release(acquire_now(cache, "b"))
    assert resident_ids(cache) == {"a", "d", "b"}
    assert cache.evictions == 2 and cache.loads == 5


def test_adapters_in_use_are_never_evicted_and_requests_wait() -> None:
    cache, _ = make_cache(["a", "b", "c", "d"], fits=3)
    slots = {a: acquire_now(cache, a) for a in ("a", "b", "c")}
    assert acquire_now(cache, "d") is None  # loaded, but no idle adapter to evict
    assert resident_ids(cache) == {"a", "b", "c"} and cache.evictions == 0
    cache.release(slots["b"])
    slot_d = cache.acquire("d", first_lookup=False)  # read once, kept staged meanwhile
    assert slot_d == slots["b"]  # the freed slot is reused
    assert resident_ids(cache) == {"a", "c", "d"} and cache.evictions == 1


def test_budget_is_never_exceeded_under_random_traffic() -> None:
    ids = [f"ad{i}" for i in range(8)]
    source = FakeSource({a: make_adapter(i, r=2 + i % 4) for i, a in enumerate(ids)})
    budget = int(2.5 * max(adapter_bytes(a) for a in source.adapters.values()))
    cache = AdapterCache(AdapterWeightPool("cpu", torch.float32), budget, source)
    rng = random.Random(0)
    held: list[tuple[str, int]] = []
    for _ in range(300):
        if held and (rng.random() < 0.5 or len(held) > 3):
            cache.release(held.pop(rng.randrange(len(held)))[1])
        else:
            adapter_id = rng.choice(ids)
            slot = acquire_now(cache, adapter_id)
            if slot is not None:
                held.append((adapter_id, slot))
        assert cache.used_bytes <= budget
        assert cache.used_bytes == cache.pool.nbytes
        in_use = {a for a, _ in held}
        assert in_use <= resident_ids(cache)
        assert sum(i.in_use for i in cache.resident()) == len(held)
    assert cache.evictions > 0


def test_forget_while_in_use_frees_after_the_last_release() -> None:
    cache, source = make_cache(["a", "b"], fits=2)
    slot = acquire_now(cache, "a")
    cache.forget("a")
    del source.adapters["a"]
    assert "a" in resident_ids(cache) and slot in cache.pool.slots  # still serving
    assert cache.acquire("a") is None  # a fresh lookup does not reuse the retired copy
    with pytest.raises(AdapterNotFoundError):
        cache.prepare("a").result(timeout=10)
    with pytest.raises(AdapterNotFoundError):
        cache.acquire("a", first_lookup=False)
    cache.release(slot)
    assert "a" not in resident_ids(cache) and cache.used_bytes == 0 and not cache.pool.slots


def test_forget_idle_adapter_is_freed_by_collect_and_reupload_loads_new_weights() -> None:
    cache, source = make_cache(["a"], fits=2)
    cache.release(acquire_now(cache, "a"))
    cache.forget("a")
    assert cache.needs_collect and "a" not in resident_ids(cache)
    cache.collect()
    assert cache.used_bytes == 0 and not cache.pool.slots
    source.adapters["a"] = make_adapter(99)
    slot = acquire_now(cache, "a")
    loaded = cache.pool.module(next(iter(SHAPES)))[slot]
    assert torch.equal(loaded.A0, source.adapters["a"].modules[next(iter(SHAPES))].A0)


def test_adapter_larger_than_the_whole_budget_is_rejected() -> None:
    cache, source = make_cache(["a"], fits=1)
    source.adapters["big"] = make_adapter(5, r=8)
    with pytest.raises(AdapterTooLargeError, match="budget"):
        cache.prepare("big").result(timeout=10)
    with pytest.raises(AdapterTooLargeError):
        cache.acquire("big", first_lookup=False)
    assert cache.used_bytes == 0


def test_unknown_adapter_error_reaches_the_caller() -> None:
    cache, _ = make_cache(["a"], fits=1)
    assert cache.acquire("missing") is None
    with pytest.raises(AdapterNotFoundError):
        cache.prepare("missing").result(timeout=10)
    with pytest.raises(AdapterNotFoundError):
        cache.acquire("missing", first_lookup=False)
    stats = cache.stats()
    assert stats.misses == 1 and stats.loads == 0 and stats.num_resident == 0


def test_release_without_acquire_is_a_bug() -> None:
    cache, _ = make_cache(["a"], fits=1)
    slot = acquire_now(cache, "a")
    cache.release(slot)
    with pytest.raises(RuntimeError):
        cache.release(slot)


def test_reads_waiting_for_room_are_staged_within_the_budget() -> None:
    ids = [f"ad{i}" for i in range(6)]
    cache, source = make_cache(ids, fits=2)
    for adapter_id in ids:
        cache.prepare(adapter_id).result(timeout=10)
    one = adapter_bytes(source.adapters["ad0"])
    assert cache.stats().staged_bytes == 2 * one and cache.stats().num_loading == 0
    reads = source.reads
    assert acquire_now(cache, "ad5") is not None and source.reads == reads  # still staged
    assert acquire_now(cache, "ad0") is not None and source.reads == reads + 1  # read again
    assert cache.used_bytes == 2 * one


def test_an_evicted_adapter_comes_back_from_the_host_tier_without_a_disk_read() -> None:
    source = FakeSource({a: make_adapter(i) for i, a in enumerate("abc")})
    one = adapter_bytes(source.adapters["a"])
    pool = AdapterWeightPool("cpu", torch.float32)
    cache = AdapterCache(pool, one, source, host_budget_bytes=2 * one)  # one on the device, two kept
    for adapter_id in "ab":
        cache.release(acquire_now(cache, adapter_id))  # b evicts a: a stays on the host
    assert source.reads == 2 and resident_ids(cache) == {"b"} and cache.stats().staged_bytes == one
    slot = cache.acquire("a")  # no read, no wait: installed at once from the host tier
    assert slot is not None and source.reads == 2 and cache.stats().host_hits == 1
    got = pool.module("model.layers.0.self_attn.q_proj")[slot]
    assert torch.equal(got.A0, source.adapters["a"].modules["model.layers.0.self_attn.q_proj"].A0)
    cache.release(slot)
    cache.forget("b")  # deleted: its host copy goes too, a re-upload is read afresh
    source.adapters["b"] = make_adapter(7)
    cache.collect()
    cache.release(acquire_now(cache, "b"))
    assert source.reads == 3
    assert torch.equal(pool.module("model.layers.0.self_attn.q_proj")[cache.acquire("b")].A0,
                       make_adapter(7).modules["model.layers.0.self_attn.q_proj"].A0)


def test_a_zero_host_budget_reads_evicted_adapters_again() -> None:
    source = FakeSource({a: make_adapter(i) for i, a in enumerate("ab")})
    one = adapter_bytes(source.adapters["a"])
    cache = AdapterCache(AdapterWeightPool("cpu", torch.float32), one, source, host_budget_bytes=0)
    for adapter_id in "aba":
        cache.release(acquire_now(cache, adapter_id))
    assert source.reads == 3 and cache.stats().host_hits == 0


def test_prepared_identity_is_the_weights_digest_not_the_id() -> None:
    source = FakeSource({"same": make_adapter(1), "twin": make_adapter(1), "other": make_adapter(2),
                         "rounded": make_adapter(1).to(dtype=torch.float16)})
    cache = AdapterCache(AdapterWeightPool("cpu", torch.float32), 1 << 20, source)
    identity = {a: cache.identity(acquire_now(cache, a)) for a in source.adapters}
    assert identity["same"] == identity["twin"] != identity["other"]
    assert identity["same"] != identity["rounded"]  # other stored bytes


def test_a_failed_read_is_not_reused_by_a_later_prepare() -> None:
    """A request on an id before its upload fails (404); once it is uploaded, the next request
    reads it again instead of getting the old failure (scale-out: a replica asked about a
    deleted id, then the id uploaded again)."""
    cache, source = make_cache(["a"], fits=2)
    with pytest.raises(AdapterNotFoundError):
        cache.prepare("late").result(timeout=10)
    source.adapters["late"] = make_adapter(5)
    assert cache.prepare("late").result(timeout=10) == adapter_bytes(source.adapters["late"])
    assert acquire_now(cache, "late") is not None
