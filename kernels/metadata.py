"""Per-step batch descriptions the kernels read: attention metadata and the adapter batch.

The engine flattens one step into token rows of several sequences. ``build_attention_metadata``
turns the scheduler's view of them (``SeqSlice``: block table, cached and new tokens) into the
index tensors paged attention reads. Each row also has an adapter slot (an index into the
resident-adapter pool) or ``NO_ADAPTER``; ``build_adapter_batch`` groups rows by slot once per
step, and every adapted projection of the forward reuses the grouping. Both travel down the
forward as one value, ``StepMetadata``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Final, Protocol, Sequence

import torch

NO_ADAPTER: Final[int] = -1
"""Slot value of a token row that uses the base model only."""


@dataclass(frozen=True)
class AdapterBatch:
    row_slots: torch.Tensor  # (T,) int64: adapter slot of each token row, or NO_ADAPTER
    slots: tuple[int, ...]  # (S,) distinct adapter slots present, ascending; NO_ADAPTER excluded
    slot_rows: tuple[torch.Tensor, ...]  # (S,) of (T_s,) int64: the rows of each slot, ascending
    signature: tuple[int, ...]  # (T,) row_slots as a tuple: equal signatures share kernel plans

    @property
    def num_rows(self) -> int:
        return len(self.signature)

    @property
    def has_adapters(self) -> bool:
        return len(self.slots) > 0


def build_adapter_batch(row_slots: Sequence[int], device: torch.device | str = "cpu") -> AdapterBatch:
    """Group token rows by adapter slot.

    >>> b = build_adapter_batch([3, NO_ADAPTER, 3, 0])
    >>> b.slots, [r.tolist() for r in b.slot_rows]
    ((0, 3), [[3], [0, 2]])
    """
    values = [int(s) for s in row_slots]
    if any(s < 0 and s != NO_ADAPTER for s in values):
        raise ValueError(f"adapter slots must be >= 0 or NO_ADAPTER, got {values}")
    rows_of: dict[int, list[int]] = {}
    for row, slot in enumerate(values):
        if slot != NO_ADAPTER:
            rows_of.setdefault(slot, []).append(row)
    slots = tuple(sorted(rows_of))
    slot_rows = tuple(torch.tensor(rows_of[s], dtype=torch.int64, device=device) for s in slots)
    return AdapterBatch(torch.tensor(values, dtype=torch.int64, device=device), slots, slot_rows,
                        tuple(values))


# --- attention ---------------------------------------------------------------------------------
def blocks_needed(num_tokens: int, block_size: int) -> int:
    """KV blocks that hold ``num_tokens`` tokens."""
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


# --- the step's one value ----------------------------------------------------------------------
class AdapterApplier(Protocol):
    """Adds each row's adapter delta to a projection's base output, for one step."""

    def apply(self, module_path: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """``y[t] += scale_a * delta_a(x[t])`` for every row t whose adapter targets the module."""

    def apply_many(self, module_paths: Sequence[str], x: torch.Tensor,
                   ys: Sequence[torch.Tensor]) -> None:
        """``apply`` for projections that read the same ``x`` (q, k, v; gate, up), at once."""


class NoAdapters:
    """A step on the base model alone: every projection is its base layer."""

    def apply(self, module_path: str, x: torch.Tensor, y: torch.Tensor) -> None:
        return None

    def apply_many(self, module_paths: Sequence[str], x: torch.Tensor,
                   ys: Sequence[torch.Tensor]) -> None:
        return None


@dataclass(frozen=True)
class StepMetadata:
    """Everything a forward needs about its step besides the token ids and positions."""

    attention: AttentionMetadata
    adapters: AdapterApplier = field(default_factory=NoAdapters)
