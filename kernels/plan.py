"""Per-module kernel plans: which rows go through which compact weights, and how.

Rows of one adapter that are numerous (a prefill chunk, or one popular adapter) may form a
``Segment`` and use plain matmuls on that adapter's weights (backends that gain from BLAS on
many rows ask for this with ``segment_min_rows``). The remaining rows are grouped by shape
class (same h, o, r, u, m, n) into a ``GatheredGroup``: the weights of its distinct adapters
stacked once, and per row an index into that stack, so one batched call serves every adapter
(decode with distinct adapters). Classes keep their own exact shapes, so a large rank never
pads a small one.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..adapters.config import LayerSpec
from ..adapters.weights import CompactLinearWeights
from .metadata import AdapterBatch
from .pool import AdapterWeightPool

SEGMENT_MIN_ROWS = 8  # torch/triton: below this, a gathered row beats a per-adapter matmul
PLAN_CACHE_SIGNATURES = 4  # distinct step layouts whose plans are kept (prefill/decode alternate)
STACK_CACHE_ENTRIES = 4096  # (module, adapter set) weight stacks kept across changing layouts


@dataclass(frozen=True)
class RotationTables:
    """0/1 matrices that perform the gather-rotations of docs/prolora-math.md#compact-apply as tiny matmuls."""

    fold_a: torch.Tensor  # (m*R, R): z = Y.reshape(T, m*R) @ fold_a, z[k] = sum_i Y[i, (k+i*sA) % R]
    unfold_b: torch.Tensor  # (R, n*R): Z.reshape(T, n*R) = z @ unfold_b, Z[i, k] = z[(k-i*sB) % R]


@lru_cache(maxsize=256)
def rotation_tables(spec_key: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> RotationTables:
    _h, _o, r, u, m, n = spec_key
    shared = r - u
    stride_a, stride_b = max(shared // m, 1), max(shared // n, 1)
    fold = torch.zeros(m * shared, shared, dtype=dtype)
    unfold = torch.zeros(shared, n * shared, dtype=dtype)
    for k in range(shared):
        for i in range(m):
            fold[i * shared + (k + i * stride_a) % shared, k] = 1
        for i in range(n):
            unfold[(k - i * stride_b) % shared, i * shared + k] = 1
    return RotationTables(fold.to(device), unfold.to(device))


@dataclass(frozen=True)
class Segment:
    rows: torch.Tensor | None  # (N,) int64 row indices; None = every row of the step, in order
    weights: CompactLinearWeights
    tables: RotationTables


@dataclass(frozen=True)
class GatheredGroup:
    spec: LayerSpec  # shape class shared by the group (alpha is per adapter, in `scales`)
    rows: torch.Tensor | None  # (G,) int64 ascending; None = every row of the step, in order
    weight_index: torch.Tensor  # (G,) int64: the stacked adapter each row uses, in [0, S)
    A0: torch.Tensor  # (S, R, cA)
    B0t: torch.Tensor  # (S, R, cB): B0 transposed, so the expand reads contiguous output runs
    Au: torch.Tensor  # (S, u, h)
    But: torch.Tensor  # (S, u, o): Bu transposed, likewise
    scales: torch.Tensor  # (S, 1)
    tables: RotationTables


@dataclass(frozen=True)
class ModulePlan:
    segments: tuple[Segment, ...]
    groups: tuple[GatheredGroup, ...]


def _rows_or_all(rows: torch.Tensor, num_rows: int) -> torch.Tensor | None:
    return None if rows.numel() == num_rows else rows


def _stack(weights: list[CompactLinearWeights]) -> tuple[torch.Tensor, ...]:
    """A0, B0t, Au, But and scales of the group's distinct adapters, stacked once."""
    first = weights[0]
    scales = torch.tensor([[w.spec.scale] for w in weights], dtype=first.A0.dtype, device=first.A0.device)
    return (torch.stack([w.A0 for w in weights]), torch.stack([w.B0.T for w in weights]),
            torch.stack([w.Au for w in weights]), torch.stack([w.Bu.T for w in weights]), scales)


def _gathered_group(entries: list[tuple[int, int, CompactLinearWeights]], num_rows: int,
                    stack_cache: dict) -> GatheredGroup:
    """Rows (row, slot, weights) of one shape class. The stacks depend only on which adapters
    are present (ordered by slot), so steps that merely move rows around reuse them."""
    entries.sort()
    by_slot = {slot: w for _, slot, w in entries}
    slots = sorted(by_slot)
    weights = [by_slot[s] for s in slots]
    key = tuple(id(w) for w in weights)
    stacks = stack_cache.get(key)
    if stacks is None:
        stacks = stack_cache[key] = _stack(weights)
    device, position = weights[0].A0.device, {slot: i for i, slot in enumerate(slots)}
    rows = torch.tensor([row for row, _, _ in entries], dtype=torch.int64, device=device)
    index = torch.tensor([position[slot] for _, slot, _ in entries], dtype=torch.int64, device=device)
    tables = rotation_tables(weights[0].spec.shape_key, weights[0].A0.dtype, device)
    return GatheredGroup(weights[0].spec, _rows_or_all(rows, num_rows), index, *stacks, tables)


def build_module_plan(weights: dict[int, CompactLinearWeights], batch: AdapterBatch,
                      segment_min_rows: int = SEGMENT_MIN_ROWS, stack_cache: dict | None = None) -> ModulePlan:
    """Split the step's rows for one module into segments and gathered groups (pure function,
    apart from reusing weight stacks found in ``stack_cache``)."""
    stack_cache = {} if stack_cache is None else stack_cache
    segments: list[Segment] = []
    classes: dict[tuple[int, ...], list[tuple[int, int, CompactLinearWeights]]] = {}
    for slot, rows in zip(batch.slots, batch.slot_rows):
        entry = weights.get(slot)
        if entry is None:
            continue
        if rows.numel() >= segment_min_rows:
            tables = rotation_tables(entry.spec.shape_key, entry.A0.dtype, entry.A0.device)
            segments.append(Segment(_rows_or_all(rows, batch.num_rows), entry, tables))
        else:
            classes.setdefault(entry.spec.shape_key, []).extend((row, slot, entry) for row in rows.tolist())
    groups = tuple(_gathered_group(entries, batch.num_rows, stack_cache) for entries in classes.values())
    return ModulePlan(tuple(segments), groups)


def cached_module_plan(pool: AdapterWeightPool, module_path: str, batch: AdapterBatch,
                       segment_min_rows: int = SEGMENT_MIN_ROWS) -> ModulePlan | None:
    """The plan for this module and step, reused while the step layout and pool are unchanged."""
    weights = pool.module(module_path)
    if weights is None:
        return None
    cache: OrderedDict = pool.plan_cache.setdefault("plans", OrderedDict())
    key = (batch.signature, segment_min_rows)
    plans = cache.get(key)
    if plans is None:
        plans = cache[key] = {}
        while len(cache) > PLAN_CACHE_SIGNATURES:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    stacks: dict = pool.plan_cache.setdefault("stacks", {})
    if len(stacks) > STACK_CACHE_ENTRIES:
        stacks.clear()
    plan = plans.get(module_path)
    if plan is None:
        plan = plans[module_path] = build_module_plan(weights, batch, segment_min_rows, stacks)
    return plan
