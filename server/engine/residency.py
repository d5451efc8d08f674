"""Which adapters are resident on the device: slots, a byte budget with LRU eviction, refcounts.

Reading an adapter from disk happens on one background loader thread, so a miss never stalls
the step loop: the scheduler asks ``acquire`` every step and admits the request once the
weights have arrived and there is room. Every change to the device pool (``pool.load`` /
``pool.unload``) happens on the step thread, between forwards, so a forward never sees the
pool change under it. Other threads (the API) only ``prepare``, ``forget`` and read stats.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from ...adapters.weights import CompactAdapter
from ...kernels import AdapterWeightPool
from ...kernels.pool import resident_identity
from .errors import AdapterTooLargeError
from .threads import confine_this_thread


class AdapterSource(Protocol):
    """Where adapters come from (the on-disk registry implements it)."""

    def load_adapter(self, adapter_id: str) -> CompactAdapter:
        """The adapter's compact weights on the CPU; raises AdapterNotFoundError."""

    def has_adapter(self, adapter_id: str) -> bool: ...


@dataclass
class ResidentAdapterInfo:
    adapter_id: str
    nbytes: int
    num_params: int
    last_used: float  # unix time
    in_use: int  # running requests holding it
    config: dict[str, Any]


# Upper bounds (seconds) of the load-time histogram buckets; the last bucket is +Inf.
LOAD_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                        10.0, 30.0)


@dataclass
class LoadTimes:
    """One adapter's cold loads: seconds to read it from the source plus to copy it into the
    pool (a wait for room in between is not counted), as a histogram."""

    count: int = 0
    sum_seconds: float = 0.0
    bucket_counts: list[int] = field(  # per LOAD_SECONDS_BUCKETS bound, then +Inf; not cumulative
        default_factory=lambda: [0] * (len(LOAD_SECONDS_BUCKETS) + 1))

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.sum_seconds += seconds
        self.bucket_counts[next((i for i, bound in enumerate(LOAD_SECONDS_BUCKETS)
                                 if seconds <= bound), len(LOAD_SECONDS_BUCKETS))] += 1

    def copy(self) -> "LoadTimes":
        return LoadTimes(self.count, self.sum_seconds, list(self.bucket_counts))


@dataclass
class AdapterCacheStats:
    budget_bytes: int
    used_bytes: int
    num_resident: int
    num_loading: int
    hits: int
    misses: int
    loads: int
    evictions: int
    staged_bytes: int = 0  # the host tier: read from disk or evicted, ready to install
    host_hits: int = 0  # installs served from the host tier (no disk read)
    load_times: dict[str, LoadTimes] = field(default_factory=dict)  # by adapter id


@dataclass(eq=False)
class _Prepared:
    """An adapter ready to install: validated, in the pool's layout and dtype (host memory),
    with its identity; what the host tier keeps."""

    adapter: CompactAdapter
    identity: bytes
    nbytes: int
    kept: bool = False  # kept on the host after an eviction (not a fresh read)


@dataclass(eq=False)
class _Resident:
    adapter_id: str
    slot: int
    nbytes: int
    num_params: int
    config: dict[str, Any]
    identity: bytes  # pool.resident_identity: what prefix-cached KV blocks are keyed by
    refcount: int = 0
    last_used: float = field(default_factory=time.time)
    retired: bool = False  # forgotten: freed as soon as nobody uses it


