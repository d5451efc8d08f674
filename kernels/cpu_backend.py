"""The CPU fast path: one fused C++ call (cpu_gathered.cpp) per adapted module serves every row
of the step, whatever adapter (or none) each row uses.

The kernel reads the pool's own tensors by address through a per-module slot table (one row of
addresses and dims per resident adapter, rebuilt only when the pool changes), so a step copies
no adapter weights and needs no per-step plan: the row -> slot map of the batch is the plan.
Weights may be resident in float32, bfloat16 or float16 (converted in registers); activations
are float32. Semantics are those of torch_backend.py; the float64 reference checks both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..adapters.weights import CompactLinearWeights
from .cpu_extension import ELEMENT_TYPE_CODES, load_extension
from .metadata import AdapterBatch
from .pool import AdapterWeightPool

TABLE_FIELDS = ("present", "A0", "B0t", "Au", "But", "R", "u", "m", "n", "cA", "cB", "sA", "sB")
_TABLES_KEY = "cpu_slot_tables"


@dataclass(frozen=True)
class SlotTable:
    """Where the kernel finds each resident adapter's weights for one module."""

    entries: torch.Tensor  # (S, len(TABLE_FIELDS)) int64: present flag, 4 addresses, 8 dims
    scales: torch.Tensor  # (S,) float32: alpha / r of each slot (0 where absent)


def table_entry(weights: CompactLinearWeights) -> list[int]:
    """The kernel's view of one adapter's module: addresses of A0, B0^T, Au, Bu^T and the dims."""
    spec = weights.spec
    parts = (weights.A0, weights.B0.T, weights.Au, weights.Bu.T)
    if not all(t.is_contiguous() for t in parts):
        raise ValueError("the cpu kernel reads A0, B0^T, Au and Bu^T contiguous (pool layout)")
    return [1, *(t.data_ptr() for t in parts), spec.shared_r, spec.unshared_r, spec.reduce_a,
            spec.reduce_b, spec.chunk_a, spec.chunk_b, spec.stride_a, spec.stride_b]


_ABSENT = [0] * len(TABLE_FIELDS)
RowOf = Callable[[int, CompactLinearWeights], list[int]]


def build_slot_table(weights: dict[int, CompactLinearWeights], row_of: RowOf | None = None) -> SlotTable:
    """Slot -> table row for every adapter resident for a module (pure, apart from addresses).
    ``row_of(slot, weights)``: the row, possibly kept from before (default: ``table_entry``)."""
    size = max(weights) + 1
    table = [_ABSENT] * size
    scales = [0.0] * size
    for slot, w in weights.items():
        table[slot] = table_entry(w) if row_of is None else row_of(slot, w)
        scales[slot] = w.spec.scale
    return SlotTable(torch.tensor(table, dtype=torch.int64), torch.tensor(scales, dtype=torch.float32))


def slot_table(pool: AdapterWeightPool, module_path: str) -> SlotTable | None:
    """The module's table, kept until the pool next changes (it resets ``plan_cache``). A row
    depends on its slot alone, so rows are kept in ``pool.slot_cache``: loading one adapter
    makes only that adapter's rows, then one tensor per module."""
    tables: dict = pool.plan_cache.setdefault(_TABLES_KEY, {})
    if module_path not in tables:
        weights = pool.module(module_path)

        def kept_row(slot: int, w: CompactLinearWeights) -> list[int]:
            rows = pool.slot_cache.setdefault(slot, {}).setdefault(_TABLES_KEY, {})
            if module_path not in rows:
                rows[module_path] = table_entry(w)
            return rows[module_path]

        tables[module_path] = None if weights is None else build_slot_table(weights, kept_row)
    return tables[module_path]


class CpuBackend:
    name = "cpu"

    def __init__(self, portable_lanes: bool = False) -> None:
        self.kernel = load_extension(portable_lanes)  # compiled (or loaded) once, at selection
        if self.kernel.NUM_FIELDS != len(TABLE_FIELDS):
            raise RuntimeError(f"stale kernel build: {self.kernel.NUM_FIELDS} table fields, "
                               f"expected {len(TABLE_FIELDS)}")

    def apply(self, y: torch.Tensor, x: torch.Tensor, pool: AdapterWeightPool, module_path: str,
              batch: AdapterBatch) -> None:
        code = ELEMENT_TYPE_CODES.get(pool.dtype)
        if code is None or pool.device.type != "cpu":
            raise TypeError(f"the cpu backend reads float32/bfloat16/float16 CPU pools, not {pool.dtype}")
        table = slot_table(pool, module_path)
        if table is None:
            return
        # The binding widens x to contiguous float32 and checks y (a contiguous float32 output).
        if y.dtype == torch.float32:
            self.kernel.gathered_apply(y, x, batch.row_slots, table.entries, table.scales, code)
            return
        # 16-bit activations (a bf16/fp16 base): the deltas are summed in float32, then added
        # to the 16-bit output once, as a float32 kernel would round them.
        delta = torch.zeros(y.shape, dtype=torch.float32)
        self.kernel.gathered_apply(delta, x, batch.row_slots, table.entries, table.scales, code)
        y.add_(delta)
