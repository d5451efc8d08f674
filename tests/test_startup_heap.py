"""The server freezes its start-up heap for the garbage collector (server/engine/startup_heap.py)
and gives it back on shutdown."""

from __future__ import annotations

import gc
import weakref

import pytest

from prolora_serve.server.config import ServerConfig
from prolora_serve.server.engine.startup_heap import (CollectorPauses, freeze_startup_heap,
                                                      frozen_startup_heap, thaw_startup_heap)


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


@pytest.fixture
def thawed():
    thaw_startup_heap()
    yield
    thaw_startup_heap()


def test_garbage_is_collected_first_and_the_live_heap_is_frozen(thawed) -> None:
    garbage, live = Node(), Node()
    dead = weakref.ref(garbage)
    del garbage
    heap = freeze_startup_heap()
    assert dead() is None  # collected, not frozen
    assert not any(o is live for o in gc.get_objects())  # frozen: out of every generation
    assert heap.frozen_objects == gc.get_freeze_count() > 0
    assert heap.full_collection_ms_before >= 0 and heap.full_collection_ms_after >= 0


def test_frozen_cycles_are_freed_once_thawed(thawed) -> None:
    node = Node()
    freeze_startup_heap()
    gone = weakref.ref(node)
    del node
    gc.collect()
    assert gone() is not None  # frozen objects are never walked, so never freed
    thaw_startup_heap()
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert gone() is None


def test_the_block_thaws_the_heap_even_when_it_raises(thawed) -> None:
    with pytest.raises(RuntimeError):
        with frozen_startup_heap() as heap:
            assert gc.get_freeze_count() > 0 and heap.frozen_objects > 0
            assert f"froze {heap.frozen_objects} start-up objects" in str(heap)
            raise RuntimeError("stop")
    assert gc.get_freeze_count() == 0


def test_pauses_are_recorded_only_inside_the_block() -> None:
    with CollectorPauses() as pauses:
        gc.collect()
        gc.collect(0)
    gc.collect()
    summary = pauses.summary()
    assert summary["collections"] == 2
    assert 0 <= summary["longest_ms"] <= summary["total_ms"]


def test_the_server_serves_with_its_heap_frozen_and_thaws_it_on_shutdown(
        live_server, tiny_llama_dir, tmp_path, thawed) -> None:
    server = live_server(ServerConfig.from_options(model=str(tiny_llama_dir), dtype="fp32",
                                                   adapter_dir=tmp_path / "adapters",
                                                   kv_cache_memory=8 << 20, max_model_len=64))
    try:
        engine = server.app.state.engine
        assert not any(o is engine for o in gc.get_objects())  # made at start-up: frozen
        assert gc.get_freeze_count() > 0
    finally:
        server.stop()
    assert gc.get_freeze_count() == 0
