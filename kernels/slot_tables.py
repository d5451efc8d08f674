"""Where the slot-table kernels (the fused CPU kernel, the Triton shrink/expand) find each
resident adapter's weights: one table row per (module, slot), kept in step with the pool.

A row holds a present flag, the addresses of the slot's A0, B0^T, Au and Bu^T for the module
(the pool's own tensors, read in place) and the dims R, u, m, n, cA, cB, sA, sB; ``scales``
holds alpha / r. Every module's table lives in two tensors on the pool's device,
``entries`` (modules, capacity, NUM_FIELDS) int64 and ``scales`` (modules, capacity) float32,
and a module's table is a view of them. ``sync`` rewrites only the slots whose adapter changed
since it last ran (an install writes one slot's rows, an unload clears them), so a load costs
one adapter's rows whatever else is resident; the tensors are reallocated only to grow (a new
module path, a slot beyond the capacity, a rank beyond ``rank_capacity``; the rows move over in
one copy), which bumps ``layout_version``: a captured CUDA graph holds the old addresses and is
captured again then.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import torch

from ..adapters.config import LayerSpec
from ..adapters.weights import CompactAdapter, CompactLinearWeights, FlatAdapter, FlatLayout

if TYPE_CHECKING:  # the pool makes rows ahead through prepare_rows
    from .pool import AdapterWeightPool

TABLE_FIELDS = ("present", "A0", "B0t", "Au", "But", "R", "u", "m", "n", "cA", "cB", "sA", "sB")
NUM_FIELDS = len(TABLE_FIELDS)
MIN_SLOTS = 64  # table rows allocated at first (1.4 MB for 210 modules); doubled when a larger slot appears
MIN_RANK_CAPACITY = 16  # the Triton shrink's z width; doubled when a larger rank appears


def table_entry(weights: CompactLinearWeights) -> list[int]:
    """One module's row: the addresses of A0, B0^T, Au, Bu^T and the dims."""
    a0, b0, au, bu = weights.tensors()
    if not (a0.is_contiguous() and au.is_contiguous() and _transpose_is_contiguous(b0)
            and _transpose_is_contiguous(bu)):
        raise ValueError("slot-table kernels read A0, B0^T, Au and Bu^T contiguous (pool layout)")
    # a transpose starts where its tensor does: no transposed views are made
    return [1, a0.data_ptr(), b0.data_ptr(), au.data_ptr(), bu.data_ptr(), *_dims(weights.spec)]


@lru_cache(maxsize=1024)
def _dims(spec: LayerSpec) -> tuple[int, ...]:
    return (spec.shared_r, spec.unshared_r, spec.reduce_a, spec.reduce_b, spec.chunk_a,
            spec.chunk_b, spec.stride_a, spec.stride_b)


def _transpose_is_contiguous(tensor: torch.Tensor) -> bool:
    """``tensor.T.is_contiguous()`` without making the view."""
    return _is_column_major(tuple(tensor.shape), tensor.stride())


def _is_row_major(shape: tuple[int, int], strides: tuple[int, int]) -> bool:
    """Contiguous in row-major order (size-1 dims have any stride; empty tensors are)."""
    rows, cols = shape
    return not rows * cols or ((cols == 1 or strides[1] == 1) and (rows == 1 or strides[0] == cols))


def _is_column_major(shape: tuple[int, int], strides: tuple[int, int]) -> bool:
    rows, cols = shape
    return not rows * cols or ((cols == 1 or strides[1] == rows) and (rows == 1 or strides[0] == 1))


@dataclass(frozen=True)
class AdapterRows:
    """One resident adapter's table rows, whatever its slot: module paths in its order, their
    rows (modules, NUM_FIELDS) and scales (modules,)."""

    paths: tuple[str, ...]
    entries: torch.Tensor
    scales: torch.Tensor


_ADDRESS_FIELDS = slice(1, 5)  # A0, B0t, Au, But in TABLE_FIELDS


