"""Scheduler from tables: admission under tiny KV budgets, chunked prefill, preemption, FCFS,
batch limits, adapter waiting and failures, abort. No model: a step "samples" token 7."""

from __future__ import annotations

import threading

import pytest
import torch

from prolora_serve.kernels import AdapterWeightPool
from prolora_serve.server.engine.detokenizer import IncrementalDetokenizer, StopStringText
from prolora_serve.adapters.registry import AdapterNotFoundError
from prolora_serve.server.engine.kv_cache import BlockAllocator
from prolora_serve.server.engine.residency import AdapterCache
from prolora_serve.server.engine.sampling import SamplingParams, make_generator
from prolora_serve.server.engine.scheduler import Scheduler, SchedulerConfig
from prolora_serve.server.engine.sequence import Sequence, SequenceStatus
from test_engine_residency import FakeSource, make_adapter


def make_seq(request_id: str, prompt_len: int, max_tokens: int = 4, adapter: str | None = None) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    prompt = list(range(1, prompt_len + 1))
    return Sequence(request_id, prompt, params, adapter, make_generator(0),
                    IncrementalDetokenizer(None, prompt), StopStringText([]))


def make_scheduler(num_blocks: int, block_size: int, max_tokens: int = 64, max_batch: int = 8,
                   adapters: AdapterCache | None = None) -> Scheduler:
    config = SchedulerConfig(max_batch=max_batch, max_batched_tokens=max_tokens, block_size=block_size)
    return Scheduler(config, BlockAllocator(num_blocks), adapters)


def check_invariants(sched: Scheduler) -> None:
    live = list(sched.running) + list(sched.waiting)
    assert sched.allocator.num_used == sum(len(s.block_table) for s in live)
    for seq in sched.running:
        assert len(seq.block_table) * sched.config.block_size >= seq.num_computed_tokens
        assert seq.num_computed_tokens < seq.num_tokens or seq.num_computed_tokens == seq.num_tokens
    for seq in sched.waiting:
        assert seq.status is SequenceStatus.WAITING and not seq.block_table
    assert len(sched.running) <= sched.config.max_batch


def step(sched: Scheduler) -> list[tuple[str, int, int, bool]]:
    """One model-free step; returns (request, start, tokens, samples) per scheduled chunk."""
    out = sched.schedule()
    assert out.num_tokens <= sched.config.max_batched_tokens
    for chunk in out.chunks:
        if chunk.samples:
            chunk.seq.append_token(7)
            if chunk.seq.num_output_tokens >= chunk.seq.params.max_tokens:
                sched.finish(chunk.seq, "length")
    check_invariants(sched)
    return [(c.seq.request_id, c.start, c.num_tokens, c.samples) for c in out.chunks]


def test_admission_waits_for_free_blocks() -> None:
    sched = make_scheduler(num_blocks=6, block_size=4)
    for rid, length in (("A", 9), ("B", 8), ("C", 5)):
        sched.add(make_seq(rid, length, max_tokens=2))
    expected = [
        [("A", 0, 9, True), ("B", 0, 8, True)],  # C needs 2 blocks, 1 is free
        [("A", 9, 1, True), ("B", 8, 1, True)],  # B's 9th token takes the last block
        [("C", 0, 5, True)],  # A and B finished and freed theirs
        [("C", 5, 1, True)],
        [],
    ]
    assert [step(sched) for _ in expected] == expected
    assert sched.allocator.num_free == 6 and not sched.has_work


def test_chunked_prefill_shares_steps_with_decode() -> None:
    sched = make_scheduler(num_blocks=100, block_size=4, max_tokens=8)
    sched.add(make_seq("A", 3, max_tokens=5))
    assert step(sched) == [("A", 0, 3, True)]
    sched.add(make_seq("B", 20, max_tokens=2))
    expected = [
        [("A", 3, 1, True), ("B", 0, 7, False)],
        [("A", 4, 1, True), ("B", 7, 7, False)],
        [("A", 5, 1, True), ("B", 14, 6, True)],
        [("A", 6, 1, True), ("B", 20, 1, True)],
        [],
    ]
    assert [step(sched) for _ in expected] == expected


def test_long_prompt_alone_is_split_by_the_token_budget() -> None:
    sched = make_scheduler(num_blocks=100, block_size=16, max_tokens=32)
    sched.add(make_seq("A", 100, max_tokens=1))
    expected = [[("A", s, n, s + n == 100)] for s, n in ((0, 32), (32, 32), (64, 32), (96, 4))]
    assert [step(sched) for _ in expected] == expected
    assert not sched.has_work


