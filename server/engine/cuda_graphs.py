"""CUDA graphs for decode steps: buckets, padding, static input buffers, capture and replay.

A pure decode step (one new token per sequence) of B sequences runs as the replay of a graph
captured for the smallest bucket >= B (``batch_buckets``: 1, 2, 4, 8, ... up to
``--max-batch``). The step's inputs are copied into static device buffers (``StaticBuffers``:
token ids, positions, KV slot mapping, block tables, context lengths, row -> adapter slot), the
rows past B padded (``pad_decode_batch``: no adapter, their K/V written to a dummy block that no
sequence owns, a context of that one slot). Everything the forward reads lives in those buffers
or in tensors whose addresses never change: the KV cache, the model weights, and the adapter
slot tables (``kernels.slot_tables.SlotTables``), which are rewritten in place when
adapters are loaded or evicted. So loading and evicting adapters between replays needs no
re-capture; only a reallocation of the slot tables (a slot or rank past their capacity, shown
by ``layout_version``) captures again. Two graphs per bucket: one for steps where some row has
an adapter (every adaptable module launches the slot-table kernels) and one for base-only steps.

Graphs are used only on CUDA, with ``--enforce-eager`` off, the ``triton`` adapter backend (it
reads device slot tables; the torch backend builds host-side plans) and the ``triton`` decode
attention (it reads block tables and context lengths on the device; SDPA's mask is built on
the host): ``graphs_unavailable`` says why not otherwise. Prefill and mixed steps, and steps
that need prompt logits, always run eagerly. Nothing changes on the CPU.

The bookkeeping (buckets, padding, buffers, metadata views) is tested on the CPU; the same
forward over the static buffers also runs on the CPU without capture (``DecodeGraphs(...,
capture=False)``), which the tests compare with the eager path. The capture itself
(``_capture``) HAS NOT YET RUN ON A GPU: no device was lent to the task that wrote it; the
device check (``prolora-serve bench device``) compares graphs on against off for the same tokens.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from ...kernels import NO_ADAPTER, AttentionMetadata, NoAdapters, StepMetadata
from ...kernels.metadata import blocks_needed

if TYPE_CHECKING:
    from .model_runner import ModelRunner
    from .scheduler import ScheduledChunk

log = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two below ``max_batch``, then ``max_batch`` itself: every batch size up to it
    has a bucket, and padding wastes less than half a bucket.

    >>> batch_buckets(32), batch_buckets(48), batch_buckets(1)
    ((1, 2, 4, 8, 16, 32), (1, 2, 4, 8, 16, 32, 48), (1,))
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    buckets = []
    size = 1
    while size < max_batch:
        buckets.append(size)
        size *= 2
    buckets.append(max_batch)
    return tuple(buckets)


def bucket_for(batch_size: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket holding ``batch_size`` rows, or None past the largest."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return next((b for b in buckets if b >= batch_size), None)


def graphs_unavailable(device_type: str, enforce_eager: bool, adapter_backend: str,
                       decode_attention: str) -> str | None:
    """Why decode steps cannot run as graph replays here, or None when they can."""
    if device_type != "cuda":
        return "graphs run only on CUDA"
    if enforce_eager:
        return "--enforce-eager"
    if adapter_backend != "triton":
        return f"adapter backend {adapter_backend!r} builds host-side plans (graphs need 'triton')"
    if decode_attention != "triton":
        return f"decode attention {decode_attention!r} builds its mask on the host (graphs need 'triton')"
    return None


@dataclass(frozen=True)
class DecodeRow:
    """One sequence of a decode step: its new token, where it sits, whose adapter it uses."""

    token: int
    position: int  # of the new token; the context is position + 1 tokens
    block_table: Sequence[int]
    adapter_slot: int  # or NO_ADAPTER


@dataclass(frozen=True)
class PaddedDecode:
    """A decode step's inputs padded to its bucket, on the host (the rows past ``num_real`` are
    padding). ``StaticBuffers.fill`` copies them into the device buffers."""

    num_real: int
    input_ids: torch.Tensor  # (bucket,) int64
    positions: torch.Tensor  # (bucket,) int64
    slot_mapping: torch.Tensor  # (bucket,) int64: flat KV slot of each new token
    block_tables: torch.Tensor  # (bucket, width) int64: padded with the dummy block
    context_lens: torch.Tensor  # (bucket,) int64
    row_slots: torch.Tensor  # (bucket,) int64: adapter slot of each row, NO_ADAPTER for pads

    @property
    def bucket(self) -> int:
        return self.input_ids.shape[0]

    @property
    def has_adapters(self) -> bool:
        return bool((self.row_slots[:self.num_real] != NO_ADAPTER).any())


def pad_decode_batch(rows: Sequence[DecodeRow], bucket: int, width: int, block_size: int,
                     dummy_block: int) -> PaddedDecode:
    """The step's rows, then ``bucket - len(rows)`` pad rows: token 0 at position 0, no adapter,
    their K/V written to slot 0 of ``dummy_block`` and a context of that one slot. Real rows'
    block tables are padded to ``width`` with ``dummy_block`` (entries past a context are never
    read)."""
    if not 1 <= len(rows) <= bucket:
        raise ValueError(f"{len(rows)} rows do not fit a bucket of {bucket}")
    pads = bucket - len(rows)
    tables = torch.full((bucket, width), dummy_block, dtype=torch.int64)
    for i, row in enumerate(rows):
        used = blocks_needed(row.position + 1, block_size)
        if used > width or len(row.block_table) < used:
            raise ValueError(f"row {i}: a context of {row.position + 1} tokens needs {used} blocks "
                             f"(table of {len(row.block_table)}, width {width})")
        tables[i, :used] = torch.tensor(list(row.block_table[:used]), dtype=torch.int64)
    positions = torch.tensor([r.position for r in rows] + [0] * pads, dtype=torch.int64)
    blocks = tables[torch.arange(bucket), positions // block_size]
    return PaddedDecode(
        num_real=len(rows),
        input_ids=torch.tensor([r.token for r in rows] + [0] * pads, dtype=torch.int64),
        positions=positions,
        slot_mapping=blocks * block_size + positions % block_size,
        block_tables=tables,
        context_lens=positions + 1,
        row_slots=torch.tensor([r.adapter_slot for r in rows] + [NO_ADAPTER] * pads,
                               dtype=torch.int64),
    )


class StaticBuffers:
    """The device tensors a captured graph reads, sized for the largest bucket; a bucket of b
    rows reads the first b rows of each (views: same addresses at capture and replay)."""

    def __init__(self, max_bucket: int, width: int, device: torch.device | str) -> None:
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.int64, device=device)

        self.max_bucket, self.width = max_bucket, width
        self.input_ids, self.positions, self.slot_mapping = zeros(max_bucket), zeros(max_bucket), zeros(max_bucket)
        self.block_tables = zeros(max_bucket, width)
        self.context_lens = torch.ones(max_bucket, dtype=torch.int64, device=device)
        self.row_slots = torch.full((max_bucket,), NO_ADAPTER, dtype=torch.int64, device=device)

    def fill(self, padded: PaddedDecode) -> None:
        """Copy a padded step in (rows past its bucket keep what they held: unread)."""
        b = padded.bucket
        if b > self.max_bucket or padded.block_tables.shape[1] != self.width:
            raise ValueError(f"a bucket of {b} x {padded.block_tables.shape[1]} does not fit "
                             f"buffers of {self.max_bucket} x {self.width}")
        for name in ("input_ids", "positions", "slot_mapping", "block_tables", "context_lens",
                     "row_slots"):
            getattr(self, name)[:b].copy_(getattr(padded, name), non_blocking=True)

    def attention_metadata(self, bucket: int, block_size: int) -> AttentionMetadata:
        """Decode-only metadata over the first ``bucket`` rows of the buffers. Only the device
        tensors are read by a decode step with the triton kernel; the host tuples are what a
        pure decode step of ``bucket`` rows has (the per-sequence context lengths and block
        tables are on the device only, so the float64 reference cannot read this metadata)."""
        rows = tuple(range(bucket))
        return AttentionMetadata(
            block_size=block_size, slot_mapping=self.slot_mapping[:bucket],
            query_lens=(1,) * bucket, context_lens=(), query_starts=tuple(range(bucket + 1)),
            block_tables=(), decode_seqs=rows, decode_rows=torch.arange(bucket, device=self.input_ids.device),
            decode_block_tables=self.block_tables[:bucket],
            decode_context_lens=self.context_lens[:bucket],
            decode_mask=torch.empty(0, dtype=torch.bool, device=self.input_ids.device),
            prefill_seqs=(), prefill_context_slots=())


class SlotTableAdapters:
    """The ``AdapterApplier`` of a graph step: the slot-table kernels of every registered module,
    launched unconditionally, reading the buffers' row -> slot map (no ``AdapterBatch``: nothing
    about the rows is known on the host at capture time)."""

    def __init__(self, backend, pool, row_slots: torch.Tensor) -> None:
        self.backend, self.pool, self.row_slots = backend, pool, row_slots

    def apply(self, module_path: str, x: torch.Tensor, y: torch.Tensor) -> None:
        self.backend.launch(y, x, self.pool, module_path, self.row_slots)

    def apply_many(self, module_paths: Sequence[str], x: torch.Tensor,
                   ys: Sequence[torch.Tensor]) -> None:
        for path, y in zip(module_paths, ys, strict=True):
            self.apply(path, x, y)


def decode_rows(chunks: Sequence["ScheduledChunk"]) -> list[DecodeRow] | None:
    """The chunks as decode rows, or None when the step is not a pure sampling decode step
    (a prefill chunk, prompt logits asked for): such steps run eagerly."""
    rows = []
    for chunk in chunks:
        if chunk.num_tokens != 1 or not chunk.samples or chunk.prompt_logits:
            return None
        seq = chunk.seq
        slot = NO_ADAPTER if seq.adapter_slot is None else seq.adapter_slot
        rows.append(DecodeRow(seq.token_ids[chunk.start], chunk.start, seq.block_table, slot))
    return rows


GraphKey = tuple[int, bool]  # (bucket, some row has an adapter)


class DecodeGraphs:
    """Capture per (bucket, adapters) and replay, for one ``ModelRunner``.

    ``capture=False`` runs the same padded forward over the static buffers eagerly (the CPU
    tests use it to check the bookkeeping without CUDA)."""

    def __init__(self, runner: "ModelRunner", max_batch: int, max_model_len: int,
                 dummy_block: int, capture: bool = True) -> None:
        self.runner = runner
        self.buckets = batch_buckets(max_batch)
        self.block_size = runner.block_size
        self.dummy_block = dummy_block
        self.width = blocks_needed(max_model_len, self.block_size)
        self.capture = capture
        model = runner.model
        self.buffers = StaticBuffers(self.buckets[-1], self.width, model.device)
        backend, pool = runner.adapter_ctx.backend, runner.adapter_ctx.pool
        self.tables = backend.tables(pool, list(model.linear_shapes()))
        self._graphs: dict[GraphKey, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[GraphKey, torch.Tensor] = {}
        self._layout_version = self.tables.layout_version
        self._memory_pool = None
        self.num_captures = 0
        self.num_replays = 0

    def forward(self, key: GraphKey) -> torch.Tensor:
        """The step over the first ``bucket`` rows of the buffers -> logits (bucket, V) f32."""
        bucket, adapters = key
        runner, buffers = self.runner, self.buffers
        ctx = runner.adapter_ctx
        applier = (SlotTableAdapters(ctx.backend, ctx.pool, buffers.row_slots[:bucket])
                   if adapters else NoAdapters())
        step = StepMetadata(buffers.attention_metadata(bucket, self.block_size), applier)
        hidden = runner.model(buffers.input_ids[:bucket], buffers.positions[:bucket], step,
                              runner.kv_cache)
        return runner.model.compute_logits(hidden)

    @torch.inference_mode()
    def run(self, rows: Sequence[DecodeRow]) -> torch.Tensor | None:
        """Logits (len(rows), V) float32 of a decode step, or None past the largest bucket."""
        bucket = bucket_for(len(rows), self.buckets)
        if bucket is None:
            return None
        padded = pad_decode_batch(rows, bucket, self.width, self.block_size, self.dummy_block)
        key = (bucket, padded.has_adapters)
        self.tables.sync()  # adapters loaded or evicted since the last step: rewritten in place
        if self.tables.layout_version != self._layout_version:  # tables reallocated: new addresses
            self._drop_graphs("the adapter slot tables grew")
        self.buffers.fill(padded)
        if not self.capture:
            return self.forward(key)[:len(rows)]
        if key not in self._graphs:
            self._capture(key)
        self._graphs[key].replay()
        self.num_replays += 1
        return self._outputs[key][:len(rows)].clone()

    def _drop_graphs(self, why: str) -> None:
        log.info("CUDA graphs captured again: %s", why)
        self._graphs.clear()
        self._outputs.clear()
        self._layout_version = self.tables.layout_version

    def _capture(self, key: GraphKey) -> None:
        """NOT YET RUN ON A GPU. Warm up once on a side stream (Triton compiles, cuBLAS picks
        its kernels), then capture the forward into a graph that shares one memory pool with
        the graphs captured before it; the buffers hold the step being run, so the warm-up and
        the capture write K/V only where this step writes them anyway."""
        started = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.forward(key)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._memory_pool):
            output = self.forward(key)
        if self._memory_pool is None:
            self._memory_pool = graph.pool()
        self._graphs[key], self._outputs[key] = graph, output
        self.num_captures += 1
        log.info("captured the decode graph for bucket %d (%s) in %.2f s", key[0],
                 "adapters" if key[1] else "base only", time.perf_counter() - started)

    @torch.inference_mode()
    def capture_all(self, progress: Callable[[GraphKey], None] | None = None) -> None:
        """Capture every (bucket, adapters) graph now, largest bucket first (the memory pool
        then fits the smaller ones), over pad rows only."""
        for bucket in reversed(self.buckets):
            pad = DecodeRow(0, 0, [self.dummy_block], NO_ADAPTER)
            self.buffers.fill(pad_decode_batch([pad], bucket, self.width, self.block_size,
                                               self.dummy_block))
            for adapters in (True, False):
                if (bucket, adapters) not in self._graphs:
                    self._capture((bucket, adapters))
                    if progress is not None:
                        progress((bucket, adapters))