def adapter_rows(adapter: CompactAdapter) -> AdapterRows:
    """The rows of a laid-out adapter: for a ``FlatAdapter``, its layout's rows (cached, with
    byte offsets) moved to its allocation's address in two tensor ops; else row by row."""
    if isinstance(adapter, FlatAdapter):
        template = _layout_rows(adapter.layout, adapter.flat.element_size())
        entries = template.rows.entries.clone()
        entries[:, _ADDRESS_FIELDS] += template.nonempty * adapter.flat.data_ptr()
        return AdapterRows(template.rows.paths, entries, template.rows.scales)
    return AdapterRows(tuple(adapter.modules),
                       torch.tensor([table_entry(w) for w in adapter.modules.values()], dtype=torch.int64),
                       torch.tensor([w.spec.scale for w in adapter.modules.values()], dtype=torch.float32))


@dataclass(frozen=True)
class _RowTemplate:
    """A layout's rows at address 0 (byte offsets), and which addresses move with the
    allocation: an empty tensor's address is 0 (``data_ptr`` says so), wherever it lies."""

    rows: AdapterRows
    nonempty: torch.Tensor  # (modules, 4) int64, 1 where the tensor has elements


@lru_cache(maxsize=64)
def _layout_rows(layout: FlatLayout, itemsize: int) -> _RowTemplate:
    """``table_entry`` of every module of an adapter laid out as ``layout``, at address 0."""
    entries, nonempty = [], []
    for index, (_, spec) in enumerate(layout.modules):
        places = layout.places[4 * index:4 * index + 4]
        if not (all(_is_row_major(shape, strides) for shape, strides, _ in places[::2])
                and all(_is_column_major(shape, strides) for shape, strides, _ in places[1::2])):
            raise ValueError("slot-table kernels read A0, B0^T, Au and Bu^T contiguous (pool layout)")
        present = [int(rows * cols > 0) for (rows, cols), _, _ in places]
        entries.append([1, *(at * itemsize * keep for (_, _, at), keep in zip(places, present)),
                        *_dims(spec)])
        nonempty.append(present)
    rows = AdapterRows(tuple(path for path, _ in layout.modules),
                       torch.tensor(entries, dtype=torch.int64).reshape(-1, NUM_FIELDS),
                       torch.tensor([spec.scale for _, spec in layout.modules], dtype=torch.float32))
    return _RowTemplate(rows, torch.tensor(nonempty, dtype=torch.int64).reshape(-1, 4))


# Rows made ahead for adapters not yet installed (weakly: a dropped adapter takes its rows).
_prepared: weakref.WeakKeyDictionary[CompactAdapter, AdapterRows] = weakref.WeakKeyDictionary()
_prepared_lock = threading.Lock()


def prepare_rows(adapter: CompactAdapter) -> None:
    """Make the table rows of an adapter laid out in place for a CPU pool, on the thread that
    laid it out (the loader): 210 rows take 1-3 ms here, which the step thread's install
    then saves."""
    rows = adapter_rows(adapter)
    with _prepared_lock:
        _prepared[adapter] = rows


def _rows_for(adapter: CompactAdapter) -> AdapterRows:
    with _prepared_lock:
        rows = _prepared.get(adapter)
    return rows if rows is not None else adapter_rows(adapter)


@dataclass(frozen=True)
class TargetedModules:
    """What one fused call over some module paths reads: the positions (in those paths) of the
    modules some resident adapter targets, and their tables, in that order."""

    positions: tuple[int, ...]
    entries: list[torch.Tensor]
    scales: list[torch.Tensor]


def _at_least_pow2(value: int, floor: int) -> int:
    return max(floor, 1 << max(value - 1, 0).bit_length())


