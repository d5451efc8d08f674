"""The obviously-correct references, float64, one row at a time; tests only.

``ReferenceBackend`` applies adapters through the dense A/B; ``reference_attention`` is paged
attention read back through the block tables.

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
from .interface import OneModuleAtATime
from .metadata import AdapterBatch, AttentionMetadata
from .pool import AdapterWeightPool


class ReferenceBackend(OneModuleAtATime):
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


def reference_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                        meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Float64, one token at a time, read back from the (already written) cache via block tables."""
    q_heads, kv_heads = q.shape[1], key_cache.shape[2]
    out = torch.empty(q.shape, dtype=torch.float64)
    for seq in range(meta.num_seqs):
        context_len = meta.context_lens[seq]
        positions = torch.arange(context_len)
        table = torch.tensor(meta.block_tables[seq], dtype=torch.int64)
        slots = table[positions // meta.block_size] * meta.block_size + positions % meta.block_size
        keys = key_cache.reshape(-1, kv_heads, q.shape[2])[slots].double()
        values = value_cache.reshape(-1, kv_heads, q.shape[2])[slots].double()
        first_new = context_len - meta.query_lens[seq]
        for i in range(meta.query_lens[seq]):
            row = meta.query_starts[seq] + i
            for head in range(q_heads):
                kv_head = head // (q_heads // kv_heads)
                visible = first_new + i + 1
                scores = keys[:visible, kv_head] @ q[row, head].double() * scale
                out[row, head] = torch.softmax(scores, 0) @ values[:visible, kv_head]
    return out
