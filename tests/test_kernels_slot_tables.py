"""Slot tables kept in step with the pool by rewriting only the slots that changed: after any
sequence of loads, unloads and replacements they equal tables built from scratch, and the CPU
kernel reading them matches the float64 reference."""

from __future__ import annotations

import random

import pytest
import torch

from prolora_serve.kernels import AdapterWeightPool, build_adapter_batch, get_backend
from prolora_serve.kernels.metadata import NO_ADAPTER
from prolora_serve.kernels import slot_tables
from prolora_serve.kernels.slot_tables import SlotTables, _transpose_is_contiguous, adapter_rows
from test_kernels import CONFIGS, MODULES, make_adapter

# adapters targeting one or both modules, so a replacement may leave a module's row behind
ONE_MODULE = {"model.layers.0.mlp.down_proj": MODULES["model.layers.0.mlp.down_proj"]}
LATE_MODULE = {"model.layers.3.self_attn.v_proj": (9, 20)}  # appears only later: the tables grow


def random_adapter(rng: random.Random, seed: int):
    r, u, m, n = rng.choice(CONFIGS)
    modules = rng.choice([MODULES, ONE_MODULE, MODULES, {**MODULES, **LATE_MODULE}])
    return make_adapter(r, u, m, n, alpha=rng.uniform(1, 16), seed=seed, modules=modules)


def assert_tables_match_pool(tables: SlotTables) -> None:
    tables.sync()
    assert set(tables.index) >= {p for a in tables.pool.resident().values() for p in a.modules}
    entries, scales = tables.rebuilt()
    assert torch.equal(tables.entries, entries)
    assert torch.equal(tables.scales, scales)


# what fused calls ask for: modules sharing an input, one module, one nobody targets
CALLS = (tuple(MODULES), ("model.layers.0.mlp.down_proj",), (*LATE_MODULE, "model.layers.9.mlp.up_proj"))


def assert_targeted_matches_pool(tables: SlotTables) -> None:
    """``targeted`` (cached between changes) names exactly the paths some resident adapter
    targets, with the tables' current rows for them."""
    for paths in CALLS:
        found = tables.targeted(paths)
        assert found.positions == tuple(i for i, p in enumerate(paths) if tables.pool.module(p) is not None)
        entries, scales = tables.rebuilt()
        for k, i in enumerate(found.positions):
            row = tables.index[paths[i]]
            assert found.entries[k].data_ptr() == tables.entries[row].data_ptr()
            assert torch.equal(found.entries[k], entries[row]) and torch.equal(found.scales[k], scales[row])


@pytest.mark.parametrize("seed", range(4))
def test_incremental_sync_equals_tables_built_from_scratch(seed: int) -> None:
    rng = random.Random(seed)
    pool = AdapterWeightPool("cpu", torch.float32)
    tables = SlotTables(pool)
    for step in range(40):
        resident = sorted(pool.slots)
        if resident and rng.random() < 0.4:
            pool.unload(rng.choice(resident))
        else:
            free = [s for s in range(90) if s not in pool.slots]  # past 64 slots: the tables grow
            pool.load(rng.choice(free), random_adapter(rng, seed=100 * seed + step))
        if rng.random() < 0.7:  # sometimes several changes land between two syncs
            assert_tables_match_pool(tables)
        if rng.random() < 0.5:  # before or after a sync
            assert_targeted_matches_pool(tables)
    assert_tables_match_pool(tables)
    assert_targeted_matches_pool(tables)
    assert tables.capacity >= max(pool.slots, default=0) + 1


def test_a_load_writes_only_its_own_slot() -> None:
    """The rows of the other resident adapters are not rewritten (same values, same tensor)."""
    pool = AdapterWeightPool("cpu", torch.float32)
    for slot in range(3):
        pool.load(slot, make_adapter(*CONFIGS[slot], alpha=4.0, seed=slot))
    tables = SlotTables(pool)
    path = "model.layers.0.self_attn.q_proj"
    entries, _ = tables.module(path)
    before = entries.clone()
    pool.load(3, make_adapter(*CONFIGS[3], alpha=4.0, seed=3))
    after, _ = tables.module(path)
    assert after.data_ptr() == entries.data_ptr()
    assert torch.equal(after[:3], before[:3]) and after[3, 0] == 1 and not before[3].any()


