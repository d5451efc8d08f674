"""Decode attention: the fused CPU kernel and the SDPA path against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prolora_serve.kernels.testing import assert_close_for_dtype
from prolora_serve.kernels.attention import (fused_cpu_decode_attention, get_decode_attention,
                                             paged_attention, sdpa_decode_attention)
from prolora_serve.kernels.reference import reference_attention
from prolora_serve.kernels.cpu_extension import lane_builds_here
from prolora_serve.kernels.metadata import SeqSlice, build_attention_metadata
from prolora_serve.server.engine.kv_cache import KVCache

DECODERS = {"fused": fused_cpu_decode_attention, "sdpa": sdpa_decode_attention}
# (q_heads, kv_heads, head_dim, block_size): GQA 3:1, MHA, MQA with > 8 heads per kv head (two
# head groups), head dims below, at and across the 16-float lanes, blocks of 1 and 16 slots.
SHAPES = [(9, 3, 64, 16), (4, 4, 10, 3), (12, 1, 33, 5), (2, 2, 16, 1), (8, 2, 128, 16)]


def random_decode_step(q_heads: int, kv_heads: int, head_dim: int, block_size: int,
                       context_lens: list[int], dtype: torch.dtype, seed: int,
                       q_dtype: torch.dtype | None = None):
    """A cache full of random (stale) content, scattered block tables, one query per sequence."""
    gen = torch.Generator().manual_seed(seed)
    tables_len = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(tables_len) + 3
    kv = KVCache(1, num_blocks, block_size, kv_heads, head_dim, dtype=dtype)
    kv.keys[0].copy_(torch.randn(kv.keys[0].shape, generator=gen))
    kv.values[0].copy_(torch.randn(kv.values[0].shape, generator=gen))
    order = torch.randperm(num_blocks, generator=gen).tolist()
    starts = [sum(tables_len[:i]) for i in range(len(context_lens))]
    seqs = [SeqSlice(order[s:s + n], length - 1, 1)
            for s, n, length in zip(starts, tables_len, context_lens)]
    meta = build_attention_metadata(seqs, block_size)
    q = torch.randn(len(context_lens), q_heads, head_dim, generator=gen).to(q_dtype or dtype)
    return q, kv, meta


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_decode_matches_float64_reference(decoder: str, dtype: torch.dtype, shape) -> None:
    context_lens = [1, 17, 16, 45, 3, 33, 2]  # one token, block multiples, past the lanes
    q, kv, meta = random_decode_step(*shape, context_lens, dtype, seed=sum(shape))
    out = DECODERS[decoder](q, kv.keys[0], kv.values[0], meta, 0.3)
    expected = reference_attention(q, kv.keys[0], kv.values[0], meta, 0.3)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close_for_dtype(out, expected, dtype)


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("q_dtype, cache_dtype", [(torch.float32, torch.bfloat16),
                                                  (torch.float32, torch.float16),
                                                  (torch.bfloat16, torch.float16)])
def test_decode_over_a_cache_of_another_dtype(decoder: str, q_dtype: torch.dtype,
                                              cache_dtype: torch.dtype) -> None:
    """--kv-cache-dtype: float32 (or bf16) queries over a 16-bit cache; the output keeps q's dtype
    and is exact to q's precision against the float64 reference on the cached values."""
    q, kv, meta = random_decode_step(9, 3, 64, 16, [1, 40, 16, 23], cache_dtype, seed=5,
                                     q_dtype=q_dtype)
    out = DECODERS[decoder](q, kv.keys[0], kv.values[0], meta, 0.125)
    assert out.dtype == q_dtype
    assert_close_for_dtype(out, reference_attention(q, kv.keys[0], kv.values[0], meta, 0.125),
                           q_dtype)


def test_paged_attention_writes_float32_keys_into_a_16bit_cache() -> None:
    """New keys/values are rounded once when written; decode reads the rounded values, a fresh
    prefill attends to its own unrounded ones (as vLLM does), so bf16 tolerance for the step."""
    gen = torch.Generator().manual_seed(12)
    kv = KVCache(1, 16, 4, 2, 8, dtype=torch.bfloat16)
    meta = build_attention_metadata([SeqSlice([3, 9], 0, 6), SeqSlice([7], 0, 3)], 4)
    q, k, v = (torch.randn(meta.num_tokens, heads, 8, generator=gen) for heads in (4, 2, 2))
    out = paged_attention(q, k, v, kv.keys[0], kv.values[0], meta, scale=0.35)
    assert out.dtype == torch.float32
    assert torch.equal(kv.keys[0].view(-1, 2, 8)[meta.slot_mapping], k.to(torch.bfloat16))
    assert_close_for_dtype(out, reference_attention(q, kv.keys[0], kv.values[0], meta, 0.35),
                           torch.bfloat16)
    decode = build_attention_metadata([SeqSlice([3, 9], 6, 1), SeqSlice([7], 3, 1)], 4)
    q1, k1, v1 = (torch.randn(2, heads, 8, generator=gen) for heads in (4, 2, 2))
    out = paged_attention(q1, k1, v1, kv.keys[0], kv.values[0], decode, scale=0.35)
    assert_close_for_dtype(out, reference_attention(q1, kv.keys[0], kv.values[0], decode, 0.35),
                           torch.float32)


