"""Paged KV cache: fixed-size blocks of token slots and a free-block allocator.

A sequence owns a block table (block ids in order); token ``p`` of the sequence lives in slot
``block_table[p // block_size] * block_size + p % block_size`` of the flat cache. The per-step
index tensors attention reads are built in ``kernels/metadata.py`` (``build_attention_metadata``).
"""

from __future__ import annotations

from collections import OrderedDict

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


BlockHash = bytes  # identifies a full block's content: see prefix_cache.py


class BlockAllocator:
    """Hands out block ids with reference counts; freed blocks are reused first (they are warm).

    With prefix caching, a full block whose content is known can be ``register``-ed under its
    hash; when its last reference is freed it stays cached (evictable, least recently freed
    first) and ``lookup`` hands it to a later sequence with the same prefix. Blocks with no
    cached content are always allocated before cached ones are evicted.
    """

    def __init__(self, num_blocks: int, caching: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.caching = caching
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pop() gives 0, 1, 2, ...
        self._refs: dict[int, int] = {}  # block -> references (every block in use is here)
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; LRU first
        self._by_hash: dict[BlockHash, int] = {}
        self._hash_of: dict[int, BlockHash] = {}
        self.hits = 0  # blocks handed out by lookup
        self.queries = 0  # blocks asked for by lookup

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return len(self._refs)

    @property
    def num_cached(self) -> int:
        """Blocks holding registered content, in use or evictable."""
        return len(self._hash_of)

    def allocate(self, count: int) -> list[int]:
        """``count`` block ids, or ValueError (and nothing taken) if fewer are free."""
        if count < 0 or count > self.num_free:
            raise ValueError(f"cannot allocate {count} blocks: {self.num_free} free")
        blocks = [self._take_free() for _ in range(count)]
        for block in blocks:
            self._refs[block] = 1
        return blocks

    def _take_free(self) -> int:
        if self._free:
            return self._free.pop()
        block, _ = self._evictable.popitem(last=False)  # the least recently used cached block
        del self._by_hash[self._hash_of.pop(block)]
        return block

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; freeing a block that is not allocated is a bug
        and raises. A cached block without references stays cached until it is evicted."""
        unknown = [b for b in blocks if b not in self._refs]
        if unknown or len(set(blocks)) != len(blocks):
            raise ValueError(f"freeing blocks that are not allocated (or twice): {blocks}")
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block]:
                continue
            del self._refs[block]
            if block in self._hash_of:
                self._evictable[block] = None
            else:
                self._free.append(block)

    def register(self, block: int, block_hash: BlockHash) -> None:
        """Cache a full, computed block under its content hash (first block wins a hash)."""
        if not self.caching or block in self._hash_of or block_hash in self._by_hash:
            return
        if block not in self._refs:
            raise ValueError(f"registering block {block}, which is not allocated")
        self._by_hash[block_hash] = block
        self._hash_of[block] = block_hash

    def lookup(self, hashes: list[BlockHash]) -> list[int]:
        """The cached blocks of the longest prefix of ``hashes``, each with a new reference."""
        if not self.caching or not hashes:
            return []
        found: list[int] = []
        for block_hash in hashes:
            block = self._by_hash.get(block_hash)
            if block is None:
                break
            found.append(block)
        for block in found:
            self._evictable.pop(block, None)
            self._refs[block] = self._refs.get(block, 0) + 1
        self.queries += len(hashes)
        self.hits += len(found)
        return found
