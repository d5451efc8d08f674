"""The CPU fast path: one fused C++ call per gathered group (cpu_gathered.cpp) serves every
adapted row of a module, however the rows are spread over adapters.

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
from .plan import NEVER_SEGMENT, GatheredGroup, cached_module_plan
from .pool import AdapterWeightPool

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


_ALL_ROWS = torch.empty(0, dtype=torch.int64)


def fused_gathered_apply(y: torch.Tensor, x: torch.Tensor, group: GatheredGroup) -> None:
    spec = group.spec
    rows = _ALL_ROWS if group.rows is None else group.rows
    load_extension().gathered_apply(y, x, rows, group.weight_index, group.A0, group.B0t, group.Au,
                                    group.But, group.scales, spec.reduce_a, spec.reduce_b,
                                    spec.stride_a, spec.stride_b)


class CpuBackend:
    name = "cpu"

    def __init__(self) -> None:
        load_extension()  # compile (or load the cached build) once, at selection time

    def apply(self, y: torch.Tensor, x: torch.Tensor, pool: AdapterWeightPool, module_path: str,
              batch: AdapterBatch) -> None:
        if pool.dtype != torch.float32:
            raise TypeError("the cpu backend runs float32 adapter pools; use the torch backend")
        # The fused call beats BLAS segments here, even for long runs of one adapter.
        plan = cached_module_plan(pool, module_path, batch, NEVER_SEGMENT)
        if plan is None:
            return
        if y.dtype != torch.float32 or not y.is_contiguous():
            raise TypeError("the cpu backend adds into a contiguous float32 output")
        x = x.to(torch.float32).contiguous()
        for group in plan.groups:
            fused_gathered_apply(y, x, group)
