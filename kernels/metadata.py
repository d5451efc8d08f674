"""Per-step batch description for the mixed-adapter kernels.

The engine flattens one step into token rows; each row has an adapter slot (an index into the
resident-adapter pool) or ``NO_ADAPTER``. ``build_adapter_batch`` groups rows by slot once per
step; every adapted linear layer of the forward reuses the grouping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Sequence

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
