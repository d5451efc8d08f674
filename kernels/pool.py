"""Device-resident compact weights of the resident adapters, indexed by slot and module.

Each adapter keeps its own exact-size tensors (A0/B0/Au/Bu) in one allocation, so resident
bytes equal the compact parameter bytes: nothing is padded to a common rank and nothing is
materialized. The CPU and Triton kernels read these tensors in place through slot tables
(``slot_tables.py``, kept in step with ``version``); the torch backend stacks them per step
layout (``plan.py``), cached in ``plan_cache``, which is dropped on every load/unload.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable
from functools import lru_cache

import torch

from ..adapters.config import LayerSpec
from ..adapters.errors import AdapterFormatError
from ..adapters.weights import (TENSOR_NAMES, CompactAdapter, CompactLinearWeights, FlatAdapter,
                                FlatLayout, ViewPlace, views_of)
from .slot_tables import prepare_rows


def kernel_layout(adapter: CompactAdapter, device: torch.device, dtype: torch.dtype) -> FlatAdapter:
    """The resident layout: all of an adapter's tensors in one allocation, module after module,
    each as A0 (R, cA), Au (u, h), B0^T (R, cB), Bu^T (u, o) row-major, so kernels read
    contiguous runs of output features and a row's weights sit on few pages. Exactly the compact
    bytes; B0 and Bu are views of their transposed storage with the usual shapes, and the views
    are made here (the step thread installs the result)."""
    if isinstance(adapter, FlatAdapter):  # one gather from the flat data; views made once
        layout = resident_layout(adapter.layout)
        source = adapter.flat.to(dtype=dtype)  # no copy where the dtypes agree
        arena = torch.empty(layout.num_elements, dtype=dtype, device=source.device)
        torch.index_select(source, 0, _gather_index(adapter.layout), out=arena)
        return _with_views(layout, arena.to(device))
    modules = tuple((path, w.spec) for path, w in adapter.modules.items())
    sources = [part for w in adapter.modules.values() for part in w.tensors()]
    layout = FlatLayout(adapter.config, modules, _resident_places(t.shape for t in sources),
                        adapter.num_params)
    arena = torch.empty(layout.num_elements, dtype=dtype, device=device)
    # One view each and one batched copy: per-tensor ops cost microseconds each, and an
    # adapter on all seven projections of a 30-layer model has 840 tensors.
    views = views_of(arena, layout.places)
    torch._foreach_copy_(views, sources)
    return FlatAdapter(layout, arena, views)


def _copied_to(laid_out: FlatAdapter, device: torch.device) -> FlatAdapter:
    """A laid-out adapter on another device: one copy of its one allocation."""
    return _with_views(laid_out.layout, laid_out.flat.to(device))


def _with_views(layout: FlatLayout, arena: torch.Tensor) -> FlatAdapter:
    adapter = FlatAdapter(layout, arena)
    adapter.modules  # made now, on the thread laying it out, not on the step thread's install
    return adapter


@lru_cache(maxsize=64)
def resident_layout(layout: FlatLayout) -> FlatLayout:
    """Where ``kernel_layout`` puts the tensors of an adapter laid out as ``layout`` (the same
    object for every adapter of one layout, so what is derived from it is cached once)."""
    shapes = (shape for shape, _, _ in layout.places)
    return FlatLayout(layout.config, layout.modules, _resident_places(shapes), layout.num_elements)


def _resident_places(shapes: Iterable[tuple[int, int] | torch.Size]) -> tuple[ViewPlace, ...]:
    """Where ``kernel_layout`` puts each of A0, B0, Au, Bu (listed module after module in that
    order): each module's four in the order the kernels read them, A0 and Au (the shrink) then
    B0 and Bu (the expand), so one row's reads of a module are one forward run (a step's 120
    adapter calls with 32 distinct adapters not in cache: 3-5% less time than A0, B0, Au, Bu).
    B0 and Bu (the odd ones) are stored transposed, so their views have column-major strides."""
    shapes = list(shapes)
    places: list[ViewPlace] = []
    offset = 0
    for first in range(0, len(shapes), 4):
        module = shapes[first:first + 4]
        offsets = [0] * len(module)
        for index in _READ_ORDER:
            rows, cols = module[index]
            offsets[index] = offset
            offset += rows * cols
        places += [((rows, cols), (1, rows) if index % 2 else (cols, 1), offsets[index])
                   for index, (rows, cols) in enumerate(module)]
    return tuple(places)


_READ_ORDER = (0, 2, 1, 3)  # A0, Au, B0^T, Bu^T


@lru_cache(maxsize=4)  # int32, 4 bytes per parameter: 3.2 MB for the default model's r=8 adapter
def _gather_index(layout: FlatLayout) -> torch.Tensor:
    """For each element of ``resident_layout(layout)``, the index of its value in a flat tensor
    laid out as ``layout``: the resident layout is one ``index_select`` of the file's data."""
    resident = resident_layout(layout)
    index = torch.empty(layout.num_elements, dtype=torch.int32)
    positions = torch.arange(layout.num_elements, dtype=torch.int32)
    torch._foreach_copy_(views_of(index, resident.places), views_of(positions, layout.places))
    return index


