"""Paged decode attention in Triton: K/V read in place through the block tables (no gather).

One program per (sequence, kv head). It holds the ``G = q_heads / kv_heads`` query heads that
share the kv head as G rows of one tile, so each cached key and value is read once per kv head,
not once per query head (GQA). The context is walked in tiles of 16 to 64 token positions;
each position's block is looked up in the sequence's block table, so any block size works (1,
16, ...) and a tile may span several blocks. Softmax is online (running max and sum, float32).

Semantics (S decode sequences, one new token each):
    q:            (S, Hq, D)   any float dtype; the output has q's dtype
    key_cache:    (num_blocks, block_size, Hkv, D)   fp16 / bf16 / fp32; value_cache likewise
    block_tables: (S, W) int64   W >= ceil(context_lens[s] / block_size); entries past that unread
    context_lens: (S,)   int64   >= 1
    G = Hq // Hkv;   slot(s, p) = block_tables[s, p // block_size] * block_size + p % block_size
    for s, h:   k = key_cache.flat[slot(s, p), h // G] for p < context_lens[s]   # (L_s, D)
                out[s, h] = softmax(scale * k @ q[s, h]) @ value_cache.flat[slot(s, p), h // G]
    Cache content outside each context (stale tokens, the padding of block tables) is never read.

Constraints: Hq a multiple of Hkv; any head dim D >= 1 (tiles are padded to the next power of
two and masked, so 80 or 96 work; D <= 256 keeps a tile in registers on a GPU); the block tables
and context lengths live on the device, so the kernel is safe to capture in a CUDA graph (the
loop bound is read on the device).

Products: with G <= 4 (MHA, SmolLM2's 3) q k^T and P V are float32 broadcast products (a
tl.dot would pad G to 16 rows and waste the work); with G > 4 they are tl.dot tiles of 16+
rows: a 16-bit cache multiplies in its own dtype on tensor cores (q rounded to the cache dtype,
float32 accumulation, probabilities rounded for P @ V, as flash attention does), a float32
cache in IEEE float32. ``reference.reference_attention``
is the float64 check. No split-K over long contexts yet (one program walks the whole context).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .metadata import AttentionMetadata


def interpreted() -> bool:
    """Running in Triton's CPU interpreter (TRITON_INTERPRET=1), whose bf16 tl.dot is wrong
    (triton 3.9: garbage products), so bf16 tiles are multiplied in float32 there."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

BLOCK_N = 32  # token positions per tile (tl.dot path)
BROADCAST_MAX_G = 4  # up to 4 query heads per kv head: float32 broadcast products, no padding
BROADCAST_ELEMENTS = 8192  # of the (G, N, D) products per tile
MIN_BLOCK_G = 16  # more: tl.dot, which needs >= 16 rows on a GPU; unused rows are masked
CACHE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, lens_ptr, scale,
                         G, D, block_size,
                         stride_qs, stride_qh, stride_os, stride_oh,
                         stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                         stride_table,
                         BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                         USE_DOT: tl.constexpr, DOT_F32: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    valid_g = offs_g < G
    valid_d = offs_d < D
    heads = kv_head * G + offs_g
    q = tl.load(q_ptr + seq * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
                mask=valid_g[:, None] & valid_d[None, :], other=0.0)
    if USE_DOT and not DOT_F32:
        q = q.to(k_ptr.dtype.element_ty)
    else:
        q = q.to(tl.float32)
    context_len = tl.load(lens_ptr + seq)
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for start in range(0, context_len, BLOCK_N):
        positions = start + offs_n
        valid_n = positions < context_len
        blocks = tl.load(tables_ptr + seq * stride_table + positions // block_size,
                         mask=valid_n, other=0)
        within = positions % block_size
        kv_mask = valid_n[:, None] & valid_d[None, :]
        k = tl.load(k_ptr + blocks[:, None] * stride_kb + within[:, None] * stride_kt
                    + kv_head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        if not USE_DOT:  # few heads per kv head: broadcast products, float32
            scores = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
        elif DOT_F32:
            scores = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:  # 16-bit tensor cores, float32 accumulation
            scores = tl.dot(q, tl.trans(k))
        scores = tl.where(valid_n[None, :], scores * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + blocks[:, None] * stride_vb + within[:, None] * stride_vt
                    + kv_head * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
        if not USE_DOT:
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        elif DOT_F32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + seq * stride_os + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=valid_g[:, None] & valid_d[None, :])


def _broadcast_tile(block_g: int, block_d: int) -> int:
    """Token positions per tile of the broadcast path: its (G, N, D) float32 products stay
    within 8192 elements (64 registers a thread at 4 warps), 16 to 64 positions."""
    n = 16
    while n < 64 and 2 * n * block_g * block_d <= BROADCAST_ELEMENTS:
        n *= 2
    return n


def paged_decode(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """The kernel on explicit tensors (see Semantics); returns (S, Hq, D) in q's dtype."""
    num_seqs, q_heads, head_dim = q.shape
    _, block_size, kv_heads, cache_dim = key_cache.shape
    if cache_dim != head_dim or q_heads % kv_heads or value_cache.shape != key_cache.shape:
        raise ValueError(f"q {tuple(q.shape)} does not fit caches {tuple(key_cache.shape)} / "
                         f"{tuple(value_cache.shape)} (need Hq % Hkv == 0, equal head dims)")
    if key_cache.dtype not in CACHE_DTYPES or value_cache.dtype != key_cache.dtype:
        raise TypeError(f"cache dtype must be one of {CACHE_DTYPES}, got {key_cache.dtype}")
    if key_cache.stride(-1) != 1 or value_cache.stride(-1) != 1:
        raise ValueError("the caches' head dim must be contiguous")
    q = q if q.stride(-1) == 1 else q.contiguous()
    tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    group = q_heads // kv_heads
    use_dot = group > BROADCAST_MAX_G
    block_g = max(MIN_BLOCK_G if use_dot else 2, triton.next_power_of_2(group))
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n = BLOCK_N if use_dot else _broadcast_tile(block_g, block_d)
    _paged_decode_kernel[(num_seqs, kv_heads)](
        q, key_cache, value_cache, out, tables, context_lens, float(scale),
        group, head_dim, block_size,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        tables.stride(0),
        BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_N=block_n,
        USE_DOT=use_dot, DOT_F32=key_cache.dtype == torch.float32 or (
            key_cache.dtype == torch.bfloat16 and interpreted()))
    return out


def triton_decode_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                            meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """The ``DecodeFunction`` of ``attention.py``: the step's decode rows, read in place."""
    return paged_decode(q, key_cache, value_cache, meta.decode_block_tables,
                        meta.decode_context_lens, scale)
