"""Block hashes for automatic prefix caching.

A full KV block is identified by the chain of everything that determines its keys and values:
the adapter's identity (a digest of its weights and config, never its id: a deleted and
re-uploaded id with new weights must never reuse the old blocks) and every token id up to the
block's end. ``h_0 = H(identity, tokens of block 0)``, ``h_i = H(h_{i-1}, tokens of block i)``,
with H = BLAKE2b-128, so equal hashes mean equal prefixes on the same weights.
"""

from __future__ import annotations

import hashlib
from array import array
from typing import Sequence as Seq

BASE_IDENTITY = b"base-model"  # rows without an adapter


def block_hashes(token_ids: Seq[int], block_size: int, identity: bytes,
                 known: list[bytes]) -> list[bytes]:
    """The hashes of every full block of ``token_ids``, extending the ``known`` chain."""
    hashes = list(known)
    for index in range(len(hashes), len(token_ids) // block_size):
        digest = hashlib.blake2b(hashes[-1] if hashes else identity, digest_size=16)
        digest.update(array("q", token_ids[index * block_size:(index + 1) * block_size]).tobytes())
        hashes.append(digest.digest())
    return hashes
