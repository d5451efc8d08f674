"""The CPU fast path: one fused C++ call per gathered group (cpu_gathered.cpp), torch matmuls
(BLAS) for large per-adapter segments.

A gathered group done with torch ops costs about ten small kernel launches per adapted layer;
on a CPU those fixed costs dominate decode, so the group is fused into one call compiled on
first use (torch.utils.cpp_extension, cached by the torch extensions directory). Semantics are
those of torch_backend.py; the float64 reference checks both.
"""

from __future__ import annotations

import hashlib
import platform
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch

from .metadata import AdapterBatch
from .plan import GatheredGroup, cached_module_plan
from .pool import AdapterWeightPool
from .torch_backend import accumulate_rows, segment_delta

SOURCE = Path(__file__).with_name("cpu_gathered.cpp")


def _machine_tag() -> str:
    """Builds use -march=native, so the cached build is keyed to this processor."""
    try:
        cpu = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    return hashlib.sha1(f"{platform.machine()} {cpu}".encode()).hexdigest()[:10]


@lru_cache(maxsize=1)
def load_extension() -> ModuleType:
    from torch.utils.cpp_extension import load

    return load(name=f"prolora_cpu_gathered_{_machine_tag()}", sources=[str(SOURCE)],
                extra_cflags=["-O3", "-march=native", "-fopenmp-simd"], verbose=False)


def fused_gathered_delta(x: torch.Tensor, group: GatheredGroup) -> torch.Tensor:
    spec = group.spec
    return load_extension().gathered_delta(
        x.contiguous(), group.A0, group.B0t, group.Au, group.But, group.scales,
        spec.out_features, spec.reduce_a, spec.reduce_b, spec.stride_a, spec.stride_b)


class CpuBackend:
    name = "cpu"

    def __init__(self) -> None:
        load_extension()  # compile (or load the cached build) once, at selection time

    def apply(self, y: torch.Tensor, x: torch.Tensor, pool: AdapterWeightPool, module_path: str,
              batch: AdapterBatch) -> None:
        if pool.dtype != torch.float32:
            raise TypeError("the cpu backend runs float32 adapter pools; use the torch backend")
        plan = cached_module_plan(pool, module_path, batch)
        if plan is None:
            return
        x = x.to(torch.float32)
        for segment in plan.segments:
            accumulate_rows(y, x, segment.rows, segment_delta, segment)
        for group in plan.groups:
            accumulate_rows(y, x, group.rows, fused_gathered_delta, group)