def test_the_cpu_kernel_follows_loads_unloads_and_replacements() -> None:
    backend = get_backend("cpu")
    pool = AdapterWeightPool("cpu", torch.float32)
    rng = random.Random(7)
    path = "model.layers.0.self_attn.q_proj"
    h, o = MODULES[path]
    x = torch.randn(6, h, generator=torch.Generator().manual_seed(1))
    for round_ in range(6):
        if round_ % 2 and pool.slots:
            pool.unload(min(pool.slots))
        for slot in range(4):
            if slot not in pool.slots:
                pool.load(slot, random_adapter(rng, seed=10 * round_ + slot))
        slots = [0, NO_ADAPTER, 1, 2, 3, 1]
        batch = build_adapter_batch(slots)
        y = torch.zeros(6, o)
        backend.apply(y, x, pool, path, batch)
        expected = torch.zeros(6, o, dtype=torch.float64)
        get_backend("reference").apply(expected, x.double(), pool, path, batch)
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_resident_identity_follows_the_weights_and_config_not_the_object() -> None:
    from prolora_serve.kernels.pool import kernel_layout, resident_identity

    def identity(adapter, dtype=torch.float32):
        return resident_identity(kernel_layout(adapter, torch.device("cpu"), dtype))

    same = identity(make_adapter(*CONFIGS[0], alpha=4.0, seed=1))
    assert same == identity(make_adapter(*CONFIGS[0], alpha=4.0, seed=1))
    assert same != identity(make_adapter(*CONFIGS[0], alpha=4.0, seed=2))  # other weights
    assert same != identity(make_adapter(*CONFIGS[0], alpha=8.0, seed=1))  # other scale
    assert same != identity(make_adapter(*CONFIGS[0], alpha=4.0, seed=1), torch.float16)
    with pytest.raises(ValueError, match="one allocation"):
        resident_identity(make_adapter(*CONFIGS[0], alpha=4.0, seed=1))  # not laid out


@pytest.mark.parametrize("shape", [(3, 5), (1, 5), (5, 1), (1, 1), (0, 4), (4, 0)])
def test_the_transpose_contiguity_check_agrees_with_torch(shape: tuple[int, int]) -> None:
    """Rows check B0^T and Bu^T without making the transposed views: same answer as torch on
    row-major, column-major and sliced tensors."""
    rows, cols = shape
    candidates = [torch.zeros(rows, cols), torch.zeros(cols, rows).T,
                  torch.zeros(rows, cols + 2)[:, :cols], torch.zeros(cols + 2, rows).T[:, :],
                  torch.zeros(cols, rows + 1).T[:rows]]
    for tensor in candidates:
        assert _transpose_is_contiguous(tensor) == tensor.T.is_contiguous(), tensor.stride()


def test_a_cpu_pool_makes_table_rows_with_the_layout_and_the_install_writes_them() -> None:
    """The loader's layout makes the rows (off the step thread); the step thread's sync writes
    exactly those, and the tables equal tables built from scratch."""
    pool = AdapterWeightPool(dtype=torch.float16)
    tables = SlotTables(pool)
    laid_out = pool.layout(make_adapter(8, 2, 4, 6, 16.0, seed=3))
    prepared = slot_tables._prepared[laid_out]
    fresh = adapter_rows(laid_out)
    assert prepared.paths == fresh.paths
    assert torch.equal(prepared.entries, fresh.entries) and torch.equal(prepared.scales, fresh.scales)
    pool.install(5, laid_out)
    tables.sync()
    for row, path in enumerate(prepared.paths):
        assert torch.equal(tables.entries[tables.index[path], 5], prepared.entries[row])
    entries, scales = tables.rebuilt()
    assert torch.equal(tables.entries, entries) and torch.equal(tables.scales, scales)