def test_decode_preempts_the_newest_sequence_and_it_recomputes_later() -> None:
    sched = make_scheduler(num_blocks=4, block_size=2, max_tokens=16)
    a, b = make_seq("A", 3, max_tokens=4), make_seq("B", 3, max_tokens=3)
    sched.add(a)
    sched.add(b)
    expected = [
        [("A", 0, 3, True), ("B", 0, 3, True)],
        [("A", 3, 1, True), ("B", 3, 1, True)],
        [("A", 4, 1, True)],  # A needs a 3rd block: B is preempted (recompute)
        [("A", 5, 1, True)],  # B (5 tokens = 3 blocks) waits: 1 block free
        [("B", 0, 5, True)],  # A finished: B recomputes prompt + its 2 generated tokens
        [],
    ]
    assert [step(sched) for _ in expected] == expected
    assert b.num_preemptions == 1 and sched.num_preemptions == 1 and a.num_preemptions == 0
    assert b.output_token_ids == [7, 7, 7] and sched.allocator.num_free == 4


def test_fcfs_a_small_request_does_not_jump_a_blocked_one() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4)
    sched.add(make_seq("A", 12, max_tokens=1))
    sched.add(make_seq("B", 8, max_tokens=1))
    sched.add(make_seq("C", 2, max_tokens=1))
    assert step(sched) == [("A", 0, 12, True)]
    assert [s.request_id for s in sched.waiting] == ["B", "C"]
    assert step(sched) == [("B", 0, 8, True), ("C", 0, 2, True)]


def test_max_batch_limits_running_sequences() -> None:
    sched = make_scheduler(num_blocks=100, block_size=4, max_batch=2)
    for rid in "ABC":
        sched.add(make_seq(rid, 3, max_tokens=2))
    assert step(sched) == [("A", 0, 3, True), ("B", 0, 3, True)]
    assert step(sched) == [("A", 3, 1, True), ("B", 3, 1, True)]
    assert step(sched) == [("C", 0, 3, True)]


def test_requests_wait_for_their_adapter_while_others_decode() -> None:
    source = FakeSource({"slow": make_adapter(0)})
    source.gate = threading.Event()
    cache = AdapterCache(AdapterWeightPool("cpu", torch.float32), 1 << 20, source)
    sched = make_scheduler(num_blocks=100, block_size=4, adapters=cache)
    x, y, z = make_seq("X", 4, 3, "slow"), make_seq("Y", 4, 5), make_seq("Z", 2, 3, "slow")
    for seq in (x, y, z):
        sched.add(seq)
    assert step(sched) == [("Y", 0, 4, True)]
    assert step(sched) == [("Y", 4, 1, True)]
    source.gate.set()
    cache.prepare("slow").result(timeout=10)
    assert step(sched) == [("Y", 5, 1, True), ("X", 0, 4, True), ("Z", 0, 2, True)]
    assert x.adapter_slot == z.adapter_slot == 0
    assert cache.resident()[0].in_use == 2
    assert (cache.misses, cache.hits, cache.loads) == (2, 0, 1)
    while sched.has_work:
        step(sched)
    assert cache.resident()[0].in_use == 0 and x.adapter_slot is None


def test_unknown_adapter_fails_only_its_request() -> None:
    cache = AdapterCache(AdapterWeightPool("cpu", torch.float32), 1 << 20, FakeSource({}))
    sched = make_scheduler(num_blocks=100, block_size=4, adapters=cache)
    bad, good = make_seq("bad", 4, adapter="gone"), make_seq("good", 4)
    sched.add(bad)
    sched.add(good)
    assert step(sched) == [("good", 0, 4, True)]
    cache.prepare("gone").exception(timeout=10)
    out = sched.schedule()
    assert out.finished == [bad] and isinstance(bad.error, AdapterNotFoundError)
    assert bad.is_finished and bad.finish_reason == "abort" and "bad" not in sched.requests


def test_abort_frees_blocks_and_the_adapter_reference() -> None:
    source = FakeSource({"a": make_adapter(0)})
    cache = AdapterCache(AdapterWeightPool("cpu", torch.float32), 1 << 20, source)
    cache.prepare("a").result(timeout=10)
    sched = make_scheduler(num_blocks=10, block_size=4, adapters=cache)
    sched.add(make_seq("A", 9, max_tokens=10, adapter="a"))
    sched.add(make_seq("B", 3))
    step(sched)
    assert sched.allocator.num_free == 10 - 3 - 1 and cache.resident()[0].in_use == 1
    aborted = sched.abort("A")
    assert aborted.finish_reason == "abort" and aborted.is_finished
    assert sched.allocator.num_free == 9 and cache.resident()[0].in_use == 0
    assert sched.abort("A") is None
    assert step(sched) == [("B", 3, 1, True)]

