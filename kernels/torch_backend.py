"""The CPU fast path: compact PRoLoRA apply with batched torch matmuls (no A/B materialized).

Semantics (per row t with adapter a, spec (h, o, r, u, m, n), R = r - u):
    X  = pad(x[t], m*cA).view(m, cA)               # x: (T, h)
    Y  = X @ A0[a].T                               # (m, R)
    z  = [sum_i Y[i, (k + i*sA) % R] for k < R]    # (R,)   fold_a
    Z  = [[z[(k - i*sB) % R] for k < R] for i < n] # (n, R) unfold_b
    ys = (Z @ B0[a].T).reshape(n*cB)[:o]           # (o,)   shared part
    yu = Bu[a] @ (Au[a] @ x[t])                    # (o,)   unshared part
    y[t] += (alpha_a / r_a) * (ys + yu)            # y: (T, o)
Rows are served by per-adapter segments (plain matmuls) or per-row gathered groups (bmm);
see plan.py. FLOPs equal LoRA's at rank r; weight bytes read are the compact count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .interface import OneModuleAtATime
from .metadata import AdapterBatch
from .plan import GatheredGroup, Segment, cached_module_plan
from .pool import AdapterWeightPool


def _shared_rows(x: torch.Tensor, a0: torch.Tensor, b0t: torch.Tensor, spec, tables) -> torch.Tensor:
    """Shared-rank output for rows x (N, h); a0 (.., R, cA) / b0t (.., R, cB) one adapter's or
    stacked per row."""
    rows = x.shape[0]
    pad = spec.reduce_a * spec.chunk_a - spec.in_features
    chunks = (F.pad(x, (0, pad)) if pad else x).reshape(rows, spec.reduce_a, spec.chunk_a)
    y_chunks = chunks @ a0.transpose(-1, -2)  # (N, m, R)
    z = y_chunks.reshape(rows, -1) @ tables.fold_a  # (N, R)
    z_chunks = (z @ tables.unfold_b).view(rows, spec.reduce_b, spec.shared_r)  # (N, n, R)
    out = z_chunks @ b0t  # (N, n, cB)
    return out.reshape(rows, -1)[:, : spec.out_features]


def segment_delta(x: torch.Tensor, segment: Segment) -> torch.Tensor:
    w, spec = segment.weights, segment.weights.spec
    if spec.shared_r:
        out = _shared_rows(x, w.A0, w.B0.T, spec, segment.tables)
        if spec.unshared_r:
            out = torch.addmm(out, x @ w.Au.T, w.Bu.T)
    else:
        out = (x @ w.Au.T) @ w.Bu.T
    return out.mul_(spec.scale)


def _group_delta(x: torch.Tensor, group: GatheredGroup) -> torch.Tensor:
    spec, index = group.spec, group.weight_index
    out = x.new_zeros(x.shape[0], spec.out_features)
    if spec.shared_r:
        out += _shared_rows(x, group.A0[index], group.B0t[index], spec, group.tables)
    if spec.unshared_r:
        low = torch.bmm(x.unsqueeze(1), group.Au[index].transpose(1, 2))  # (G, 1, u)
        out += torch.bmm(low, group.But[index]).squeeze(1)
    return out * group.scales[index]


def accumulate_rows(y: torch.Tensor, x: torch.Tensor, rows: torch.Tensor | None, delta_fn, part) -> None:
    if rows is None:
        y += delta_fn(x, part).to(y.dtype)
    else:
        y.index_add_(0, rows, delta_fn(x.index_select(0, rows), part).to(y.dtype))


class TorchBackend(OneModuleAtATime):
    """Segments by BLAS matmuls, gathered groups by ``group_delta`` (batched torch ops)."""

    name = "torch"

    @staticmethod
    def group_delta(x: torch.Tensor, group: GatheredGroup) -> torch.Tensor:
        return _group_delta(x, group)

    def apply(self, y: torch.Tensor, x: torch.Tensor, pool: AdapterWeightPool, module_path: str,
              batch: AdapterBatch) -> None:
        plan = cached_module_plan(pool, module_path, batch)
        if plan is None:
            return
        x = x.to(pool.dtype)
        for segment in plan.segments:
            accumulate_rows(y, x, segment.rows, segment_delta, segment)
        for group in plan.groups:
            accumulate_rows(y, x, group.rows, self.group_delta, group)
