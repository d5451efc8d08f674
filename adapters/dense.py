"""The reference PRoLoRA math (docs/prolora-math.md#dense-form): dense materialization and its inverse.

Used by tests, the float64 reference kernel, export to PEFT LoRA and import of dense
checkpoints. The serving path never calls ``materialize``: it applies the compact form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import LayerSpec
from .weights import CompactLinearWeights


def rotation_index_a(spec: LayerSpec) -> torch.Tensor:
    """(m, R) table: chunk i of dense A row k is A0 row ``(k + i*sA) mod R``."""
    shared = spec.shared_r
    chunks = torch.arange(spec.reduce_a).unsqueeze(1)
    return (torch.arange(shared).unsqueeze(0) + chunks * spec.stride_a) % max(shared, 1)


def rotation_index_b(spec: LayerSpec) -> torch.Tensor:
    """(n, R) table: chunk i of dense B column k is B0 column ``(k + i*sB) mod R``."""
    shared = spec.shared_r
    chunks = torch.arange(spec.reduce_b).unsqueeze(1)
    return (torch.arange(shared).unsqueeze(0) + chunks * spec.stride_b) % max(shared, 1)


def materialize(weights: CompactLinearWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``A`` (r, h) and ``B`` (o, r): shared ranks first, unshared last."""
    spec = weights.spec
    index_a = rotation_index_a(spec)  # (m, R)
    # A_shared[k, i*cA + j] = A0[index_a[i, k], j]
    a_chunks = weights.A0[index_a]  # (m, R, cA)
    a_shared = a_chunks.permute(1, 0, 2).reshape(spec.shared_r, spec.reduce_a * spec.chunk_a)
    a_shared = a_shared[:, : spec.in_features]
    index_b = rotation_index_b(spec)  # (n, R)
    # B_shared[i*cB + j, k] = B0[j, index_b[i, k]]
    b_chunks = weights.B0[:, index_b]  # (cB, n, R)
    b_shared = b_chunks.permute(1, 0, 2).reshape(spec.reduce_b * spec.chunk_b, spec.shared_r)
    b_shared = b_shared[: spec.out_features]
    dense_a = torch.cat([a_shared, weights.Au], dim=0)
    dense_b = torch.cat([b_shared, weights.Bu], dim=1)
    return dense_a, dense_b


def delta_weight(weights: CompactLinearWeights) -> torch.Tensor:
    """``(alpha / r) * B @ A``, shape (o, h): what merging the adapter adds to W0."""
    dense_a, dense_b = materialize(weights)
    return weights.spec.scale * (dense_b @ dense_a)


def apply_dense(weights: CompactLinearWeights, x: torch.Tensor) -> torch.Tensor:
    """``scale * B (A x)`` for rows ``x`` of shape (..., h), via the dense form."""
    dense_a, dense_b = materialize(weights)
    return weights.spec.scale * (x @ dense_a.T.to(x.dtype)) @ dense_b.T.to(x.dtype)


@dataclass(frozen=True)
class CompressionResult:
    weights: CompactLinearWeights
    max_abs_deviation: float  # max |dense - materialize(compact)| over A and B


def compress(dense_a: torch.Tensor, dense_b: torch.Tensor, spec: LayerSpec) -> CompressionResult:
    """Recover compact tensors from a dense A (r, h) / B (o, r) with PRoLoRA structure.

    The shared chunks are taken as the mean over every position they were broadcast to, so a
    checkpoint with exactly that structure round-trips and anything else shows a deviation.
    """
    r, h = dense_a.shape
    o = dense_b.shape[0]
    if (r, h, o, dense_b.shape[1]) != (spec.r, spec.in_features, spec.out_features, spec.r):
        raise ValueError(f"dense shapes A{tuple(dense_a.shape)} B{tuple(dense_b.shape)} do not match "
                         f"r={spec.r}, h={spec.in_features}, o={spec.out_features}")
    work = torch.float64
    a, b = dense_a.to(work), dense_b.to(work)
    shared = spec.shared_r
    a0 = _mean_of_chunks_a(a[:shared], spec)
    b0 = _mean_of_chunks_b(b[:, :shared], spec)
    compact = CompactLinearWeights(spec, a0, b0, a[shared:].clone(), b[:, shared:].clone())
    rebuilt_a, rebuilt_b = materialize(compact)
    deviation = max((rebuilt_a - a).abs().max().item() if a.numel() else 0.0,
                    (rebuilt_b - b).abs().max().item() if b.numel() else 0.0)
    return CompressionResult(compact.to(dtype=dense_a.dtype), deviation)


def _mean_of_chunks_a(a_shared: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    shared, width = spec.shared_r, spec.chunk_a
    total = torch.zeros(shared, width, dtype=a_shared.dtype)
    count = torch.zeros(shared, width, dtype=a_shared.dtype)
    padded = torch.zeros(shared, spec.reduce_a * width, dtype=a_shared.dtype)
    padded[:, : spec.in_features] = a_shared
    valid = torch.zeros(spec.reduce_a * width, dtype=a_shared.dtype)
    valid[: spec.in_features] = 1
    index = rotation_index_a(spec)
    for chunk in range(spec.reduce_a):
        columns = slice(chunk * width, (chunk + 1) * width)
        total.index_add_(0, index[chunk], padded[:, columns])
        count.index_add_(0, index[chunk], valid[columns].expand(shared, width).contiguous())
    return total / count.clamp_min(1)


def _mean_of_chunks_b(b_shared: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    mean_t = _mean_of_chunks_a(
        b_shared.T, LayerSpec(spec.out_features, spec.in_features, spec.r, spec.unshared_r,
                              spec.reduce_b, spec.reduce_a, spec.alpha))
    return mean_t.T.contiguous()
