"""The GPU adapter path: BGMV-style Triton shrink/expand that read slot tables from device tensors.

One launch of each kernel per adapted module serves every row of the step, whatever adapter (or
none) each row uses, with any mix of (r, u, m, n): each row looks its slot up in the module's
slot table (``slot_tables.py``, shared with the CPU kernel: a present flag,
the addresses of A0, B0^T, Au, Bu^T in the pool and the dims R, u, m, n, cA, cB, sA, sB) and
walks its own adapter's exact ranks in tiles of ``BLOCK_K`` with loop bounds read on the device.
Nothing is padded to the largest rank, no weights are stacked or copied, and a step needs no
host-side plan: the row -> slot map (``AdapterBatch.row_slots``, on the device) is the plan.
The tables (``SlotTables``) are device tensors rewritten in place when the pool changes, so a
captured CUDA graph replays against newly loaded adapters without re-capture.

Semantics, for row t with slot a = row_slots[t] (a table row with present = 1; other rows,
NO_ADAPTER among them, are left untouched), x: (T, h), y: (T, o):
    shrink:  z[t, k]     = sum_{c<h} x[t, c] * A0_a[(k + (c // cA)*sA) % R, c % cA]   (k < R)
             z[t, R + q] = sum_{c<h} Au_a[q, c] * x[t, c]                             (q < u)
             (column c = i*cA + j of chunk i; the zero padding of x to m*cA adds nothing)
    expand:  y[t, i*cB + j] += scale_a * ( sum_{k<R} B0t_a[(k + i*sB) % R, j] * z[t, k]
                                           + sum_{q<u} But_a[q, i*cB + j] * z[t, R + q] )  (i*cB+j < o)
    A0_a (R, cA), B0t_a (R, cB), Au_a (u, h), But_a (u, o): the pool's tensors of slot a, in the
    pool dtype, accumulated in float32; scale_a = alpha_a / r_a.
Grids: shrink (T, S = ceil(h / BLOCK_J)): program (t, s) sums over its BLOCK_J input columns
only, for every rank of row t, into z_part (T, S, rank_capacity) float32; expand (T, ceil(o /
BLOCK_O)) adds z_part over s in a fixed order (deterministic, no atomics) before using it. So
a decode row's shrink runs as S programs of one or two tile loads each, not one program
walking h. Checked on the CPU under TRITON_INTERPRET=1 against ``reference.ReferenceBackend``
(float64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .interface import OneModuleAtATime
from .metadata import AdapterBatch
from .pool import AdapterWeightPool
from .slot_tables import NUM_FIELDS, SlotTables, TablesPerPool

BLOCK_K = 16  # ranks per tile
BLOCK_J = 128  # input features per shrink program (the column split)
BLOCK_O = 64  # output features per expand program
BLOCK_S = 32  # column splits summed per tile by the expand
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _slot_shrink_kernel(x_ptr, row_slots_ptr, table_ptr, z_ptr, h, stride_x, stride_zt, stride_zs,
                        W: tl.constexpr, NUM_FIELDS: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_J: tl.constexpr):
    """Program (t, s): row t's partial sums over input columns [s*BLOCK_J, (s+1)*BLOCK_J)."""
    t = tl.program_id(0)
    split = tl.program_id(1)
    slot = tl.load(row_slots_ptr + t)
    entry = table_ptr + tl.maximum(slot, 0) * NUM_FIELDS
    present = (slot >= 0) & (tl.load(entry) != 0)
    if present:
        a0 = tl.load(entry + 1).to(tl.pointer_type(W))
        au = tl.load(entry + 3).to(tl.pointer_type(W))
        shared_r = tl.load(entry + 5)
        unshared_r = tl.load(entry + 6)
        chunk_a = tl.load(entry + 9)
        stride_a = tl.load(entry + 11)
        cols = split * BLOCK_J + tl.arange(0, BLOCK_J)
        valid_c = cols < h
        xv = tl.load(x_ptr + t * stride_x + cols, mask=valid_c, other=0.0).to(tl.float32)
        chunk = cols // chunk_a  # column c = chunk * cA + within multiplies A0 row (k + chunk*sA) % R
        within = cols % chunk_a
        offs_k = tl.arange(0, BLOCK_K)
        z_out = z_ptr + t * stride_zt + split * stride_zs
        for k0 in range(0, shared_r, BLOCK_K):
            k = k0 + offs_k
            valid_k = k < shared_r
            source = (k[:, None] + chunk[None, :] * stride_a) % shared_r
            w = tl.load(a0 + source * chunk_a + within[None, :],
                        mask=valid_k[:, None] & valid_c[None, :], other=0.0)
            tl.store(z_out + k, tl.sum(w.to(tl.float32) * xv[None, :], axis=1), mask=valid_k)
        for q0 in range(0, unshared_r, BLOCK_K):
            q = q0 + offs_k
            valid_q = q < unshared_r
            w = tl.load(au + q[:, None] * h + cols[None, :],
                        mask=valid_q[:, None] & valid_c[None, :], other=0.0)
            tl.store(z_out + shared_r + q, tl.sum(w.to(tl.float32) * xv[None, :], axis=1),
                     mask=valid_q)


@triton.jit
def _sum_splits(z_row, num_splits, stride_zs, k, valid_k, BLOCK_S: tl.constexpr):
    """z[k] of one row: the shrink's partial sums added over its column splits, in order."""
    total = tl.zeros(k.shape, dtype=tl.float32)
    offs_s = tl.arange(0, BLOCK_S)
    for s0 in range(0, num_splits, BLOCK_S):
        splits = s0 + offs_s
        part = tl.load(z_row + splits[:, None] * stride_zs + k[None, :],
                       mask=(splits < num_splits)[:, None] & valid_k[None, :], other=0.0)
        total += tl.sum(part, axis=0)
    return total