class AdapterCache:
    def __init__(self, pool: AdapterWeightPool, budget_bytes: int, source: AdapterSource,
                 on_loaded: Callable[[], None] | None = None,
                 host_budget_bytes: int | None = None) -> None:
        """``host_budget_bytes``: the host tier, adapters read or evicted kept ready on the host
        (default: as much as the device budget)."""
        if budget_bytes < 0:
            raise ValueError(f"adapter budget must be >= 0 bytes, got {budget_bytes}")
        self.pool = pool
        self.budget_bytes = int(budget_bytes)
        self.host_budget_bytes = int(budget_bytes if host_budget_bytes is None else host_budget_bytes)
        self.source = source
        self.on_loaded = on_loaded  # called on the loader thread when a read ends (wakes the engine)
        self.hits = self.misses = self.loads = self.evictions = 0
        self._lru: OrderedDict[str, _Resident] = OrderedDict()  # live entries, least recent first
        self._by_slot: dict[int, _Resident] = {}  # live and retired entries
        self._loading: dict[str, Future[_Prepared]] = {}
        # the host tier: read from disk or evicted from the device, ready to install (LRU)
        self._staged: OrderedDict[str, _Prepared] = OrderedDict()
        self.host_hits = 0  # installs served from the host tier instead of the disk
        self._read_seconds: dict[str, float] = {}  # the last read of each adapter not yet installed
        self._load_times: dict[str, LoadTimes] = {}
        self._lock = threading.RLock()
        # confined: its tensor work must not start a second OpenMP team (threads.py)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="adapter-loader",
                                            initializer=confine_this_thread)
        self._element_size = torch.empty((), dtype=pool.dtype).element_size()

    # --- sizes -------------------------------------------------------------------------
    def resident_nbytes(self, adapter: CompactAdapter) -> int:
        """Bytes the adapter takes in the pool: its compact parameters at the pool dtype."""
        return adapter.num_params * self._element_size

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._by_slot.values())

    # --- loading (background) -----------------------------------------------------------
    def _start_load(self, adapter_id: str) -> Future[_Prepared]:
        future = self._loading.get(adapter_id)
        if future is None:
            future = self._executor.submit(self._read, adapter_id)
            self._loading[adapter_id] = future
            future.add_done_callback(lambda done: self._loaded(adapter_id, done))
        return future

    def _loaded(self, adapter_id: str, future: Future[_Prepared]) -> None:
        """On the loader thread: move read weights to the bounded staging area (failed reads
        stay as futures, so the next ``acquire`` raises their error), then wake the engine."""
        with self._lock:
            ok = not future.cancelled() and future.exception() is None
            if ok and self._loading.get(adapter_id) is future:
                del self._loading[adapter_id]
                self._stage(adapter_id, future.result())
        if self.on_loaded is not None:
            self.on_loaded()

    def _read(self, adapter_id: str) -> _Prepared:
        """On the loader thread: read, check, lay out for the pool and hash the adapter, so the
        step thread only installs it."""
        started = time.perf_counter()
        adapter = self.source.load_adapter(adapter_id)
        self.pool.check_representable(adapter)
        laid_out = self.pool.layout(adapter)
        prepared = _Prepared(laid_out, resident_identity(laid_out), self.resident_nbytes(adapter))
        with self._lock:
            self._read_seconds[adapter_id] = time.perf_counter() - started
        return prepared

    def prepare(self, adapter_id: str) -> Future[int]:
        """Start reading the adapter in the background; the future gives its resident bytes
        or raises AdapterNotFoundError / AdapterTooLargeError / a format error."""
        result: Future[int] = Future()
        with self._lock:
            entry = self._lru.get(adapter_id)
            if entry is not None:
                result.set_result(entry.nbytes)
                return result
            staged = self._staged.get(adapter_id)
            if staged is None:
                self._forget_failed_read(adapter_id)
            load = self._start_load(adapter_id) if staged is None else None
        if staged is not None:
            self._settle(result, adapter_id, staged, None)
        else:
            load.add_done_callback(lambda f: self._settle(result, adapter_id, None, f))
        return result

    def _forget_failed_read(self, adapter_id: str) -> None:
        """A new request reads again after a failed read: the id may have been uploaded since
        (a request on it before its upload must not keep it unknown)."""
        future = self._loading.get(adapter_id)
        if future is not None and future.done() and (future.cancelled() or future.exception() is not None):
            del self._loading[adapter_id]

    def _settle(self, result: Future[int], adapter_id: str, prepared: _Prepared | None,
                load: Future[_Prepared] | None) -> None:
        try:
            prepared = prepared if load is None else load.result()
            result.set_result(self._check_fits(adapter_id, prepared))
        except BaseException as err:  # noqa: BLE001 - handed to the waiting caller
            result.set_exception(err)

    def _check_fits(self, adapter_id: str, prepared: _Prepared) -> int:
        nbytes = prepared.nbytes
        if nbytes > self.budget_bytes:
            raise AdapterTooLargeError(
                f"adapter {adapter_id!r} needs {nbytes} bytes, more than the whole adapter "
                f"cache budget of {self.budget_bytes} bytes")
        return nbytes

    def _take_loaded(self, adapter_id: str) -> _Prepared | None:
        """The prepared adapter if read already (or kept on the host); raises the load's error
        if it failed."""
        staged = self._staged.pop(adapter_id, None)
        if staged is not None:
            return staged
        future = self._loading.get(adapter_id)
        if future is None or not future.done():
            return None
        del self._loading[adapter_id]
        return future.result()

    def _stage(self, adapter_id: str, prepared: _Prepared) -> None:
        """Keep a prepared adapter on the host, within the host budget (LRU: the oldest is
        read from disk again when its turn comes)."""
        self._staged[adapter_id] = prepared
        self._staged.move_to_end(adapter_id)
        while len(self._staged) > 1 and self.staged_bytes > self.host_budget_bytes:
            self._staged.popitem(last=False)

    @property
    def staged_bytes(self) -> int:
        """The host tier: adapters read from disk or evicted, kept ready on the host."""
        with self._lock:
            return sum(p.nbytes for p in self._staged.values())

    # --- the step thread ----------------------------------------------------------------
    def acquire(self, adapter_id: str, first_lookup: bool = True) -> int | None:
        """The adapter's slot with a reference taken, or None while it is loading or while
        the budget is full of adapters in use (the caller retries next step)."""
        with self._lock:
            entry = self._lru.get(adapter_id)
            if entry is not None:
                self.hits += first_lookup
                return self._take_reference(entry)
            self.misses += first_lookup
            prepared = self._take_loaded(adapter_id)
            if prepared is None:
                self._start_load(adapter_id)
                return None
            slot = self._install(adapter_id, prepared)
            self.host_hits += prepared.kept and slot is not None
            return slot

    def _install(self, adapter_id: str, prepared: _Prepared) -> int | None:
        nbytes = self._check_fits(adapter_id, prepared)
        if not self._make_room(nbytes):
            self._stage(adapter_id, prepared)
            return None
        slot = self._free_slot()
        started = time.perf_counter()
        self.pool.install(slot, prepared.adapter)
        copy_seconds = time.perf_counter() - started
        self.loads += 1
        self._load_times.setdefault(adapter_id, LoadTimes()).observe(
            self._read_seconds.pop(adapter_id, 0.0) + copy_seconds)
        adapter = prepared.adapter
        entry = _Resident(adapter_id, slot, self.pool.slot_nbytes(slot), adapter.num_params,
                          adapter.config.to_json_dict(), prepared.identity)
        self._lru[adapter_id] = entry
        self._by_slot[slot] = entry
        return self._take_reference(entry)

    def identity(self, slot: int) -> bytes:
        """The digest of the weights in ``slot`` (prefix-cache blocks are keyed by it)."""
        with self._lock:
            return self._by_slot[slot].identity

    def _take_reference(self, entry: _Resident) -> int:
        entry.refcount += 1
        entry.last_used = time.time()
        self._lru.move_to_end(entry.adapter_id)
        return entry.slot

    def _free_slot(self) -> int:
        slot = 0
        while slot in self._by_slot:
            slot += 1
        return slot

    def _make_room(self, nbytes: int) -> bool:
        """Evict least recently used idle adapters until ``nbytes`` fit; evict nothing if
        they cannot fit even then."""
        used = sum(e.nbytes for e in self._by_slot.values())
        idle = [e for e in self._lru.values() if e.refcount == 0]
        if used + nbytes - sum(e.nbytes for e in idle) > self.budget_bytes:
            return False
        for victim in idle:
            if used + nbytes <= self.budget_bytes:
                break
            used -= victim.nbytes
            self._keep_on_host(victim)
            self._unload(victim)
            self.evictions += 1
        return True

    def _keep_on_host(self, entry: _Resident) -> None:
        """An evicted (not deleted) adapter stays ready on the host: no disk read next time."""
        if self.host_budget_bytes > 0:
            self._stage(entry.adapter_id, _Prepared(self.pool.host_layout(entry.slot),
                                                    entry.identity, entry.nbytes, kept=True))

    def _unload(self, entry: _Resident) -> None:
        self.pool.unload(entry.slot)
        del self._by_slot[entry.slot]
        if self._lru.get(entry.adapter_id) is entry:
            del self._lru[entry.adapter_id]

    def release(self, slot: int) -> None:
        """Drop one reference (a request finished, was aborted or preempted)."""
        with self._lock:
            entry = self._by_slot[slot]
            if entry.refcount <= 0:
                raise RuntimeError(f"adapter slot {slot} released more often than acquired")
            entry.refcount -= 1
            entry.last_used = time.time()
            if entry.retired and entry.refcount == 0:
                self._unload(entry)

    def collect(self) -> None:
        """Free forgotten adapters nobody uses any more (called by the step thread)."""
        with self._lock:
            for entry in [e for e in self._by_slot.values() if e.retired and e.refcount == 0]:
                self._unload(entry)

    # --- any thread -----------------------------------------------------------------------
    def forget(self, adapter_id: str) -> None:
        """The registry deleted it: requests using it finish, then its weights are freed; the
        id is free again (a re-upload loads the new weights)."""
        with self._lock:
            self._loading.pop(adapter_id, None)
            self._staged.pop(adapter_id, None)
            self._read_seconds.pop(adapter_id, None)
            self._load_times.pop(adapter_id, None)  # a re-upload under the id starts afresh
            entry = self._lru.pop(adapter_id, None)
            if entry is not None:
                entry.retired = True

    @property
    def needs_collect(self) -> bool:
        with self._lock:
            return any(e.retired and e.refcount == 0 for e in self._by_slot.values())

    def resident(self) -> list[ResidentAdapterInfo]:
        with self._lock:
            return [ResidentAdapterInfo(e.adapter_id, e.nbytes, e.num_params, e.last_used,
                                        e.refcount, dict(e.config))
                    for e in self._by_slot.values() if not (e.retired and e.refcount == 0)]

    def stats(self) -> AdapterCacheStats:
        with self._lock:
            return AdapterCacheStats(self.budget_bytes, self.used_bytes, len(self._by_slot),
                                     len(self._loading), self.hits, self.misses, self.loads,
                                     self.evictions, staged_bytes=self.staged_bytes,
                                     host_hits=self.host_hits,
                                     load_times={k: v.copy() for k, v in self._load_times.items()})

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
