"""Paged KV cache: fixed-size blocks of token slots and a free-block allocator.

A sequence owns a block table (block ids in order); token ``p`` of the sequence lives in slot
``block_table[p // block_size] * block_size + p % block_size`` of the flat cache. The per-step
index tensors attention reads are built in ``kernels/metadata.py`` (``build_attention_metadata``).
"""

from __future__ import annotations

import torch

from ...kernels.attention import DecodeAttention, get_decode_attention


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
        # how this cache's decode rows are attended: chosen once for its device and dtype
        self.decode_attention: DecodeAttention = get_decode_attention(torch.device(device).type, dtype)
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
