"""torch's CPU thread pool belongs to the thread that runs the steps; every other thread that
touches tensors (the adapter loader, upload validation) computes on its own core.

Why: libgomp gives each thread that opens a parallel region its own team of worker threads. Once
a second team exists the process manages more OpenMP threads than there are CPUs, and libgomp
then throttles every team's spin-wait to about 100 iterations: the step thread's workers fall
asleep between regions, so each of a decode step's several hundred parallel regions (every
adapter kernel call, every matmul) pays a futex wake-up. Measured on the 2-core CPU machine: a
40,000-element in-place multiply took 6.2 us before one adapter load on a loader thread and 22.5
us after it, for the rest of the process; a 32-row adapter kernel call 21 us on one thread, 77 us
on two once throttled. A thread confined here runs its tensor work inline (ATen's parallel_for
sees one thread), never starts a team, and leaves the step thread's workers spinning.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, ParamSpec, TypeVar

import torch

log = logging.getLogger(__name__)
OPENMP_RUNTIMES = ("libgomp.so.1", "libiomp5.so", "libomp.so")  # GNU (torch's wheels), Intel, LLVM
P = ParamSpec("P")
R = TypeVar("R")
_confined = threading.local()


@functools.cache
def _set_this_thread_openmp_threads() -> Callable[[int], None] | None:
    """``omp_set_num_threads`` of the OpenMP runtime torch has already loaded (never loads one)."""
    for name in OPENMP_RUNTIMES:
        try:
            runtime = ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        except OSError:
            continue
        setter = runtime.omp_set_num_threads
        setter.argtypes, setter.restype = [ctypes.c_int], None
        return setter
    log.info("no OpenMP runtime loaded: helper threads cannot be kept off torch's thread pool")
    return None


def confine_this_thread() -> None:
    """Make the calling thread's torch ops single-threaded, leaving every other thread as it is
    (``torch.set_num_threads`` would change the default of threads started later, too)."""
    if getattr(_confined, "done", False):
        return
    torch.get_num_threads()  # ATen sets each thread's OpenMP count on first use; do that first
    setter = _set_this_thread_openmp_threads()
    if setter is not None:
        setter(1)
    _confined.done = True


def run_on_passing_thread(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """``fn`` on a thread of its own that ends when it returns, and with it the OpenMP team its
    tensor work opened: for loading a model before another thread runs the steps."""
    with ThreadPoolExecutor(1, thread_name_prefix="passing") as once:
        return once.submit(fn, *args, **kwargs).result()


def off_the_step_thread(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` run on a confined thread: for work handed to a thread pool (uploads, deletes)."""
    @functools.wraps(fn)
    def confined(*args: P.args, **kwargs: P.kwargs) -> R:
        confine_this_thread()
        return fn(*args, **kwargs)
    return confined
