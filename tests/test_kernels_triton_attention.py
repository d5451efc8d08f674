"""The Triton paged decode attention against the float64 reference.

Compiled on a GPU where there is one, else in Triton's interpreter on CPU tensors
(tests/conftest.py sets TRITON_INTERPRET=1 when CUDA is absent)."""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("triton", reason="the triton extra is not installed")

from prolora_serve.kernels import attention  # noqa: E402
from prolora_serve.kernels.metadata import SeqSlice, build_attention_metadata  # noqa: E402
from prolora_serve.kernels.reference import reference_attention  # noqa: E402
from prolora_serve.kernels.testing import assert_close_for_dtype  # noqa: E402

pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (q_heads, kv_heads, head_dim): GQA ratios 1, 3 (SmolLM2) and 8 (the tl.dot path); head dims
# that are not powers of two (10, 80, 33) and one that is (64).
HEADS = [(3, 3, 10), (9, 3, 80), (16, 2, 33), (8, 1, 64)]
CONTEXTS = [1, 2, 17, 31, 32, 33, 300]  # one token, around the 32-token tile, long


def stale_decode_step(q_heads: int, kv_heads: int, head_dim: int, block_size: int,
                      context_lens: list[int], dtype: torch.dtype, seed: int,
                      q_dtype: torch.dtype | None = None):
    """Scattered block tables over a cache whose every slot outside the contexts holds NaN, so
    reading one (a stale token, a padded block-table entry) would poison the output."""
    gen = torch.Generator().manual_seed(seed)
    used = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(used) + 2
    shape = (num_blocks, block_size, kv_heads, head_dim)
    keys = torch.full(shape, float("nan"), dtype=dtype)
    values = torch.full(shape, float("nan"), dtype=dtype)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    seqs, start = [], 0
    for length, count in zip(context_lens, used):
        table = order[start:start + count]
        start += count
        for p in range(length):
            block, within = table[p // block_size], p % block_size
            keys[block, within] = torch.randn(kv_heads, head_dim, generator=gen).to(dtype)
            values[block, within] = torch.randn(kv_heads, head_dim, generator=gen).to(dtype)
        seqs.append(SeqSlice(table, length - 1, 1))
    meta = build_attention_metadata(seqs, block_size, DEVICE)
    q = torch.randn(len(context_lens), q_heads, head_dim, generator=gen).to(q_dtype or dtype)
    return q, keys, values, meta


def run_triton(q, keys, values, meta, scale):
    from prolora_serve.kernels.triton_attention import triton_decode_attention

    out = triton_decode_attention(q.to(DEVICE), keys.to(DEVICE), values.to(DEVICE), meta, scale)
    return out.cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("heads", HEADS, ids=str)
def test_triton_decode_matches_float64_reference(heads, block_size: int, dtype: torch.dtype) -> None:
    q, keys, values, meta = stale_decode_step(*heads, block_size, CONTEXTS, dtype,
                                              seed=sum(heads) + block_size)
    out = run_triton(q, keys, values, meta, 0.3)
    expected = reference_attention(q, keys, values, meta, 0.3)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.isfinite(out).all(), "a slot outside a context was read"
    assert_close_for_dtype(out, expected, dtype)


@pytest.mark.parametrize("q_dtype, cache_dtype", [(torch.float32, torch.bfloat16),
                                                  (torch.float32, torch.float16),
                                                  (torch.bfloat16, torch.float32)])
def test_triton_decode_over_a_cache_of_another_dtype(q_dtype, cache_dtype) -> None:
    """--kv-cache-dtype: the output keeps q's dtype; exact to the coarser of the two."""
    q, keys, values, meta = stale_decode_step(16, 2, 33, 16, [5, 40], cache_dtype, seed=3,
                                              q_dtype=q_dtype)
    out = run_triton(q, keys, values, meta, 0.2)
    assert out.dtype == q_dtype
    coarse = q_dtype if cache_dtype == torch.float32 else cache_dtype
    assert_close_for_dtype(out, reference_attention(q, keys, values, meta, 0.2), coarse)


def test_triton_decode_inside_a_mixed_step() -> None:
    """paged_attention with the Triton kernel as the cache's decode kernel: the decode rows of a
    step that also holds a prefill chunk, against the float64 reference on every row."""
    from prolora_serve.kernels.triton_attention import triton_decode_attention

    gen = torch.Generator().manual_seed(4)
    keys = torch.zeros(12, 4, 2, 24, device=DEVICE)
    values = torch.zeros_like(keys)
    meta = build_attention_metadata([SeqSlice([3, 9], 5, 1), SeqSlice([7, 1], 0, 6),
                                     SeqSlice([2], 2, 1)], 4, DEVICE)
    q, k, v = (torch.randn(meta.num_tokens, heads, 24, generator=gen).to(DEVICE)
               for heads in (6, 2, 2))
    out = attention.paged_attention(q, k, v, keys, values, meta, 0.4,
                                    attention.DecodeAttention("triton", triton_decode_attention))
    expected = reference_attention(q.cpu(), keys.cpu(), values.cpu(), meta, 0.4)
    assert_close_for_dtype(out.cpu(), expected, torch.float32)


def test_cuda_caches_choose_triton_decode_attention_once(monkeypatch) -> None:
    attention.get_decode_attention.cache_clear()
    try:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert attention.get_decode_attention("cuda", dtype).name == "triton"
        assert attention.get_decode_attention("cuda", torch.float64).name == "sdpa"
        attention.get_decode_attention.cache_clear()
        monkeypatch.setitem(sys.modules, "prolora_serve.kernels.triton_attention", None)
        assert attention.get_decode_attention("cuda", torch.bfloat16).name == "sdpa"  # no triton
    finally:
        attention.get_decode_attention.cache_clear()


def test_triton_decode_refuses_mismatched_heads() -> None:
    from prolora_serve.kernels.triton_attention import paged_decode

    cache = torch.zeros(2, 4, 3, 8, device=DEVICE)
    lens, tables = torch.ones(1, dtype=torch.int64), torch.zeros(1, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="Hq % Hkv"):
        paged_decode(torch.zeros(1, 4, 8, device=DEVICE), cache, cache, tables, lens, 1.0)
    with pytest.raises(TypeError, match="cache dtype"):
        paged_decode(torch.zeros(1, 3, 8, device=DEVICE), cache.double(), cache.double(), tables,
                     lens, 1.0)