@triton.jit
def _slot_expand_kernel(z_ptr, row_slots_ptr, table_ptr, scales_ptr, y_ptr, o, num_splits,
                        stride_zt, stride_zs, stride_y, W: tl.constexpr, NUM_FIELDS: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program (t, b): row t's outputs [b*BLOCK_O, (b+1)*BLOCK_O), added into y in place."""
    t = tl.program_id(0)
    slot = tl.load(row_slots_ptr + t)
    entry = table_ptr + tl.maximum(slot, 0) * NUM_FIELDS
    present = (slot >= 0) & (tl.load(entry) != 0)
    if present:
        b0t = tl.load(entry + 2).to(tl.pointer_type(W))
        but = tl.load(entry + 4).to(tl.pointer_type(W))
        shared_r = tl.load(entry + 5)
        unshared_r = tl.load(entry + 6)
        chunk_b = tl.load(entry + 10)
        stride_b = tl.load(entry + 12)
        offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
        valid_o = offs_o < o
        chunk = offs_o // chunk_b
        within = offs_o % chunk_b
        offs_k = tl.arange(0, BLOCK_K)
        z_row = z_ptr + t * stride_zt
        acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
        for k0 in range(0, shared_r, BLOCK_K):
            k = k0 + offs_k
            valid_k = k < shared_r
            zv = _sum_splits(z_row, num_splits, stride_zs, k, valid_k, BLOCK_S)
            source = (k[None, :] + chunk[:, None] * stride_b) % shared_r
            b = tl.load(b0t + source * chunk_b + within[:, None],
                        mask=valid_o[:, None] & valid_k[None, :], other=0.0)
            acc += tl.sum(b.to(tl.float32) * zv[None, :], axis=1)
        for q0 in range(0, unshared_r, BLOCK_K):
            q = q0 + offs_k
            valid_q = q < unshared_r
            sv = _sum_splits(z_row, num_splits, stride_zs, shared_r + q, valid_q, BLOCK_S)
            bu = tl.load(but + q[None, :] * o + offs_o[:, None],
                         mask=valid_o[:, None] & valid_q[None, :], other=0.0)
            acc += tl.sum(bu.to(tl.float32) * sv[None, :], axis=1)
        scale = tl.load(scales_ptr + slot)
        y_row = y_ptr + t * stride_y + offs_o
        base = tl.load(y_row, mask=valid_o, other=0.0)
        tl.store(y_row, (base.to(tl.float32) + acc * scale).to(y_ptr.dtype.element_ty),
                 mask=valid_o)


def slot_apply(y: torch.Tensor, x: torch.Tensor, row_slots: torch.Tensor, entries: torch.Tensor,
               scales: torch.Tensor, weight_dtype: torch.dtype, rank_capacity: int) -> None:
    """The two launches for one module (see Semantics); y (T, o) is updated in place."""
    rows, in_features = x.shape
    out_features = y.shape[1]
    if rows == 0:
        return
    if x.stride(1) != 1:
        x = x.contiguous()
    if y.stride(1) != 1:
        raise ValueError("the expand kernel adds into y in place: its rows must be contiguous")
    splits = triton.cdiv(in_features, BLOCK_J)
    z = torch.empty(rows, splits, rank_capacity, dtype=torch.float32, device=x.device)
    w = _TL_DTYPES[weight_dtype]
    _slot_shrink_kernel[(rows, splits)](x, row_slots, entries, z, in_features, x.stride(0),
                                        z.stride(0), z.stride(1), W=w, NUM_FIELDS=NUM_FIELDS,
                                        BLOCK_K=BLOCK_K, BLOCK_J=BLOCK_J)
    _slot_expand_kernel[(rows, triton.cdiv(out_features, BLOCK_O))](
        z, row_slots, entries, scales, y, out_features, splits, z.stride(0), z.stride(1),
        y.stride(0), W=w, NUM_FIELDS=NUM_FIELDS, BLOCK_K=BLOCK_K, BLOCK_O=BLOCK_O,
        BLOCK_S=BLOCK_S)


class TritonBackend(OneModuleAtATime):
    """``AdapterBackend`` over ``slot_apply``: one ``SlotTables`` per pool."""

    name = "triton"

    def __init__(self) -> None:
        self._tables = TablesPerPool()

    def tables(self, pool: AdapterWeightPool,
               module_paths: tuple[str, ...] | list[str] = ()) -> SlotTables:
        """The pool's device tables (made on first use; ``module_paths`` registered up front,
        as the CUDA-graph runner does for every adaptable projection of the model)."""
        if pool.dtype not in _TL_DTYPES:
            raise TypeError(f"the triton backend reads float32/bfloat16/float16 pools, not {pool.dtype}")
        tables = self._tables.of(pool, module_paths)
        for path in module_paths:
            tables.sync(path)
        return tables

    def apply(self, y: torch.Tensor, x: torch.Tensor, pool: AdapterWeightPool, module_path: str,
              batch: AdapterBatch) -> None:
        if pool.module(module_path) is None:  # eager: no resident adapter targets the module
            return
        self.launch(y, x, pool, module_path, batch.row_slots)

    def launch(self, y: torch.Tensor, x: torch.Tensor, pool: AdapterWeightPool, module_path: str,
               row_slots: torch.Tensor) -> None:
        """Both kernels, unconditionally (a captured graph must hold them for every module,
        whether or not an adapter targets it at capture time)."""
        tables = self.tables(pool)
        entries, scales = tables.module(module_path)
        slot_apply(y, x, row_slots, entries, scales, pool.dtype, tables.rank_capacity)
