"""Iteration-level scheduler: which token chunks of which sequences run in the next step.

It owns the CPU-side accounting only: paged KV blocks (through the BlockAllocator) and adapter
residency admission (through the AdapterCache). Each step it first continues the running
sequences (decodes first, then unfinished prefill chunks), preempting the most recently
admitted ones by recompute when the KV cache is out of blocks, then admits waiting requests
in arrival order while the token budget, the batch size and the KV cache allow. Prefill is
chunked: a prompt longer than the remaining token budget is split over several steps.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field, replace

from .kv_cache import BlockAllocator
from .prefix_cache import BASE_IDENTITY, block_hashes
from .residency import AdapterCache
from .sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int  # running sequences
    max_batched_tokens: int  # token rows per step
    block_size: int

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int  # position of the first token fed this step
    num_tokens: int  # tokens fed this step
    samples: bool  # the chunk ends at the last known token: a new token is sampled
    prompt_logits: bool  # logits of every row are needed (prompt logprobs)

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)  # failed while waiting (adapter load)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


@dataclass
class AdapterTraffic:
    """One adapter's requests (the base model's under the id None): counters since start or
    since the adapter was last forgotten, and the requests waiting and running now."""

    requests: int = 0  # accepted
    prompt_tokens: int = 0  # of the accepted requests (each choice of n is a request)
    generated_tokens: int = 0
    running: int = 0
    waiting: int = 0


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator,
                 adapters: AdapterCache | None) -> None:
        self.config = config
        self.allocator = allocator
        self.adapters = adapters
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.requests: dict[str, Sequence] = {}
        self.num_preemptions = 0
        # Counters of the sequences no longer in ``requests``, by adapter id; the lock makes a
        # sequence leaving ``requests`` and its tokens landing here one step for readers.
        self._retired: dict[str | None, AdapterTraffic] = {}
        self._traffic_lock = threading.Lock()

    # --- requests -----------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a request the engine accepted (the engine owns the request checks)."""
        with self._traffic_lock:
            self.requests[seq.request_id] = seq
            retired = self._retired.setdefault(seq.adapter_id, AdapterTraffic())
            retired.requests += 1
            retired.prompt_tokens += seq.num_prompt_tokens
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        seq = self.requests.get(request_id)
        if seq is not None:
            self.finish(seq, "abort")
        return seq

    def finish(self, seq: Sequence, reason: str, error: BaseException | None = None) -> None:
        """Retire a sequence: its blocks and its adapter reference are freed at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self._free(seq)
        seq.status, seq.finish_reason, seq.error = SequenceStatus.FINISHED, reason, error
        with self._traffic_lock:
            if self.requests.pop(seq.request_id, None) is seq:
                retired = self._retired.setdefault(seq.adapter_id, AdapterTraffic())
                retired.generated_tokens += seq.num_output_tokens

    def adapter_traffic(self) -> dict[str | None, AdapterTraffic]:
        """Per adapter id (None: the base model): the counters, with the tokens of live
        sequences so far, and the running/waiting counts. Safe from any thread; the counters
        never go backwards (until ``forget_traffic``)."""
        with self._traffic_lock:
            traffic = {key: replace(value) for key, value in self._retired.items()}
            live = list(self.requests.values())
        for seq in live:
            entry = traffic.setdefault(seq.adapter_id, AdapterTraffic())
            entry.generated_tokens += seq.num_output_tokens
            entry.running += seq.status is SequenceStatus.RUNNING
            entry.waiting += seq.status is SequenceStatus.WAITING
        return traffic

    def forget_traffic(self, adapter_id: str) -> None:
        """The adapter was deleted: drop its counters (memory stays bounded by live ids)."""
        with self._traffic_lock:
            self._retired.pop(adapter_id, None)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --- one step -----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        if self.adapters is not None:
            self.adapters.collect()
        budget = self._schedule_running(out, self.config.max_batched_tokens)
        if not out.preempted:  # under KV pressure, admitting more would only thrash
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        scheduled: set[int] = set()
        decodes_first = sorted(self.running, key=lambda s: s.num_tokens - s.num_computed_tokens > 1)
        for seq in decodes_first:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted for an earlier one
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._reserve(seq, num_new, scheduled, out):
                continue
            scheduled.add(id(seq))
            out.chunks.append(self._chunk(seq, num_new))
            budget -= num_new
        return budget

    def _reserve(self, seq: Sequence, num_new: int, scheduled: set[int],
                 out: SchedulerOutput) -> bool:
        """Blocks for ``seq``'s next chunk, preempting the newest unscheduled sequences."""
        while not self._grow_blocks(seq, seq.num_computed_tokens + num_new):
            victim = next(s for s in reversed(self.running) if id(s) not in scheduled)
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.config.max_batch:
                return
            if not self._acquire_adapter(seq, out):
                continue  # its adapter is loading (or failed): the others go ahead
            self._reuse_cached_prefix(seq)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._grow_blocks(seq, seq.num_computed_tokens + num_new):
                self._free(seq)  # its adapter and any cached prefix blocks it took
                seq.num_computed_tokens = 0
                return  # FCFS for KV memory: nobody behind it jumps the queue
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.chunks.append(self._chunk(seq, num_new))
            budget -= num_new

    # --- prefix caching -----------------------------------------------------------------
    def _identity(self, seq: Sequence) -> bytes:
        if seq.adapter_slot is None:
            return BASE_IDENTITY
        assert self.adapters is not None
        return self.adapters.identity(seq.adapter_slot)

    def _hashes(self, seq: Sequence) -> list[bytes]:
        seq.block_hashes = block_hashes(seq.token_ids, self.config.block_size, self._identity(seq),
                                        seq.block_hashes)
        return seq.block_hashes

    def _reuse_cached_prefix(self, seq: Sequence) -> None:
        """Start a new (or preempted) sequence on the cached blocks of its longest cached
        prefix; at least one token is always computed (it gives the next token's logits)."""
        if not self.allocator.caching or seq.num_computed_tokens or seq.needs_prompt_logprobs:
            return
        reusable = (seq.num_tokens - 1) // self.config.block_size
        blocks = self.allocator.lookup(self._hashes(seq)[:reusable])
        seq.block_table = blocks
        seq.num_computed_tokens = len(blocks) * self.config.block_size
        seq.num_registered_blocks = len(blocks)

    def cache_computed_blocks(self, chunks: list[ScheduledChunk]) -> None:
        """After a forward: register the blocks it filled, so later requests can reuse them."""
        if not self.allocator.caching:
            return
        for chunk in chunks:
            seq = chunk.seq
            full = min(chunk.end // self.config.block_size, len(seq.block_table))
            if full <= seq.num_registered_blocks or seq.is_finished:
                continue
            hashes = self._hashes(seq)
            for index in range(seq.num_registered_blocks, full):
                self.allocator.register(seq.block_table[index], hashes[index])
            seq.num_registered_blocks = full

    def _chunk(self, seq: Sequence, num_new: int) -> ScheduledChunk:
        start = seq.num_computed_tokens
        seq.num_computed_tokens = start + num_new
        return ScheduledChunk(seq, start, num_new, samples=start + num_new == seq.num_tokens,
                              prompt_logits=seq.needs_prompt_logprobs and start < seq.num_prompt_tokens)

    # --- resources ----------------------------------------------------------------------
    def _grow_blocks(self, seq: Sequence, num_tokens: int) -> bool:
        needed = -(-num_tokens // self.config.block_size) - len(seq.block_table)
        if needed <= 0:
            return True
        if needed > self.allocator.num_free:
            return False
        seq.block_table.extend(self.allocator.allocate(needed))
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Recompute preemption: drop its KV and adapter reference, requeue it at the front."""
        self.running.remove(seq)
        self._free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def _free(self, seq: Sequence) -> None:
        if seq.block_table:
            self.allocator.free(seq.block_table)
            seq.block_table = []
        seq.num_registered_blocks = 0
        self._release_adapter(seq)

    def _acquire_adapter(self, seq: Sequence, out: SchedulerOutput) -> bool:
        if seq.adapter_id is None or seq.adapter_slot is not None:
            return True
        assert self.adapters is not None, "a request with an adapter needs an adapter cache"
        first_lookup, seq.adapter_looked_up = not seq.adapter_looked_up, True
        try:
            seq.adapter_slot = self.adapters.acquire(seq.adapter_id, first_lookup)
        except Exception as err:  # noqa: BLE001 - unknown, too large or unreadable: fail it
            self.finish(seq, "abort", err)
            out.finished.append(seq)
            return False
        return seq.adapter_slot is not None

    def _release_adapter(self, seq: Sequence) -> None:
        if seq.adapter_slot is not None and self.adapters is not None:
            self.adapters.release(seq.adapter_slot)
        seq.adapter_slot = None
