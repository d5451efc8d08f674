"""The obviously-correct reference backend: float64, dense A/B, one row at a time. Tests only.

Semantics:
    for t in range(T):                      # x: (T, h), y: (T, o)
        a = row_slots[t]
        if a == NO_ADAPTER or a does not target this module: continue
        A, B = materialize(weights[a])      # (r, h), (o, r)
        y[t] += (alpha_a / r_a) * B @ (A @ x[t])
"""

from __future__ import annotations

import torch

from ..adapters.dense import materialize
from .metadata import AdapterBatch
from .pool import AdapterWeightPool


class ReferenceBackend:
    name = "reference"

    def apply(self, y: torch.Tensor, x: torch.Tensor, pool: AdapterWeightPool, module_path: str,
              batch: AdapterBatch) -> None:
        weights = pool.module(module_path) or {}
        for slot, rows in zip(batch.slots, batch.slot_rows):
            if slot not in weights:
                continue
            entry = weights[slot].to(dtype=torch.float64)
            dense_a, dense_b = materialize(entry)
            for row in rows.tolist():
                delta = entry.spec.scale * (dense_b @ (dense_a @ x[row].to(torch.float64)))
                y[row] += delta.to(y.dtype)