@pytest.mark.parametrize("rows", [1, 3])
def test_fused_decode_single_and_odd_batches(rows: int) -> None:
    q, kv, meta = random_decode_step(6, 2, 24, 4, [5, 1, 9][:rows], torch.float32, seed=rows)
    out = fused_cpu_decode_attention(q, kv.keys[0], kv.values[0], meta, 0.125)
    assert_close_for_dtype(out, reference_attention(q, kv.keys[0], kv.values[0], meta, 0.125),
                           torch.float32)


@settings(max_examples=20, deadline=None)
@given(group=st.integers(1, 10), kv_heads=st.integers(1, 3), head_dim=st.integers(1, 40),
       block_size=st.integers(1, 9), lens=st.lists(st.integers(1, 70), min_size=1, max_size=5),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       lanes=st.sampled_from(lane_builds_here()))
def test_fused_decode_random_shapes(group: int, kv_heads: int, head_dim: int, block_size: int,
                                    lens: list[int], dtype: torch.dtype, lanes: str) -> None:
    """Every lane build this processor runs (native, AVX2 where it has AVX2, the plain-C++
    lanes) on random shapes."""
    q, kv, meta = random_decode_step(group * kv_heads, kv_heads, head_dim, block_size, lens, dtype,
                                     seed=head_dim)
    out = fused_cpu_decode_attention(q, kv.keys[0], kv.values[0], meta, 0.5, lanes=lanes)
    assert_close_for_dtype(out, reference_attention(q, kv.keys[0], kv.values[0], meta, 0.5), dtype)


def test_softmax_is_stable_for_large_scores() -> None:
    """Scores in the thousands (exp would overflow without subtracting the max) stay finite."""
    q, kv, meta = random_decode_step(4, 2, 16, 4, [7, 30], torch.float32, seed=3)
    q = q * 400.0
    out = fused_cpu_decode_attention(q, kv.keys[0], kv.values[0], meta, 1.0)
    assert torch.isfinite(out).all()
    assert_close_for_dtype(out, reference_attention(q, kv.keys[0], kv.values[0], meta, 1.0),
                           torch.float32)


def test_paged_attention_uses_the_fused_kernel_for_mixed_steps() -> None:
    """Decode rows among prefill chunks go through the selected decoder and land in their rows."""
    gen = torch.Generator().manual_seed(11)
    kv = KVCache(1, 16, 4, 2, 8)
    kv.keys[0].normal_(generator=gen)
    kv.values[0].normal_(generator=gen)
    meta = build_attention_metadata([SeqSlice([3, 9], 5, 1), SeqSlice([1, 2], 0, 6),
                                     SeqSlice([7], 2, 1)], 4)
    q, k, v = (torch.randn(meta.num_tokens, heads, 8, generator=gen) for heads in (4, 2, 2))
    out = paged_attention(q, k, v, kv.keys[0], kv.values[0], meta, scale=0.35)
    assert_close_for_dtype(out, reference_attention(q, kv.keys[0], kv.values[0], meta, 0.35),
                           torch.float32)


def test_fused_decode_refuses_a_query_of_another_16bit_dtype_in_the_kernel() -> None:
    from prolora_serve.kernels.cpu_extension import load_extension

    q, kv, meta = random_decode_step(2, 1, 8, 4, [6], torch.float16, seed=0, q_dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="float32 over a 16-bit cache"):
        load_extension().paged_decode_attention(q, kv.keys[0], kv.values[0],
                                                meta.decode_block_tables, meta.decode_context_lens, 1.0)


def test_decoder_is_chosen_by_device_and_dtype() -> None:
    for device, dtype, name, run in (("cpu", torch.float32, "cpu", fused_cpu_decode_attention),
                                     ("cpu", torch.bfloat16, "cpu", fused_cpu_decode_attention),
                                     ("cpu", torch.float64, "sdpa", sdpa_decode_attention),
                                     ("cuda", torch.float64, "sdpa", sdpa_decode_attention)):
        chosen = get_decode_attention(device, dtype)
        assert chosen.name == name and chosen.run is run
    assert get_decode_attention("cuda", torch.float16).name == "triton"  # tests/test_kernels_triton_attention.py
    assert KVCache(1, 2, 4, 1, 8, dtype=torch.float16).decode_attention.name == "cpu"


def test_fused_decode_refuses_block_ids_outside_the_cache() -> None:
    q, kv, meta = random_decode_step(2, 1, 8, 4, [6], torch.float32, seed=0)
    meta.decode_block_tables[0, 1] = kv.num_blocks  # one past the end
    with pytest.raises(RuntimeError, match="block id out of range"):
        fused_cpu_decode_attention(q, kv.keys[0], kv.values[0], meta, 1.0)
