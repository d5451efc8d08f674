"""CUDA-graph bookkeeping on the CPU: buckets, padding, static buffers, and the padded forward
over the static buffers (run without capture) against the eager step."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from prolora_serve.kernels import NO_ADAPTER, SeqSlice, build_attention_metadata
from prolora_serve.server.engine.cuda_graphs import (DecodeRow, StaticBuffers, batch_buckets,
                                                     bucket_for, decode_rows, graphs_unavailable,
                                                     pad_decode_batch)
from prolora_serve.server.engine.scheduler import ScheduledChunk

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_buckets_cover_every_batch_size_up_to_max_batch() -> None:
    assert batch_buckets(32) == (1, 2, 4, 8, 16, 32)
    assert batch_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    assert batch_buckets(1) == (1,) and batch_buckets(3) == (1, 2, 3)
    buckets = batch_buckets(100)
    for size in range(1, 101):
        bucket = bucket_for(size, buckets)
        assert bucket is not None and size <= bucket < 2 * size
    assert bucket_for(101, buckets) is None
    with pytest.raises(ValueError):
        batch_buckets(0)
    with pytest.raises(ValueError):
        bucket_for(0, buckets)


def test_graphs_only_on_cuda_with_device_side_kernels() -> None:
    assert graphs_unavailable("cuda", False, "triton", "triton") is None
    assert "CUDA" in graphs_unavailable("cpu", False, "triton", "triton")
    assert graphs_unavailable("cuda", True, "triton", "triton") == "--enforce-eager"
    assert "plans" in graphs_unavailable("cuda", False, "torch", "triton")
    assert "mask" in graphs_unavailable("cuda", False, "triton", "sdpa")


def test_padding_rows_use_no_adapter_and_the_dummy_block() -> None:
    rows = [DecodeRow(11, 5, [7, 2], 3), DecodeRow(12, 0, [4], NO_ADAPTER),
            DecodeRow(13, 8, [1, 6, 9, 0], 0)]
    padded = pad_decode_batch(rows, bucket=8, width=5, block_size=4, dummy_block=99)
    assert padded.bucket == 8 and padded.num_real == 3 and padded.has_adapters
    assert padded.input_ids.tolist() == [11, 12, 13] + [0] * 5
    assert padded.positions.tolist() == [5, 0, 8] + [0] * 5
    assert padded.context_lens.tolist() == [6, 1, 9] + [1] * 5
    assert padded.row_slots.tolist() == [3, NO_ADAPTER, 0] + [NO_ADAPTER] * 5
    assert padded.block_tables.tolist()[:3] == [[7, 2, 99, 99, 99], [4, 99, 99, 99, 99],
                                               [1, 6, 9, 99, 99]]  # only the blocks in use
    assert (padded.block_tables[3:] == 99).all()
    # real rows: the slots the eager metadata writes; pad rows: slot 0 of the dummy block
    eager = build_attention_metadata([SeqSlice(r.block_table, r.position, 1) for r in rows], 4)
    assert padded.slot_mapping[:3].tolist() == eager.slot_mapping.tolist()
    assert padded.slot_mapping[3:].tolist() == [99 * 4] * 5
    assert not pad_decode_batch([DecodeRow(1, 0, [0], NO_ADAPTER)], 2, 1, 4, 5).has_adapters
    with pytest.raises(ValueError, match="do not fit"):
        pad_decode_batch(rows, bucket=2, width=5, block_size=4, dummy_block=99)
    with pytest.raises(ValueError, match="needs 3 blocks"):
        pad_decode_batch([DecodeRow(1, 8, [1, 2], 0)], 1, 5, 4, 99)  # table too short
    with pytest.raises(ValueError, match="width 2"):
        pad_decode_batch([DecodeRow(1, 8, [1, 2, 3], 0)], 1, 2, 4, 99)  # past max_model_len


def test_static_buffers_keep_their_addresses_across_buckets() -> None:
    buffers = StaticBuffers(max_bucket=8, width=3, device="cpu")
    addresses = [t.data_ptr() for t in (buffers.input_ids, buffers.block_tables, buffers.row_slots)]
    rows = [DecodeRow(5, 2, [1], 4), DecodeRow(6, 4, [2, 3], NO_ADAPTER)]
    buffers.fill(pad_decode_batch(rows, 2, 3, 4, 9))
    assert buffers.input_ids[:2].tolist() == [5, 6] and buffers.row_slots[:2].tolist() == [4, -1]
    buffers.fill(pad_decode_batch(rows[:1], 4, 3, 4, 9))
    assert buffers.input_ids[:4].tolist() == [5, 0, 0, 0]
    assert buffers.context_lens[:4].tolist() == [3, 1, 1, 1]
    assert [t.data_ptr() for t in (buffers.input_ids, buffers.block_tables,
                                   buffers.row_slots)] == addresses
    meta = buffers.attention_metadata(4, block_size=4)
    assert meta.num_tokens == 4 and len(meta.decode_seqs) == 4  # a pure decode step
    assert meta.decode_block_tables.data_ptr() == buffers.block_tables.data_ptr()
    assert meta.decode_context_lens.shape == (4,) and meta.slot_mapping.shape == (4,)
    with pytest.raises(ValueError, match="does not fit"):
        buffers.fill(pad_decode_batch(rows, 16, 3, 4, 9))


@dataclass
class FakeSeq:
    token_ids: list[int]
    block_table: list[int]
    adapter_slot: int | None
    num_prompt_tokens: int


def chunk(seq: FakeSeq, start: int, num_tokens: int, prompt_logits: bool = False) -> ScheduledChunk:
    return ScheduledChunk(seq, start, num_tokens, True, prompt_logits)


def test_only_pure_sampling_decode_steps_replay() -> None:
    seq = FakeSeq([1, 2, 3], [0], 2, 2)
    assert decode_rows([chunk(seq, 2, 1)]) == [DecodeRow(3, 2, [0], 2)]
    assert decode_rows([chunk(seq, 0, 3)]) is None  # prefill
    assert decode_rows([chunk(seq, 2, 1), chunk(seq, 0, 2)]) is None  # mixed
    assert decode_rows([chunk(seq, 2, 1, prompt_logits=True)]) is None
    base = FakeSeq([4, 5], [1], None, 1)
    assert decode_rows([chunk(base, 1, 1)])[0].adapter_slot == NO_ADAPTER


def test_cpu_runner_never_uses_graphs() -> None:
    from prolora_serve.server.engine.loader import build_model
    from prolora_serve.server.engine.model_runner import ModelRunner
    from conftest import build_tiny_llama

    hf = build_tiny_llama(40)
    runner = ModelRunner(build_model(hf.config, hf.state_dict()), 8, 4)
    assert runner.graphs is None and "CUDA" in runner.graphs_off_reason
    assert runner.kv_cache.num_blocks == 8  # no dummy block


@pytest.mark.triton
def test_padded_forward_over_static_buffers_matches_the_eager_step() -> None:
    """The graph path's forward (the kernels a capture records, over the padded static buffers)
    gives the eager step's logits; adapters loaded afterwards are seen without rebuilding
    anything (the slot tables are rewritten in place); pad rows write only the dummy block.
    On the CPU the padded forward runs without capture (Triton's interpreter); on a GPU it is
    captured and replayed."""
    pytest.importorskip("triton")
    from prolora_serve.kernels.attention import DecodeAttention
    from prolora_serve.kernels.triton_attention import triton_decode_attention
    from prolora_serve.server.engine.cuda_graphs import DecodeGraphs
    from prolora_serve.server.engine.loader import build_model
    from prolora_serve.server.engine.model_runner import ModelRunner
    from conftest import build_tiny_llama
    from test_kernels import make_adapter

    hf = build_tiny_llama(40, seed=3)
    model = build_model(hf.config, hf.state_dict()).to(DEVICE)
    num_blocks, block_size = 12, 4
    runner = ModelRunner(model, num_blocks, block_size, "triton", enforce_eager=True)
    runner.kv_cache.decode_attention = DecodeAttention("triton", triton_decode_attention)
    shapes = {p: s for p, s in model.linear_shapes().items()}
    runner.pool.load(0, make_adapter(8, 2, 4, 6, alpha=16.0, seed=1, modules=shapes))
    runner.pool.load(3, make_adapter(5, 0, 3, 2, alpha=8.0, seed=2, modules=shapes))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 40, (n,), generator=gen).tolist() for n in (5, 9, 2)]
    tables = [[0, 5], [2, 7, 9], [4]]
    slots = [0, None, 3]
    seqs = [FakeSeq(p, t, s, len(p)) for p, t, s in zip(prompts, tables, slots)]
    runner.run([chunk(s, 0, len(s.token_ids)) for s in seqs])  # prefill, eager
    for seq, token in zip(seqs, (7, 8, 9)):
        seq.token_ids.append(token)
    decode = [chunk(s, len(s.token_ids) - 1, 1) for s in seqs]
    eager = runner.run(decode).sample
    before = [k.clone() for k in runner.kv_cache.keys]
    graphs = DecodeGraphs(runner, max_batch=4, max_model_len=24, dummy_block=num_blocks - 1,
                          capture=DEVICE == "cuda")
    layout = graphs.tables.layout_version
    padded = graphs.run(decode_rows(decode))  # bucket 4: three rows and one pad row
    torch.testing.assert_close(padded, eager, rtol=1e-4, atol=1e-4)
    for old, new in zip(before, runner.kv_cache.keys):
        assert new[num_blocks - 1, 0].abs().sum() > 0  # the pad row wrote the dummy block
        torch.testing.assert_close(new[:num_blocks - 1], old[:num_blocks - 1], rtol=1e-4, atol=1e-4)
    # a new adapter in a new slot, and the base-only rows of sequence 1 moved onto it
    runner.pool.load(5, make_adapter(4, 4, 1, 1, alpha=4.0, seed=5, modules=shapes))
    seqs[1].adapter_slot = 5
    decode = [chunk(s, len(s.token_ids) - 1, 1) for s in seqs[:2]]
    eager = runner.run(decode).sample
    padded = graphs.run(decode_rows(decode))  # bucket 2
    torch.testing.assert_close(padded, eager, rtol=1e-4, atol=1e-4)
    assert graphs.tables.layout_version == layout  # rewritten in place: no re-capture needed
