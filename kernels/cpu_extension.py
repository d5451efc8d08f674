"""Builds (once per machine and source) and loads the C++ CPU kernels: the fused adapter kernel
(cpu_gathered.cpp) and paged decode attention (cpu_attention.cpp), bound in cpu_bindings.cpp.

The build uses ``-march=native`` and OpenMP: ``at::parallel_for`` in the kernels runs on torch's
own OpenMP thread pool (the library's soname is already loaded by torch, so no second runtime).
"""

from __future__ import annotations

import hashlib
import platform
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch

HERE = Path(__file__).parent
SOURCES = ("cpu_bindings.cpp", "cpu_gathered.cpp", "cpu_attention.cpp")
HEADERS = ("cpu_kernels.h", "cpu_lanes.h")
ELEMENT_TYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # cpu_kernels.h


def _build_tag() -> str:
    """Builds use -march=native, so the cached build is keyed to this processor and the sources."""
    try:
        cpu = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    digest = hashlib.sha1(f"{platform.machine()} {cpu}".encode())
    for name in SOURCES + HEADERS:
        digest.update((HERE / name).read_bytes())
    return digest.hexdigest()[:10]


@lru_cache(maxsize=2)
def load_extension(portable_lanes: bool = False) -> ModuleType:
    """The compiled kernels; ``portable_lanes`` builds the plain-C++ lane code that machines
    without AVX-512 get (tests check it against the references on this machine too)."""
    from torch.utils.cpp_extension import load

    flags = ["-O3", "-march=native", "-fopenmp"]
    if portable_lanes:
        flags.append("-DPROLORA_PORTABLE_LANES")
    return load(name=f"prolora_cpu_kernels_{_build_tag()}{'_portable' if portable_lanes else ''}",
                sources=[str(HERE / name) for name in SOURCES], extra_cflags=flags,
                extra_ldflags=["-fopenmp"], verbose=False)
