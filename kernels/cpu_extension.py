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
    cpu = " ".join(sorted(cpu_flags())) or platform.processor()
    digest = hashlib.sha1(f"{platform.machine()} {cpu}".encode())
    for name in SOURCES + HEADERS:
        digest.update((HERE / name).read_bytes())
    return digest.hexdigest()[:10]


# Which lane code a build compiles (cpu_lanes.h): the best this processor has, or one chosen so
# tests check each kind against the references on one machine.
LANE_FLAGS = {"native": [], "avx2": ["-mno-avx512f"], "portable": ["-DPROLORA_PORTABLE_LANES"]}
AVX2_LANE_CPU_FLAGS = ("avx2", "fma", "f16c")  # what the AVX2 lanes need of the processor


@lru_cache(maxsize=len(LANE_FLAGS))
def load_extension(lanes: str = "native") -> ModuleType:
    """The compiled kernels with ``lanes`` (``LANE_FLAGS``): ``native`` is AVX-512 where the
    processor has it, else AVX2 where it has AVX2, FMA and F16C, else the portable array; ``avx2``
    (an AVX-512 build without it: needs ``AVX2_LANE_CPU_FLAGS``) and ``portable`` are for tests."""
    from torch.utils.cpp_extension import load

    flags = ["-O3", "-march=native", "-fopenmp", *LANE_FLAGS[lanes]]
    suffix = "" if lanes == "native" else f"_{lanes}"
    return load(name=f"prolora_cpu_kernels_{_build_tag()}{suffix}",
                sources=[str(HERE / name) for name in SOURCES], extra_cflags=flags,
                extra_ldflags=["-fopenmp"], verbose=False)


def cpu_flags() -> set[str]:
    """This processor's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


def lane_builds_here() -> tuple[str, ...]:
    """The lane builds this processor can run: every one but ``avx2`` where it lacks AVX2."""
    return tuple(lanes for lanes in LANE_FLAGS
                 if lanes != "avx2" or set(AVX2_LANE_CPU_FLAGS) <= cpu_flags())
