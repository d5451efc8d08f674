"""Single-file adapters whose safetensors header this process has already validated load by
checking only their values.

A header fixes everything ``format.load_adapter`` checks except the values: the config (in the
metadata), the module dims, and each tensor's key, dtype, shape and place in the data section.
A file whose header is byte-identical to that of a file that passed the full validation against
the same base shapes would pass it too, unless a value is NaN or Inf. Adapters trained with one
recipe on one base model share their header up to the config's values, and identical configs
are common (a product's thousands of per-customer adapters), so the engine's cold loads skip the
Python-heavy checks of 840 tensors: the values are checked for finiteness in one pass and the
adapter is the file's one buffer with the places of its tensors (``FlatAdapter``), which the
pool lays out in one gather without making the 840 views. Anything else (a header not seen
yet, mixed dtypes, a non-finite value) takes the full path, whose errors name the culprit.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from . import format as adapter_format
from .state_dict import LinearShapes, tensor_key
from .weights import TENSOR_NAMES, CompactAdapter, FlatAdapter, FlatLayout

HEADER_LENGTH_BYTES = 8  # safetensors: little-endian u64 header length, then the JSON header
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                       "F64": torch.float64}


@dataclass(frozen=True)
class _Structure:
    """What the full validation of one file found, for every file with the same header."""

    dtype: torch.dtype
    data_start: int  # bytes
    layout: FlatLayout  # where each tensor lies among the data's elements

    def build(self, data: bytearray) -> FlatAdapter | None:
        """The adapter over ``data`` (its views are made on first use); None if a value is not
        finite or the data is not exactly as long as the header says."""
        count = self.layout.num_elements
        if len(data) != self.data_start + count * _itemsize(self.dtype):
            return None
        flat = torch.frombuffer(data, dtype=self.dtype, count=count, offset=self.data_start)
        return FlatAdapter(self.layout, flat) if _all_finite(flat) else None


def _all_finite(flat: torch.Tensor) -> bool:
    """A sum is finite unless a value is NaN or infinite or the sum overflows (finite float16
    weights can sum past 65504); only a non-finite sum takes the elementwise check, which costs
    ten times as much. The sum in the data's own dtype: asking for float32 converts the whole
    tensor first."""
    return bool(torch.isfinite(flat.sum())) or bool(torch.isfinite(flat).all())


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _structure_of(adapter: CompactAdapter, header: dict, data_start: int,
                  data_bytes: int) -> _Structure | None:
    """The structure of a validated file, or None where views could not reproduce it (mixed
    dtypes, misaligned data)."""
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    dtypes = {v.get("dtype") for v in entries.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _SAFETENSORS_DTYPES:
        return None
    dtype = _SAFETENSORS_DTYPES[next(iter(dtypes))]
    itemsize = _itemsize(dtype)
    if data_start % itemsize or data_bytes % itemsize:
        return None
    lora = adapter.config.is_plain_lora
    spans = sorted((v["data_offsets"][0], v["data_offsets"][1], k) for k, v in entries.items())
    if spans[0][0] != 0 or spans[-1][1] != data_bytes or any(
            a[1] != b[0] for a, b in zip(spans, spans[1:])):
        return None
    modules, places, used = [], [], 0
    for path, weights in adapter.modules.items():
        for name, tensor in zip(TENSOR_NAMES, weights.tensors()):
            entry = entries.get(tensor_key(path, name, lora))
            rows, cols = tensor.shape
            if entry is None:
                if tensor.numel() or tensor.dtype != dtype:
                    return None
                places.append(((rows, cols), (cols, 1), 0))
                continue
            start, end = entry["data_offsets"]
            if (tuple(entry["shape"]) != (rows, cols) or end - start != tensor.numel() * itemsize
                    or start % itemsize):
                return None
            places.append(((rows, cols), (cols, 1), start // itemsize))
            used += 1
        modules.append((path, weights.spec))
    if used != len(entries):
        return None  # a tensor the adapter does not use
    return _Structure(dtype, data_start, FlatLayout(adapter.config, tuple(modules), tuple(places),
                                                    data_bytes // itemsize))


class KnownHeaders:
    """``load(path)``: ``format.load_adapter`` for single files, fast for known headers. Holds
    at most ``capacity`` structures (least recently used dropped); safe from any thread."""

    def __init__(self, linear_shapes: LinearShapes, capacity: int = 256) -> None:
        self.linear_shapes = dict(linear_shapes)
        self.capacity = capacity
        self.fast_loads = self.full_loads = 0
        self._known: OrderedDict[bytes, _Structure | None] = OrderedDict()  # header digest ->
        self._lock = threading.Lock()

    def load(self, path: Path) -> CompactAdapter:
        data = adapter_format.read_file(path)
        raw = _raw_header(data)
        seen = self._lookup(raw) if raw is not None else _Seen(False, None)
        adapter = seen.structure.build(data) if seen.structure is not None else None
        if adapter is not None:
            self.fast_loads += 1
            return adapter
        adapter = adapter_format.load_adapter_bytes(None, bytes(data), self.linear_shapes,
                                                    source=str(path))
        self.full_loads += 1
        if not seen.known and seen.header is not None:
            data_start = HEADER_LENGTH_BYTES + len(raw)
            learned = _structure_of(adapter, seen.header, data_start, len(data) - data_start)
            with self._lock:
                self._remember(seen.canonical, learned)
                self._remember(seen.spelling, learned)
        return adapter

    def _lookup(self, raw: bytes) -> "_Seen":
        """By the header's bytes; else by its canonical JSON (safetensors writes its metadata
        map in any order, so one header has several spellings), remembering this spelling."""
        spelling = _key(b"raw", raw)
        with self._lock:
            if spelling in self._known:
                self._known.move_to_end(spelling)
                return _Seen(True, self._known[spelling])
        header = _parse(raw)
        if header is None:
            return _Seen(False, None)
        canonical = _canonical(header)
        with self._lock:
            if canonical in self._known:
                self._remember(spelling, self._known[canonical])
                return _Seen(True, self._known[canonical])
        return _Seen(False, None, header, canonical, spelling)

    def _remember(self, key: bytes, structure: _Structure | None) -> None:
        self._known[key] = structure
        self._known.move_to_end(key)
        while len(self._known) > self.capacity:
            self._known.popitem(last=False)


@dataclass(frozen=True)
class _Seen:
    """What the memo knows of a header: ``known`` (learnable or not: ``structure`` None), else
    the parsed header and its keys, to learn it from the full validation."""

    known: bool
    structure: _Structure | None
    header: dict | None = None
    canonical: bytes = b""
    spelling: bytes = b""


def _raw_header(data: bytearray) -> bytes | None:
    if len(data) < HEADER_LENGTH_BYTES:
        return None
    length = int.from_bytes(data[:HEADER_LENGTH_BYTES], "little")
    if length > len(data) - HEADER_LENGTH_BYTES:
        return None
    return bytes(data[HEADER_LENGTH_BYTES:HEADER_LENGTH_BYTES + length])


def _parse(raw: bytes) -> dict | None:
    """The header's JSON object, or None where it is not one (the full path says why)."""
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return header if isinstance(header, dict) else None


def _canonical(header: dict) -> bytes:
    return _key(b"canonical", json.dumps(header, sort_keys=True, separators=(",", ":")).encode())


def _key(kind: bytes, text: bytes) -> bytes:
    """Headers are ~100 KB: the memo keeps 16-byte BLAKE2b digests of them."""
    return hashlib.blake2b(text, digest_size=16, person=kind.ljust(16, b"\0")).digest()
