"""Paged KV cache: attention metadata from tables, the block allocator, cache sizing."""

from __future__ import annotations

import pytest
import torch

from prolora_serve.kernels.metadata import SeqSlice, build_attention_metadata
from prolora_serve.server.engine.kv_cache import BlockAllocator, KVCache

# (sequences, block_size, expected slot_mapping, context_lens, query_starts, decode, prefill)
TABLES = [
    # One fresh prompt spanning two non-adjacent blocks.
    ([SeqSlice([3, 1], 0, 6)], 4,
     [12, 13, 14, 15, 4, 5], (6,), (0, 6), (), (0,)),
    # Two decode rows: the next slot after 5 (and after 8) cached tokens.
    ([SeqSlice([7, 2], 5, 1), SeqSlice([0, 9, 4], 8, 1)], 4,
     [9, 16], (6, 9), (0, 1, 2), (0, 1), ()),
    # A second prefill chunk that starts mid-block, then a decode row, block size 3.
    ([SeqSlice([5, 0, 8], 4, 3), SeqSlice([2], 1, 1)], 3,
     [1, 2, 24, 7], (7, 2), (0, 3, 4), (1,), (0,)),
    # Block size 1: every token its own block.
    ([SeqSlice([6, 3, 9], 2, 1)], 1,
     [9], (3,), (0, 1), (0,), ()),
]


@pytest.mark.parametrize("seqs,block_size,slots,context_lens,starts,decode,prefill", TABLES)
def test_metadata_from_tables(seqs, block_size, slots, context_lens, starts, decode, prefill) -> None:
    meta = build_attention_metadata(seqs, block_size)
    assert meta.slot_mapping.tolist() == slots
    assert meta.context_lens == context_lens
    assert meta.query_starts == starts
    assert meta.query_lens == tuple(s.num_new for s in seqs)
    assert meta.decode_seqs == decode
    assert meta.prefill_seqs == prefill
    assert meta.num_tokens == len(slots)
    assert meta.decode_rows.tolist() == [starts[i] for i in decode]


def test_decode_tensors_pad_block_tables_and_mask_beyond_each_context() -> None:
    seqs = [SeqSlice([7, 2], 5, 1), SeqSlice([4], 0, 1), SeqSlice([0, 9, 4, 11], 8, 1)]
    meta = build_attention_metadata(seqs, 4)
    # Only the blocks a context spans are used; the rest is padding with block 0.
    assert meta.decode_block_tables.tolist() == [[7, 2, 0], [4, 0, 0], [0, 9, 4]]
    mask = meta.decode_mask.view(3, -1)
    assert mask.sum(1).tolist() == [6, 1, 9]
    assert mask[0].tolist() == [True] * 6 + [False] * 6
    assert meta.decode_mask.shape == (3, 1, 1, 12)


def test_prefill_context_slots_cover_cached_and_new_tokens() -> None:
    seqs = [SeqSlice([5, 0, 8], 4, 3), SeqSlice([1, 6], 0, 5)]
    meta = build_attention_metadata(seqs, 3)
    assert meta.prefill_seqs == (0, 1)
    assert meta.prefill_context_slots[0].tolist() == [15, 16, 17, 0, 1, 2, 24]
    assert meta.prefill_context_slots[1] is None  # nothing cached: attends to the new K/V only
    assert meta.block_tables == ((5, 0, 8), (1, 6))


@pytest.mark.parametrize("seq", [SeqSlice([1], 3, 2), SeqSlice([], 0, 1)])
def test_metadata_rejects_block_tables_too_short(seq: SeqSlice) -> None:
    with pytest.raises(ValueError, match="cannot hold"):
        build_attention_metadata([seq], 4)


def test_seq_slice_and_empty_steps_are_rejected() -> None:
    with pytest.raises(ValueError, match="num_new >= 1"):
        SeqSlice([0], 0, 0)
    with pytest.raises(ValueError, match="at least one sequence"):
        build_attention_metadata([], 4)


def test_block_allocator_allocates_frees_and_refuses_overdraft() -> None:
    alloc = BlockAllocator(5)
    first = alloc.allocate(3)
    assert first == [0, 1, 2] and alloc.num_free == 2 and alloc.num_used == 3
    with pytest.raises(ValueError, match="cannot allocate 3 blocks: 2 free"):
        alloc.allocate(3)
    assert alloc.num_free == 2  # a refused request takes nothing
    alloc.free([1])
    assert alloc.allocate(1) == [1]  # freed blocks are reused first
    with pytest.raises(ValueError, match="not allocated"):
        alloc.free([4])
    with pytest.raises(ValueError, match="not allocated"):
        alloc.free([0, 0])
    alloc.free(first)
    assert alloc.num_free == 5 and sorted(alloc.allocate(5)) == [0, 1, 2, 3, 4]


def test_kv_cache_shapes_and_bytes() -> None:
    kv = KVCache(num_layers=3, num_blocks=7, block_size=4, num_kv_heads=2, head_dim=8,
                 dtype=torch.bfloat16)
    assert kv.keys[2].shape == (7, 4, 2, 8) and kv.values[0].dtype == torch.bfloat16
    assert kv.nbytes == 7 * KVCache.bytes_per_block(3, 4, 2, 8, torch.bfloat16)
    assert KVCache.bytes_per_block(3, 4, 2, 8, torch.bfloat16) == 2 * 3 * 4 * 2 * 8 * 2
    with pytest.raises(ValueError, match="num_blocks must be >= 1"):
        KVCache(1, 0, 4, 2, 8)


def test_prefix_caching_allocator_shares_keeps_and_evicts_lru() -> None:
    alloc = BlockAllocator(4, caching=True)
    a = alloc.allocate(2)
    alloc.register(a[0], b"h0")
    alloc.register(a[1], b"h1")
    alloc.register(a[1], b"other")  # a block keeps its first hash
    assert alloc.lookup([b"h0", b"h1", b"h2"]) == a  # the longest cached prefix, shared now
    assert alloc.num_used == 2 and alloc.hits == 2 and alloc.queries == 3
    alloc.free(a)
    alloc.free(a)  # the second reference: now unreferenced, yet cached
    assert alloc.num_used == 0 and alloc.num_free == 4 and alloc.num_cached == 2
    fresh = alloc.allocate(2)  # blocks without content go first
    assert set(fresh).isdisjoint(a) and alloc.num_cached == 2
    evicting = alloc.allocate(1)  # then the least recently freed cached block
    assert evicting == [a[1]] and alloc.num_cached == 1 and alloc.lookup([b"h0", b"h1"]) == [a[0]]
    with pytest.raises(ValueError, match="not allocated"):
        BlockAllocator(2, caching=True).register(1, b"h")  # a free block has no content
    plain = BlockAllocator(2)
    block = plain.allocate(1)
    plain.register(block[0], b"h")
    assert plain.lookup([b"h"]) == [] and plain.num_cached == 0  # caching off: nothing kept