def resident_identity(laid_out: FlatAdapter) -> bytes:
    """A 16-byte SHA-256 prefix of a ``kernel_layout``-ed adapter: its config, each module's
    path and spec in layout order, and the bytes of its one allocation (what the kernels read),
    hashed in one pass. Equal identities, equal deltas, whatever the adapter's id: prefix-cached
    KV blocks are keyed by it. SHA-256, not BLAKE2b: processors with SHA extensions hash it
    three times faster (1.1 against 3.3 ms for a 1.6 MB adapter here), on a cold load's path."""
    if not isinstance(laid_out, FlatAdapter):
        raise ValueError("not a kernel_layout-ed adapter: its tensors are not one allocation")
    hasher = _layout_digest(laid_out.layout).copy()
    if laid_out.flat.numel():
        hasher.update(laid_out.flat.view(torch.uint8).cpu().numpy())
    return hasher.digest()[:16]


@lru_cache(maxsize=64)
def _layout_digest(layout: FlatLayout) -> "hashlib._Hash":
    """The hash of the layout's config and module specs, to be copied and fed the weights."""
    hasher = hashlib.sha256()
    hasher.update(json.dumps(layout.config.to_json_dict(), sort_keys=True).encode())
    hasher.update("\n".join(f"{path}:{_spec_text(spec)}" for path, spec in layout.modules).encode())
    return hasher


@lru_cache(maxsize=4096)
def _spec_text(spec: LayerSpec) -> str:
    return repr(spec)  # ~3 us each, 210 per adapter: a load's identity pays it once per spec


class AdapterWeightPool:
    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self._adapters: dict[int, FlatAdapter] = {}
        self._modules: dict[str, dict[int, CompactLinearWeights]] = {}
        self._lock = threading.Lock()
        self.version = 0  # bumped on every load/unload; cached plans keyed on it
        self.plan_cache: dict = {}

    def load(self, slot: int, adapter: CompactAdapter) -> None:
        """Copy an adapter's compact weights to the device into ``slot`` (which must be free)."""
        self.install(slot, self.layout(adapter))

    def layout(self, adapter: CompactAdapter) -> FlatAdapter:
        """The adapter in this pool's resident layout and dtype, in host memory (so a loader
        thread can prepare it; on the CPU this is the resident copy itself)."""
        laid_out = kernel_layout(adapter, torch.device("cpu"), self.dtype)
        if self.device.type == "cpu":  # the resident copy itself: its table rows are known now
            prepare_rows(laid_out)
        return laid_out

    def host_layout(self, slot: int) -> FlatAdapter:
        """``slot``'s weights in host memory, in the resident layout (on the CPU: the resident
        copy itself, nothing is copied), for a host tier to keep."""
        with self._lock:
            resident = self._adapters[slot]
        return resident if self.device.type == "cpu" else _copied_to(resident, torch.device("cpu"))

    def install(self, slot: int, laid_out: FlatAdapter) -> None:
        """Put a ``layout``-ed adapter in ``slot``: no copy on the CPU, one copy of its one
        allocation onto another device."""
        if slot < 0:
            raise ValueError(f"slot must be >= 0, got {slot}")
        if not isinstance(laid_out, FlatAdapter) or laid_out.flat.dtype != self.dtype:
            raise ValueError(f"install takes an adapter laid out by this pool's layout() "
                             f"(one {self.dtype} allocation)")
        resident = laid_out if self.device.type == "cpu" else _copied_to(laid_out, self.device)
        with self._lock:
            if slot in self._adapters:
                raise ValueError(f"slot {slot} is already occupied")
            self._adapters[slot] = resident
            for path, weights in resident.modules.items():
                self._modules.setdefault(path, {})[slot] = weights
            self._invalidate()

    def check_representable(self, adapter: CompactAdapter) -> None:
        """Raise AdapterFormatError if a weight overflows the pool dtype (float16 ends at 65504),
        before the adapter is admitted, rather than serving infinities."""
        limit = torch.finfo(self.dtype).max
        if isinstance(adapter, FlatAdapter):  # one dtype, one tensor: one look, views to name one
            flat = adapter.flat
            if (torch.finfo(flat.dtype).max <= limit or not flat.numel()
                    or float(flat.abs().max()) <= limit):
                return
        wider = {dtype for dtype in {t.dtype for w in adapter.modules.values() for t in w.tensors()}
                 if torch.finfo(dtype).max > limit}
        if not wider:  # the common case (fp16 files, an fp16 pool): no tensor to look at
            return
        named = [(f"{path}.{name}", t) for path, w in adapter.modules.items()
                 for name, t in zip(TENSOR_NAMES, w.tensors()) if t.numel() and t.dtype in wider]
        if not named:
            return
        peaks = torch._foreach_norm([t.float() for _, t in named], float("inf"))
        for (name, _), peak in zip(named, peaks):
            if float(peak) > limit:
                raise AdapterFormatError(
                    f"{name}: a weight of magnitude {float(peak):.3g} does not fit the adapter "
                    f"dtype {self.dtype} (max {limit:.3g}); serve with --adapter-dtype fp32")

    def unload(self, slot: int) -> None:
        with self._lock:
            adapter = self._adapters.pop(slot)
            for path in adapter.modules:
                entries = self._modules[path]
                del entries[slot]
                if not entries:
                    del self._modules[path]
            self._invalidate()

    def _invalidate(self) -> None:
        self.version += 1
        self.plan_cache = {}

    def resident(self) -> dict[int, FlatAdapter]:
        """Slot -> resident adapter, as of now."""
        with self._lock:
            return dict(self._adapters)

    def module(self, module_path: str) -> dict[int, CompactLinearWeights] | None:
        """Slot -> weights of every resident adapter that targets ``module_path``."""
        return self._modules.get(module_path)

    def slot_nbytes(self, slot: int) -> int:
        return self._adapters[slot].nbytes

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._adapters.values())

    @property
    def slots(self) -> set[int]:
        return set(self._adapters)
