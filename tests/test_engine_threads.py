"""Only the step thread runs torch's OpenMP pool: helper threads never start a team of their own
(a second team throttles the step thread's spin-waits, server/engine/threads.py)."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import pytest
import torch

from prolora_serve.adapters.registry import AdapterNotFoundError
from prolora_serve.kernels import AdapterWeightPool
from prolora_serve.server.engine.residency import AdapterCache
from prolora_serve.server.engine.threads import confine_this_thread, off_the_step_thread
from test_engine_residency import make_adapter

LARGE = 1 << 21  # elements: far above ATen's grain size, so the op runs as a parallel region


@pytest.fixture(autouse=True)
def two_torch_threads() -> Iterator[None]:
    """A pool of two on the main thread (the CI machine's default, set here to be sure)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def tensor_work() -> int:
    """What a helper thread does with tensors (a check over a whole adapter's weights)."""
    torch.ones(LARGE).isfinite().all()  # a parallel region where the thread may open one
    return torch.get_num_threads()


def openmp_workers_started_by(run: Callable[[], None]) -> set[int]:
    """Kernel thread ids that appeared during ``run`` and are no Python thread: OpenMP workers."""
    before = set(os.listdir("/proc/self/task"))
    run()
    python_threads = {str(t.native_id) for t in threading.enumerate()}
    return set(os.listdir("/proc/self/task")) - before - python_threads


def test_an_unconfined_helper_thread_starts_a_team_of_its_own() -> None:
    """The mechanism the confinement exists for (if torch stopped doing this, the module's
    reasoning would be stale): tensor work on a second, living thread adds a worker."""
    with ThreadPoolExecutor(1) as helper:
        started = openmp_workers_started_by(lambda: helper.submit(tensor_work).result())
    assert len(started) == 1


def test_a_confined_thread_computes_alone_and_leaves_the_main_pool_as_it_was() -> None:
    with ThreadPoolExecutor(1, initializer=confine_this_thread) as helper:
        threads_seen: list[int] = []
        started = openmp_workers_started_by(
            lambda: threads_seen.append(helper.submit(tensor_work).result()))
    assert started == set()
    assert threads_seen == [1]
    assert torch.get_num_threads() == 2  # the calling thread's pool is untouched


def test_off_the_step_thread_confines_the_pool_thread_it_runs_on() -> None:
    with ThreadPoolExecutor(1) as helper:
        started = openmp_workers_started_by(
            lambda: helper.submit(off_the_step_thread(tensor_work)).result())
    assert started == set()


class CheckingSource:
    """An adapter source whose reads check a large tensor, as the registry's reads do."""

    def __init__(self) -> None:
        self.adapters = {"a": make_adapter(0)}

    def has_adapter(self, adapter_id: str) -> bool:
        return adapter_id in self.adapters

    def load_adapter(self, adapter_id: str):
        tensor_work()
        if adapter_id not in self.adapters:
            raise AdapterNotFoundError(adapter_id)
        return self.adapters[adapter_id]


def test_the_adapter_loader_thread_starts_no_openmp_team() -> None:
    cache = AdapterCache(AdapterWeightPool("cpu", torch.float32), 1 << 20, CheckingSource())

    def load() -> None:
        assert cache.prepare("a").result(timeout=30) > 0

    assert openmp_workers_started_by(load) == set()


def test_work_on_a_passing_thread_leaves_no_team_behind() -> None:
    """Loading a model opens a team on its thread; on a passing thread the team ends with it."""
    from prolora_serve.server.engine.threads import run_on_passing_thread

    before = set(os.listdir("/proc/self/task"))
    assert run_on_passing_thread(tensor_work) == 2  # it computed on a full pool of its own
    deadline = time.monotonic() + 5  # a joined thread's kernel task (and its team's) may linger
    while set(os.listdir("/proc/self/task")) - before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert set(os.listdir("/proc/self/task")) - before == set()
