"""The GPU path: Triton kernels for gathered groups (decode: one program per row), torch
matmuls (cuBLAS) for large per-adapter segments. Checked on the CPU with TRITON_INTERPRET=1.

Semantics of the two kernels, for row g of a gathered group using stacked adapter a = index[g]
(the weights below are indexed by a; x, z, su and out by g):
    shrink:  z[g, k]  = sum_i sum_j x[g, i*cA + j] * A0[g, (k + i*sA) % R, j]    (k < R)
             su[g, q] = sum_c Au[g, q, c] * x[g, c]                              (q < u)
    expand:  out[g, i*cB + j] = scale[g] * ( sum_k B0t[g, (k + i*sB) % R, j] * z[g, k]
                                            + sum_q But[g, q, i*cB + j] * su[g, q] )  (i*cB+j < o)
    shapes:  x (G, h), index (G), A0 (S, R, cA), B0t (S, R, cB), Au (S, u, h), But (S, u, o),
             scale (S, 1)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .plan import GatheredGroup
from .torch_backend import TorchBackend

BLOCK_J = 32
BLOCK_O = 64


@triton.jit
def _shrink_kernel(x_ptr, index_ptr, a0_ptr, au_ptr, z_ptr, su_ptr, h, R, cA, m, sA, u,
                   HAS_SHARED: tl.constexpr, HAS_UNSHARED: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_J: tl.constexpr):
    g = tl.program_id(0)
    a = tl.load(index_ptr + g)
    offs_j = tl.arange(0, BLOCK_J)
    if HAS_SHARED:
        offs_k = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for i in range(0, m):
            source_row = (offs_k + i * sA) % R
            for j0 in range(0, cA, BLOCK_J):
                cols = j0 + offs_j
                xv = tl.load(x_ptr + g * h + i * cA + cols, mask=(cols < cA) & (i * cA + cols < h), other=0.0)
                w = tl.load(a0_ptr + a * R * cA + source_row[:, None] * cA + cols[None, :],
                            mask=(offs_k[:, None] < R) & (cols[None, :] < cA), other=0.0)
                acc += tl.sum(w.to(tl.float32) * xv.to(tl.float32)[None, :], axis=1)
        tl.store(z_ptr + g * R + offs_k, acc, mask=offs_k < R)
    if HAS_UNSHARED:
        offs_q = tl.arange(0, BLOCK_U)
        acc_u = tl.zeros((BLOCK_U,), dtype=tl.float32)
        for c0 in range(0, h, BLOCK_J):
            cols = c0 + offs_j
            xv = tl.load(x_ptr + g * h + cols, mask=cols < h, other=0.0)
            w = tl.load(au_ptr + a * u * h + offs_q[:, None] * h + cols[None, :],
                        mask=(offs_q[:, None] < u) & (cols[None, :] < h), other=0.0)
            acc_u += tl.sum(w.to(tl.float32) * xv.to(tl.float32)[None, :], axis=1)
        tl.store(su_ptr + g * u + offs_q, acc_u, mask=offs_q < u)


@triton.jit
def _expand_kernel(z_ptr, su_ptr, index_ptr, b0_ptr, bu_ptr, scale_ptr, out_ptr, o, R, cB, sB, u,
                   HAS_SHARED: tl.constexpr, HAS_UNSHARED: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_O: tl.constexpr):
    g = tl.program_id(0)
    a = tl.load(index_ptr + g)
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    valid_o = offs_o < o
    acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
    if HAS_SHARED:
        offs_k = tl.arange(0, BLOCK_R)
        chunk = offs_o // cB
        within = offs_o % cB
        source_col = (offs_k[None, :] + chunk[:, None] * sB) % R
        b = tl.load(b0_ptr + a * cB * R + source_col * cB + within[:, None],
                    mask=valid_o[:, None] & (offs_k[None, :] < R), other=0.0)
        zv = tl.load(z_ptr + g * R + offs_k, mask=offs_k < R, other=0.0)
        acc += tl.sum(b.to(tl.float32) * zv[None, :], axis=1)
    if HAS_UNSHARED:
        offs_q = tl.arange(0, BLOCK_U)
        bu = tl.load(bu_ptr + a * o * u + offs_q[None, :] * o + offs_o[:, None],
                     mask=valid_o[:, None] & (offs_q[None, :] < u), other=0.0)
        sv = tl.load(su_ptr + g * u + offs_q, mask=offs_q < u, other=0.0)
        acc += tl.sum(bu.to(tl.float32) * sv[None, :], axis=1)
    scale = tl.load(scale_ptr + a)
    tl.store(out_ptr + g * o + offs_o, acc * scale.to(tl.float32), mask=valid_o)


def _next_pow2(value: int) -> int:
    return max(triton.next_power_of_2(max(value, 1)), 2)


def gathered_delta(x: torch.Tensor, group: GatheredGroup) -> torch.Tensor:
    """Delta (G, o) in float32 for the rows x (G, h) of a gathered group."""
    spec = group.spec
    rows, shared, unshared = x.shape[0], spec.shared_r, spec.unshared_r
    x = x.contiguous()
    z = torch.empty(rows, max(shared, 1), dtype=torch.float32, device=x.device)
    su = torch.empty(rows, max(unshared, 1), dtype=torch.float32, device=x.device)
    out = torch.empty(rows, spec.out_features, dtype=torch.float32, device=x.device)
    flags = dict(HAS_SHARED=shared > 0, HAS_UNSHARED=unshared > 0,
                 BLOCK_R=_next_pow2(shared), BLOCK_U=_next_pow2(unshared))
    _shrink_kernel[(rows,)](x, group.weight_index, group.A0, group.Au, z, su, spec.in_features,
                            shared, spec.chunk_a, spec.reduce_a, spec.stride_a, unshared,
                            BLOCK_J=BLOCK_J, **flags)
    grid = (rows, triton.cdiv(spec.out_features, BLOCK_O))
    _expand_kernel[grid](z, su, group.weight_index, group.B0t, group.But, group.scales, out,
                         spec.out_features, shared, spec.chunk_b, spec.stride_b, unshared,
                         BLOCK_O=BLOCK_O, **flags)
    return out


class TritonBackend(TorchBackend):
    name = "triton"

    @staticmethod
    def group_delta(x: torch.Tensor, group: GatheredGroup) -> torch.Tensor:
        return gathered_delta(x, group)
