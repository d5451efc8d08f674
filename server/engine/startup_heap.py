"""The objects made at start-up (model modules, tokenizer, FastAPI routes, pydantic schemas, the
registry) live as long as the process: once loaded they are moved out of the cyclic garbage
collector's reach with ``gc.freeze()``, as vLLM's engine does after its start-up.

Why: an oldest-generation collection walks every tracked object while holding the GIL, so the
step thread stops for as long. In the serving process (~480k objects) one took 294 ms; under
load (``bench cold-load``, 16 streams) the longest pause was 275-283 ms and set the p99 of cold
requests' TTFT. After freezing, a full collection walks only what was made since (0.0 ms at
start-up; 16-20 ms at most under that load).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class HeapFreeze:
    """What ``freeze_startup_heap`` did: objects frozen, and a full collection's pause before
    and after (each measured on a collection it ran)."""

    frozen_objects: int
    full_collection_ms_before: float
    full_collection_ms_after: float

    def __str__(self) -> str:
        return (f"froze {self.frozen_objects} start-up objects for the garbage collector: a full "
                f"collection {self.full_collection_ms_before:.1f} ms before, "
                f"{self.full_collection_ms_after:.1f} ms after")


def _full_collection_ms() -> float:
    started = time.perf_counter()
    gc.collect()
    return 1e3 * (time.perf_counter() - started)


def freeze_startup_heap() -> HeapFreeze:
    """Collect once (so no garbage is frozen), freeze what is left, and time a full collection
    again: the second figure is the longest pause the collector can now cause."""
    before = _full_collection_ms()
    gc.freeze()
    after = _full_collection_ms()
    return HeapFreeze(gc.get_freeze_count(), before, after)


def thaw_startup_heap() -> None:
    """Give the frozen objects back to the collector before shutting down: at interpreter exit
    they are then freed as usual (nanobind's extensions, triton's among them, report every
    instance still alive at exit as a leak)."""
    gc.unfreeze()


@contextmanager
def frozen_startup_heap() -> Iterator[HeapFreeze]:
    """``freeze_startup_heap`` for the block, thawed when it ends however it ends."""
    try:
        yield freeze_startup_heap()
    finally:
        thaw_startup_heap()


class CollectorPauses:
    """Every collection's pause while in the ``with`` block (``gc.callbacks``), for benchmarks
    that look for what sets a latency tail."""

    def __init__(self) -> None:
        self.pauses_ms: list[float] = []
        self._started = 0.0

    def _observe(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses_ms.append(1e3 * (time.perf_counter() - self._started))

    def __enter__(self) -> "CollectorPauses":
        gc.callbacks.append(self._observe)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._observe)

    def summary(self) -> dict[str, int | float]:
        return {"collections": len(self.pauses_ms), "total_ms": sum(self.pauses_ms),
                "longest_ms": max(self.pauses_ms, default=0.0)}