class SlotTables:
    def __init__(self, pool: AdapterWeightPool, module_paths: tuple[str, ...] | list[str] = ()) -> None:
        self.pool = pool
        self.index: dict[str, int] = {}
        self.capacity = MIN_SLOTS
        self.rank_capacity = MIN_RANK_CAPACITY
        self.layout_version = 0
        self.synced_version: int | None = None
        self._written: dict[int, CompactAdapter] = {}  # slot -> the adapter its rows describe
        self._views: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._targeted: dict[tuple[str, ...], TargetedModules] = {}  # until the pool changes
        self.entries = torch.zeros(0, 0, NUM_FIELDS, dtype=torch.int64, device=pool.device)
        self.scales = torch.zeros(0, 0, dtype=torch.float32, device=pool.device)
        self._grow(list(module_paths), self.capacity, self.rank_capacity)

    def _grow(self, new_paths: list[str], capacity: int, rank_capacity: int) -> None:
        """New tensors holding the old rows (one copy each, whatever is resident)."""
        for path in new_paths:
            self.index.setdefault(path, len(self.index))
        old_entries, old_scales = self.entries, self.scales
        self.capacity, self.rank_capacity = capacity, rank_capacity
        device = self.pool.device
        self.entries = torch.zeros(len(self.index), capacity, NUM_FIELDS, dtype=torch.int64, device=device)
        self.scales = torch.zeros(len(self.index), capacity, dtype=torch.float32, device=device)
        modules, slots = old_scales.shape
        self.entries[:modules, :slots] = old_entries
        self.scales[:modules, :slots] = old_scales
        self._views = {path: (self.entries[i], self.scales[i]) for path, i in self.index.items()}
        self.layout_version += 1

    def sync(self, extra_path: str | None = None) -> None:
        """Bring the tables up to the pool: cheap when nothing changed."""
        new_paths = [extra_path] if extra_path is not None and extra_path not in self.index else []
        version = self.pool.version
        if not new_paths and self.synced_version == version:
            return
        resident = self.pool.resident()
        changed = {slot: a for slot, a in resident.items() if self._written.get(slot) is not a}
        new_paths += sorted({p for a in changed.values() for p in a.modules} - set(self.index) - set(new_paths))
        capacity = _at_least_pow2(max(resident, default=-1) + 1, self.capacity)
        top_rank = max((w.spec.r for a in changed.values() for w in a.modules.values()), default=0)
        rank_capacity = _at_least_pow2(top_rank, self.rank_capacity)
        if new_paths or capacity != self.capacity or rank_capacity != self.rank_capacity:
            self._grow(new_paths, capacity, rank_capacity)
        for slot in [s for s in self._written if s not in resident or s in changed]:
            self.entries[:, slot] = 0
            self.scales[:, slot] = 0
            del self._written[slot]
        for slot, adapter in changed.items():
            self._write(slot, adapter)
        self._targeted.clear()  # which paths are targeted may have changed
        self.synced_version = version

    def _write(self, slot: int, adapter: CompactAdapter) -> None:
        """The slot's rows for every module its adapter targets, in one copy per tensor."""
        rows = _rows_for(adapter)
        device = self.entries.device
        modules = torch.tensor([self.index[p] for p in rows.paths], dtype=torch.int64, device=device)
        self.entries[modules, slot] = rows.entries.to(device)
        self.scales[modules, slot] = rows.scales.to(device)
        self._written[slot] = adapter

    def targeted(self, paths: tuple[str, ...]) -> TargetedModules:
        """The modules of ``paths`` that some resident adapter targets, with their synced tables.
        Cached per tuple until the pool changes: a step's 120 fused calls then make no lookups."""
        self.sync()  # cheap when nothing changed; after it every resident adapter's paths are indexed
        found = self._targeted.get(paths)
        if found is None:
            positions = tuple(i for i, path in enumerate(paths) if self.pool.module(path) is not None)
            found = self._targeted[paths] = TargetedModules(
                positions, [self._views[paths[i]][0] for i in positions],
                [self._views[paths[i]][1] for i in positions])
        return found

    def module(self, path: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The module's (entries (capacity, NUM_FIELDS), scales (capacity,)), synced."""
        self.sync(path)
        return self._views[path]

    def rebuilt(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables built from scratch from the pool as it is now (host tensors): what
        ``entries`` and ``scales`` must equal after ``sync``."""
        entries = torch.zeros(self.entries.shape, dtype=torch.int64)
        scales = torch.zeros(self.scales.shape, dtype=torch.float32)
        for path, module in self.index.items():
            for slot, weights in (self.pool.module(path) or {}).items():
                entries[module, slot] = torch.tensor(table_entry(weights), dtype=torch.int64)
                scales[module, slot] = weights.spec.scale
        return entries, scales


class TablesPerPool:
    """One ``SlotTables`` per pool, made on first use: what a backend keeps for every pool it
    is handed (weakly: a dropped pool takes its tables with it)."""

    def __init__(self) -> None:
        self._tables: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def of(self, pool: AdapterWeightPool, module_paths: tuple[str, ...] | list[str] = ()) -> SlotTables:
        tables = self._tables.get(pool)
        if tables is None:
            tables = self._tables[pool] = SlotTables(pool, module_paths)
        return tables
