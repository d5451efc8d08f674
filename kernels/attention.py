"""Paged attention over the KV cache for one flattened step (decode rows batched, prefill per sequence).

Grouped-query attention without repeating K/V: the ``G = q_heads / kv_heads`` query heads that
share a key/value head are laid out as G query rows of that head (head ``h`` uses kv head
``h // G``, as Hugging Face's ``repeat_kv`` does).

Decode rows go through one ``DecodeAttention`` chosen once per (device, cache dtype) by
``get_decode_attention``: the fused C++ kernel on the CPU (``cpu``: reads the paged cache in
place), the Triton kernel on CUDA (``triton``, ``triton_attention.py``: reads the paged cache in
place through the block tables), else torch SDPA over a gathered copy (``sdpa``). ``reference.reference_attention`` is the
float64 check beside them.

Semantics (decode, one new token per sequence s, q: (S, Hq, D), caches (blocks, bs, Hkv, D)):
    keys_s = key_cache[slots of block_tables[s], first context_lens[s] positions]   # (L_s, Hkv, D)
    out[s, h] = softmax(scale * keys_s[:, h // G] @ q[s, h]) @ values_s[:, h // G]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F

from .cpu_extension import ELEMENT_TYPE_CODES, load_extension
from .metadata import AttentionMetadata

log = logging.getLogger(__name__)
DECODE_ATTENTION_NAMES = ("cpu", "triton", "sdpa")

# (q (Sd, Hq, D), key_cache, value_cache, meta, scale) -> (Sd, Hq, D): decode rows' attention.
DecodeFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, float],
                          torch.Tensor]


@dataclass(frozen=True)
class DecodeAttention:
    """One decode-attention implementation and its name (shown on /health)."""

    name: str
    run: DecodeFunction

    def __call__(self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 meta: AttentionMetadata, scale: float) -> torch.Tensor:
        return self.run(q, key_cache, value_cache, meta, scale)


def write_kv(key_cache: torch.Tensor, value_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store the step's new keys/values (T, kv_heads, head_dim) at their flat cache slots, in the
    cache's dtype (a 16-bit cache next to float32 compute rounds them here, once)."""
    key_cache.view(-1, *k.shape[1:]).index_copy_(0, slot_mapping, k.to(key_cache.dtype))
    value_cache.view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v.to(value_cache.dtype))


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor,
                    value_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                    decode: DecodeAttention | None = None) -> torch.Tensor:
    """q (T, Hq, D), new k/v (T, Hkv, D) -> attention output (T, Hq, D); writes k/v to the cache.
    ``decode``: the decode kernel chosen once for this cache (default: ``get_decode_attention``)."""
    write_kv(key_cache, value_cache, k, v, meta.slot_mapping)
    decode = decode or get_decode_attention(key_cache.device.type, key_cache.dtype)
    if len(meta.decode_seqs) == meta.num_tokens:  # pure decode step: rows are the sequences
        return decode(q, key_cache, value_cache, meta, scale)
    out = torch.empty_like(q)
    if meta.decode_seqs:
        decoded = decode(q.index_select(0, meta.decode_rows), key_cache, value_cache, meta, scale)
        out.index_copy_(0, meta.decode_rows, decoded)
    for seq, slots in zip(meta.prefill_seqs, meta.prefill_context_slots):
        rows = slice(meta.query_starts[seq], meta.query_starts[seq + 1])
        out[rows] = _prefill(q[rows], k[rows], v[rows], key_cache, value_cache, slots, scale)
    return out


@lru_cache(maxsize=None)
def get_decode_attention(device_type: str, dtype: torch.dtype) -> DecodeAttention:
    """Chosen once per (device, cache dtype): the fused kernel for CPU caches of
    float32/bfloat16/float16, the Triton kernel for CUDA caches of those dtypes, SDPA otherwise
    (or where a kernel cannot be built or triton is not installed: all compute the same
    attention; the fallback is logged and shown by name)."""
    if device_type == "cuda" and dtype in ELEMENT_TYPE_CODES:
        try:
            from .triton_attention import triton_decode_attention
        except ImportError as err:  # no triton
            log.warning("Triton decode attention unavailable (%s); using torch SDPA", err)
            return SDPA_DECODE
        return DecodeAttention("triton", triton_decode_attention)
    if device_type != "cpu" or dtype not in ELEMENT_TYPE_CODES:
        return SDPA_DECODE
    try:
        load_extension()
    except Exception as err:  # no compiler / headers
        log.warning("fused CPU decode attention unavailable (%s); using torch SDPA", err)
        return SDPA_DECODE
    return FUSED_CPU_DECODE


def fused_cpu_decode_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                               meta: AttentionMetadata, scale: float,
                               lanes: str = "native") -> torch.Tensor:
    """One query token per sequence, read from the paged cache in place (cpu_attention.cpp).
    The kernel takes q in the cache's dtype or float32; any other pairing computes in float32."""
    query = q if q.dtype in (torch.float32, key_cache.dtype) else q.float()
    out = load_extension(lanes).paged_decode_attention(
        query.contiguous(), key_cache, value_cache, meta.decode_block_tables,
        meta.decode_context_lens, scale)
    return out.to(q.dtype)


def sdpa_decode_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                          meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """One query token per sequence: gather every context at once, padded and masked."""
    num_seqs, q_heads, head_dim = q.shape
    blocks = meta.decode_block_tables.view(-1)  # index_select: cheaper than advanced indexing
    kv_heads = key_cache.shape[2]
    keys = key_cache.index_select(0, blocks).to(q.dtype).view(num_seqs, -1, kv_heads, head_dim).transpose(1, 2)
    values = value_cache.index_select(0, blocks).to(q.dtype).view(num_seqs, -1, kv_heads, head_dim).transpose(1, 2)
    grouped = q.view(num_seqs, kv_heads, q_heads // kv_heads, head_dim)
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=meta.decode_mask,
                                         scale=scale)
    return out.reshape(num_seqs, q_heads, head_dim)


def _prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor,
             value_cache: torch.Tensor, context_slots: torch.Tensor | None,
             scale: float) -> torch.Tensor:
    """A chunk of n new tokens: causal among themselves, after all cached context."""
    num_new = q.shape[0]
    if context_slots is None:  # nothing cached: the new K/V are the whole context
        keys, values, mask = k, v, None
    else:
        keys = key_cache.view(-1, *k.shape[1:]).index_select(0, context_slots).to(q.dtype)
        values = value_cache.view(-1, *v.shape[1:]).index_select(0, context_slots).to(q.dtype)
        mask = _chunk_causal_mask(num_new, keys.shape[0], q.device)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), keys.transpose(0, 1).unsqueeze(0),
        values.transpose(0, 1).unsqueeze(0), attn_mask=mask, is_causal=mask is None,
        scale=scale, enable_gqa=True)
    return out.squeeze(0).transpose(0, 1)


def _chunk_causal_mask(num_new: int, context_len: int, device: torch.device) -> torch.Tensor:
    """(n, L) bool: new token i (at position L - n + i) sees keys 0 .. L - n + i."""
    offset = context_len - num_new
    query_pos = torch.arange(num_new, device=device).unsqueeze(1) + offset
    return torch.arange(context_len, device=device).unsqueeze(0) <= query_pos


FUSED_CPU_DECODE = DecodeAttention("cpu", fused_cpu_decode_attention)
SDPA_DECODE = DecodeAttention("sdpa", sdpa_decode_attention)
