"""The device side of a step: flatten the scheduled chunks, run the forward, return logits.

It owns everything on the device: the model (with its projections wrapped for adapters), the
paged KV cache, and the pool of resident adapter weights that the adapter kernels read. On CUDA
(unless ``--enforce-eager``) pure decode steps replay CUDA graphs (``cuda_graphs.py``); the
cache then holds one extra block, the dummy block that padding rows write to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...kernels import (NO_ADAPTER, AdapterContext, AdapterWeightPool, SeqSlice, StepMetadata,
                        build_adapter_batch, build_attention_metadata, get_backend,
                        get_decode_attention)
from .client import KernelBackends
from .cuda_graphs import DecodeGraphs, decode_rows, graphs_unavailable
from .model import LlamaModel
from .scheduler import ScheduledChunk


@dataclass
class StepLogits:
    sample: torch.Tensor  # (N, V) float32: one row per chunk that samples, in chunk order
    prompt: dict[int, torch.Tensor] = field(default_factory=dict)  # chunk index -> (n, V) float32
    # logits of the chunk's rows at prompt positions p < P - 1 (they predict prompt token p + 1)


@dataclass
class FlatBatch:
    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64
    row_slots: list[int]  # (T,) adapter slot per token row, or NO_ADAPTER
    last_rows: list[int]  # (N,) the last row of each sampling chunk


def flatten(chunks: list[ScheduledChunk]) -> FlatBatch:
    """Concatenate the chunks' new tokens into one flat batch of token rows."""
    ids: list[int] = []
    positions: list[int] = []
    row_slots: list[int] = []
    last_rows: list[int] = []
    for chunk in chunks:
        seq = chunk.seq
        ids.extend(seq.token_ids[chunk.start:chunk.end])
        positions.extend(range(chunk.start, chunk.end))
        slot = NO_ADAPTER if seq.adapter_slot is None else seq.adapter_slot
        row_slots.extend([slot] * chunk.num_tokens)
        if chunk.samples:
            last_rows.append(len(ids) - 1)
    return FlatBatch(torch.tensor(ids, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64),
                     row_slots, last_rows)


class ModelRunner:
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int,
                 adapter_backend: str = "auto", adapter_dtype: torch.dtype | None = None,
                 kv_cache_dtype: torch.dtype | None = None, *, enforce_eager: bool = False,
                 max_batch: int = 32, max_model_len: int = 2048) -> None:
        self.model = model
        self.block_size = block_size
        backend = get_backend(adapter_backend, model.device, model.dtype)
        kv_dtype = kv_cache_dtype or model.dtype
        # why decode steps run eagerly (None: they replay CUDA graphs), decided once
        self.graphs_off_reason = graphs_unavailable(
            model.device.type, enforce_eager, backend.name,
            get_decode_attention(model.device.type, kv_dtype).name)
        graphs = self.graphs_off_reason is None
        self.kv_cache = model.make_kv_cache(num_blocks + graphs, block_size, kv_dtype)
        self.pool = AdapterWeightPool(model.device, adapter_dtype or model.dtype)
        self.adapter_ctx = AdapterContext(self.pool, backend)
        self.backends = KernelBackends(adapter=self.adapter_ctx.backend.name,
                                       decode_attention=self.kv_cache.decode_attention.name)
        self.graphs = (DecodeGraphs(self, max_batch, max_model_len, dummy_block=num_blocks)
                       if graphs else None)

    def step_metadata(self, chunks: list[ScheduledChunk], flat: FlatBatch) -> StepMetadata:
        """The step's one value: attention metadata and this step's adapter batch."""
        device = self.model.device
        attention = build_attention_metadata(
            [SeqSlice(c.seq.block_table, c.start, c.num_tokens) for c in chunks],
            self.block_size, device)
        return StepMetadata(attention, self.adapter_ctx.for_step(build_adapter_batch(flat.row_slots, device)))

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> StepLogits:
        if self.graphs is not None:
            rows = decode_rows(chunks)
            logits = self.graphs.run(rows) if rows is not None else None
            if logits is not None:
                return StepLogits(logits)
        device = self.model.device
        flat = flatten(chunks)
        hidden = self.model(flat.input_ids.to(device), flat.positions.to(device),
                            self.step_metadata(chunks, flat), self.kv_cache)
        rows = torch.tensor(flat.last_rows, dtype=torch.int64, device=device)
        return StepLogits(self.model.compute_logits(hidden.index_select(0, rows)),
                          self._prompt_logits(chunks, hidden))

    def _prompt_logits(self, chunks: list[ScheduledChunk], hidden: torch.Tensor) -> dict[int, torch.Tensor]:
        """Logits at prompt positions, only for chunks whose request asked for prompt logprobs."""
        logits: dict[int, torch.Tensor] = {}
        first_row = 0
        for index, chunk in enumerate(chunks):
            last_prompt_pos = min(chunk.end, chunk.seq.num_prompt_tokens - 1)
            if chunk.prompt_logits and last_prompt_pos > chunk.start:
                rows = hidden[first_row:first_row + last_prompt_pos - chunk.start]
                logits[index] = self.model.compute_logits(rows)
            first_row += chunk.num_tokens
        return logits
