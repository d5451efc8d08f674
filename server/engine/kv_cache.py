"""Paged KV cache: fixed-size blocks of token slots, a free-block allocator, per-step metadata.

A sequence owns a block table (block ids in order); token ``p`` of the sequence lives in slot
``block_table[p // block_size] * block_size + p % block_size`` of the flat cache. One step's
batch is the flattened new tokens of several sequences; ``build_attention_metadata`` turns the
scheduler's view of them (``SeqSlice``) into the index tensors attention needs, once per step.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch


class KVCache:
    """Per-layer key/value tensors of shape (num_blocks, block_size, num_kv_heads, head_dim)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        for name, value in (("num_layers", num_layers), ("num_blocks", num_blocks),
                            ("block_size", block_size), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim)):
            if value < 1:
                raise ValueError(f"KVCache {name} must be >= 1, got {value}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        """Bytes one block takes over all layers, keys and values."""
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * element

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class BlockAllocator:
    """Hands out free block ids; freed blocks are reused first (they are warm in cache)."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pop() gives 0, 1, 2, ...
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self, count: int) -> list[int]:
        """``count`` block ids, or ValueError (and nothing taken) if fewer are free."""
        if count < 0 or count > len(self._free):
            raise ValueError(f"cannot allocate {count} blocks: {len(self._free)} free")
        blocks = [self._free.pop() for _ in range(count)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Return blocks; freeing a block that is not allocated is a bug and raises."""
        unknown = [b for b in blocks if b not in self._used]
        if unknown or len(set(blocks)) != len(blocks):
            raise ValueError(f"freeing blocks that are not allocated (or twice): {blocks}")
        self._used.difference_update(blocks)
        self._free.extend(reversed(blocks))


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


@dataclass(frozen=True)
class SeqSlice:
    """One sequence's part of a step: its blocks, tokens already cached, tokens computed now."""

    block_table: list[int]
    num_cached: int
    num_new: int

    def __post_init__(self) -> None:
        if self.num_cached < 0 or self.num_new < 1:
            raise ValueError(f"need num_cached >= 0 and num_new >= 1, got {self}")

    @property
    def context_len(self) -> int:
        return self.num_cached + self.num_new


@dataclass(frozen=True)
class AttentionMetadata:
    """Everything attention needs about one step's flattened batch (T rows, S sequences)."""

    block_size: int
    slot_mapping: torch.Tensor  # (T,) int64: flat cache slot each new token's K/V is written to
    query_lens: tuple[int, ...]  # (S,): new tokens of each sequence, in batch order
    context_lens: tuple[int, ...]  # (S,): cached + new tokens each sequence attends over
    query_starts: tuple[int, ...]  # (S + 1,): first row of each sequence in the flat batch
    block_tables: tuple[tuple[int, ...], ...]  # (S, blocks_i): the blocks each context spans
    decode_seqs: tuple[int, ...]  # (Sd,): sequences with one new token, attended in one batch
    decode_rows: torch.Tensor  # (Sd,) int64: their rows in the flat batch
    decode_block_tables: torch.Tensor  # (Sd, Bd) int64: their block tables padded with block 0
    decode_context_lens: torch.Tensor  # (Sd,) int64: their context lengths
    decode_mask: torch.Tensor  # (Sd, 1, 1, Bd * block_size) bool: key position < context len
    prefill_seqs: tuple[int, ...]  # (Sp,): sequences with several new tokens, one at a time
    prefill_context_slots: tuple[torch.Tensor | None, ...]  # (Sp,) of (context_len,) int64,
    # the flat slots of the whole context; None where nothing was cached (attend to new K/V)

    @property
    def num_tokens(self) -> int:
        return self.query_starts[-1]

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)


def build_attention_metadata(seqs: list[SeqSlice], block_size: int,
                             device: torch.device | str = "cpu") -> AttentionMetadata:
    """Index tensors for one step; validates that every block table covers its context."""
    _check_block_tables(seqs, block_size)
    query_lens = tuple(s.num_new for s in seqs)
    starts = tuple(itertools.accumulate(query_lens, initial=0))
    decode = tuple(i for i, s in enumerate(seqs) if s.num_new == 1)
    prefill = tuple(i for i, s in enumerate(seqs) if s.num_new > 1)
    tables = tuple(tuple(s.block_table[:blocks_needed(s.context_len, block_size)]) for s in seqs)
    decode_tables, decode_lens, decode_mask = _decode_tensors([seqs[i] for i in decode], block_size,
                                                              device)
    return AttentionMetadata(
        block_size=block_size,
        slot_mapping=_slots(seqs, block_size, new_only=True, device=device),
        query_lens=query_lens,
        context_lens=tuple(s.context_len for s in seqs),
        query_starts=starts,
        block_tables=tables,
        decode_seqs=decode,
        decode_rows=torch.tensor([starts[i] for i in decode], dtype=torch.int64, device=device),
        decode_block_tables=decode_tables,
        decode_context_lens=decode_lens,
        decode_mask=decode_mask,
        prefill_seqs=prefill,
        prefill_context_slots=tuple(
            _slots([seqs[i]], block_size, new_only=False, device=device)
            if seqs[i].num_cached else None for i in prefill),
    )


def _check_block_tables(seqs: list[SeqSlice], block_size: int) -> None:
    if block_size < 1 or not seqs:
        raise ValueError("need block_size >= 1 and at least one sequence")
    for seq in seqs:
        if len(seq.block_table) < blocks_needed(seq.context_len, block_size):
            raise ValueError(f"block table of {len(seq.block_table)} blocks cannot hold "
                             f"{seq.context_len} tokens at block_size {block_size}")


def _slots(seqs: list[SeqSlice], block_size: int, new_only: bool,
           device: torch.device | str) -> torch.Tensor:
    """Flat cache slots of the new tokens (or of the whole context) of ``seqs``, concatenated."""
    parts = []
    for seq in seqs:
        first = seq.num_cached if new_only else 0
        positions = torch.arange(first, seq.context_len)
        table = torch.tensor(seq.block_table, dtype=torch.int64)
        parts.append(table[positions // block_size] * block_size + positions % block_size)
    return torch.cat(parts).to(device)


def _decode_tensors(seqs: list[SeqSlice], block_size: int,
                    device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max((blocks_needed(s.context_len, block_size) for s in seqs), default=0)
    tables = torch.zeros(len(seqs), width, dtype=torch.int64)
    for row, seq in enumerate(seqs):
        used = blocks_needed(seq.context_len, block_size)
        tables[row, :used] = torch.tensor(seq.block_table[:used], dtype=torch.int64)
    lens = torch.tensor([s.context_len for s in seqs], dtype=torch.int64)
    mask = torch.arange(width * block_size).unsqueeze(0) < lens.unsqueeze(1)
    return (tables.to(device), lens.to(device),
            mask.view(len(seqs), 1, 1, width * block_size).to(device))
