"""The CPU fast path: one fused C++ call (cpu_gathered.cpp) per adapted module serves every row
of the step, whatever adapter (or none) each row uses.

The kernel reads the pool's own tensors by address through the module's slot table (one row of
addresses and dims per resident adapter, ``slot_tables.py``; a load rewrites only its own
slot's rows), so a step copies no adapter weights and needs no per-step plan: the row -> slot
map of the batch is the plan.
Weights may be resident in float32, bfloat16 or float16 (converted in registers); activations
too (16-bit ones widened per row, their deltas added with one rounding). Semantics are those
of torch_backend.py; the float64 reference checks both.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .cpu_extension import ELEMENT_TYPE_CODES, load_extension
from .metadata import AdapterBatch
from .pool import AdapterWeightPool
from .slot_tables import NUM_FIELDS, TablesPerPool


class CpuBackend:
    name = "cpu"

    def __init__(self, lanes: str = "native") -> None:
        self.kernel = load_extension(lanes)  # compiled (or loaded) once, at selection
        if self.kernel.NUM_FIELDS != NUM_FIELDS:
            raise RuntimeError(f"stale kernel build: {self.kernel.NUM_FIELDS} table fields, "
                               f"expected {NUM_FIELDS}")
        self.tables = TablesPerPool()

    def apply(self, y: torch.Tensor, x: torch.Tensor, pool: AdapterWeightPool, module_path: str,
              batch: AdapterBatch) -> None:
        self.apply_many((y,), x, pool, (module_path,), batch)

    def apply_many(self, ys: Sequence[torch.Tensor], x: torch.Tensor, pool: AdapterWeightPool,
                   module_paths: Sequence[str], batch: AdapterBatch) -> None:
        """One kernel call for every module that some resident adapter targets."""
        code = ELEMENT_TYPE_CODES.get(pool.dtype)
        if code is None or pool.device.type != "cpu":
            raise TypeError(f"the cpu backend reads float32/bfloat16/float16 CPU pools, not {pool.dtype}")
        if len(ys) != len(module_paths):
            raise ValueError(f"{len(ys)} outputs for {len(module_paths)} module paths")
        targeted = self.tables.of(pool).targeted(tuple(module_paths))
        if not targeted.positions:
            return
        # x and each y may be float32, bfloat16 or float16: the kernel widens 16-bit x rows and
        # sums a 16-bit output's delta in float32 before adding it once, as a float32 kernel
        # followed by y.add_(delta) would round it.
        self.kernel.gathered_apply([ys[i] for i in targeted.positions], x, batch.row_slots,
                                   targeted.entries, targeted.scales, code)
