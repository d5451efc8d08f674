"""The Triton slot-table adapter kernels against the float64 reference.

Compiled on a GPU where there is one, else in Triton's interpreter on CPU tensors
(tests/conftest.py sets TRITON_INTERPRET=1 when CUDA is absent)."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton", reason="the triton extra is not installed")

from prolora_serve.kernels import NO_ADAPTER, AdapterWeightPool, build_adapter_batch, get_backend  # noqa: E402
from prolora_serve.kernels.testing import assert_close_for_dtype  # noqa: E402
from test_kernels import CONFIGS, MODULES, make_adapter, popularity, with_gaps  # noqa: E402

pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (r, u, m, n) on top of test_kernels.CONFIGS (u = 0, u = r, m = 1, R < m, dims not divisible by
# m or n): a rank past one 16-rank tile with both parts, and the paper's LLaMA pair's shape.
WIDE_CONFIGS = CONFIGS + [(19, 3, 2, 5), (32, 4, 7, 7)]
# awkward modules: h, o not divisible by 7, 5, 4, 3, 2; o below one 64-wide expand tile and past
# it; h past one 128-column shrink split (3 splits, a chunk straddling two splits)
WIDE_MODULES = {**MODULES, "model.layers.1.mlp.up_proj": (71, 130),
                "model.layers.1.mlp.down_proj": (301, 37)}


@pytest.fixture(scope="module")
def wide_pool() -> AdapterWeightPool:
    pool = AdapterWeightPool(DEVICE)
    for slot, (r, u, m, n) in enumerate(WIDE_CONFIGS):
        pool.load(slot, make_adapter(r, u, m, n, alpha=8.0 + slot, seed=slot, modules=WIDE_MODULES))
    return pool


def check(pool: AdapterWeightPool, slots: list[int], module: str, x_dtype=torch.float32,
          seed: int = 0) -> None:
    h, o = WIDE_MODULES[module]
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(len(slots), h, generator=gen), torch.randn(len(slots), o, generator=gen)
    fast = y.to(x_dtype).to(DEVICE)
    expected = y.to(x_dtype).double()
    batch = build_adapter_batch(slots, DEVICE)
    get_backend("triton").apply(fast, x.to(x_dtype).to(DEVICE), pool, module, batch)
    cpu_pool = pool if DEVICE == "cpu" else _cpu_copy(pool)
    get_backend("reference").apply(expected, x.to(x_dtype).double(), cpu_pool, module,
                                   build_adapter_batch(slots))
    # the reference reads the same (rounded) pool weights; the kernels accumulate in float32, so
    # only the output's own rounding (y's dtype) separates them
    assert_close_for_dtype(fast.cpu(), expected, x_dtype)


_COPIES: dict[int, AdapterWeightPool] = {}


def _cpu_copy(pool: AdapterWeightPool) -> AdapterWeightPool:
    """The float64 reference reads CPU tensors; rebuild the same adapters there (same seeds)."""
    key = id(pool)
    if key not in _COPIES:
        copy = AdapterWeightPool("cpu", pool.dtype)
        for slot, (r, u, m, n) in enumerate(WIDE_CONFIGS):
            copy.load(slot, make_adapter(r, u, m, n, alpha=8.0 + slot, seed=slot, modules=WIDE_MODULES))
        _COPIES[key] = copy
    return _COPIES[key]


@pytest.mark.parametrize("kind", ["distinct", "identical", "zipf", "skewed"])
@pytest.mark.parametrize("rows", [1, 5, 13])
@pytest.mark.parametrize("module", sorted(WIDE_MODULES))
def test_heterogeneous_ranks_in_one_launch_match_reference(wide_pool, kind: str, rows: int,
                                                            module: str) -> None:
    """Every (r, u, m, n) of the pool mixed in one batch, with rows without adapters."""
    rng = random.Random(rows * 31 + len(kind))
    slots = with_gaps(popularity(kind, rows, len(WIDE_CONFIGS), rng), rng)
    check(wide_pool, slots, module, seed=rows)


def test_rows_without_adapter_or_whose_adapter_skips_the_module_are_untouched() -> None:
    pool = AdapterWeightPool(DEVICE)
    module, other = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"
    pool.load(0, make_adapter(8, 2, 4, 6, alpha=8.0, seed=0, modules={module: MODULES[module]}))
    pool.load(1, make_adapter(5, 0, 3, 2, alpha=4.0, seed=1, modules=MODULES))
    h, o = MODULES[other]
    x, y = torch.randn(4, h, device=DEVICE), torch.randn(4, o, device=DEVICE)
    out = y.clone()
    get_backend("triton").apply(out, x, pool, other, build_adapter_batch([0, NO_ADAPTER, 1, 0], DEVICE))
    assert torch.equal(out[[0, 1, 3]], y[[0, 1, 3]])
    assert not torch.allclose(out[2], y[2])


@pytest.mark.parametrize("pool_dtype, x_dtype", [(torch.float16, torch.float32),
                                                 (torch.bfloat16, torch.float32),
                                                 (torch.bfloat16, torch.bfloat16),
                                                 (torch.float16, torch.float16)])
def test_16bit_pools_and_activations(pool_dtype, x_dtype) -> None:
    pool = AdapterWeightPool(DEVICE, pool_dtype)
    for slot, (r, u, m, n) in enumerate(WIDE_CONFIGS):
        pool.load(slot, make_adapter(r, u, m, n, alpha=8.0 + slot, seed=slot, modules=WIDE_MODULES))
    _COPIES.pop(id(pool), None)
    check(pool, [7, 0, NO_ADAPTER, 3, 1, 6, 2, 5, 4], "model.layers.1.mlp.up_proj", x_dtype, seed=3)


def test_slot_tables_are_rewritten_in_place_when_adapters_come_and_go() -> None:
    """What CUDA graphs rely on: loading into and evicting from slots within the capacity keeps
    the tables' device tensors (same addresses, same layout_version); the kernels then see the
    new adapters. Growing past the capacity or the rank capacity reallocates, and says so."""
    backend = get_backend("triton")
    module = "model.layers.0.self_attn.q_proj"
    pool = AdapterWeightPool(DEVICE)
    tables = backend.tables(pool, sorted(MODULES))
    entries, layout = tables.entries.data_ptr(), tables.layout_version
    h, o = MODULES[module]
    x, y = torch.randn(3, h, device=DEVICE), torch.zeros(3, o, device=DEVICE)
    row_slots = torch.tensor([2, NO_ADAPTER, 5], device=DEVICE)
    backend.launch(y, x, pool, module, row_slots)  # nothing resident: nothing added
    assert not y.any()
    for slot, (r, u, m, n) in ((2, CONFIGS[0]), (5, CONFIGS[3])):
        pool.load(slot, make_adapter(r, u, m, n, alpha=2.0, seed=slot))
    backend.launch(y, x, pool, module, row_slots)
    assert y[0].any() and not y[1].any() and y[2].any()
    pool.unload(5)
    pool.load(5, make_adapter(*CONFIGS[1], alpha=3.0, seed=9))  # another adapter in the slot
    y2 = torch.zeros_like(y)
    backend.launch(y2, x, pool, module, row_slots)
    assert torch.equal(y2[0], y[0]) and not torch.allclose(y2[2], y[2])
    assert (tables.entries.data_ptr(), tables.layout_version) == (entries, layout)
    pool.load(70, make_adapter(*CONFIGS[2], alpha=1.0, seed=70))  # past 64 slots
    y3 = torch.zeros_like(y)
    backend.launch(y3, x, pool, module, row_slots)
    assert tables.layout_version == layout + 1 and tables.capacity == 128
    assert torch.equal(y3, y2)  # the other slots' rows moved over with the growth
    pool.load(41, make_adapter(24, 0, 1, 1, alpha=1.0, seed=41))  # rank 24 > 16
    backend.launch(y2, x, pool, module, row_slots)
    assert tables.layout_version == layout + 2 and tables.rank_capacity == 32


def test_more_column_splits_than_one_expand_tile_sums() -> None:
    """h = 4301: 34 shrink splits, more than the 32 the expand adds per tile."""
    module = "model.layers.2.mlp.down_proj"
    pool = AdapterWeightPool(DEVICE)
    for slot, (r, u, m, n) in enumerate([(8, 1, 7, 7), (4, 4, 1, 1), (19, 3, 2, 5)]):
        pool.load(slot, make_adapter(r, u, m, n, alpha=4.0, seed=slot, modules={module: (4301, 9)}))
    gen = torch.Generator().manual_seed(5)
    slots = [2, NO_ADAPTER, 0, 1]
    x, y = torch.randn(4, 4301, generator=gen), torch.randn(4, 9, generator=gen)
    fast, expected = y.to(DEVICE), y.double()
    get_backend("triton").apply(fast, x.to(DEVICE), pool, module, build_adapter_batch(slots, DEVICE))
    cpu_pool = pool
    if DEVICE != "cpu":
        cpu_pool = AdapterWeightPool("cpu")
        for slot, (r, u, m, n) in enumerate([(8, 1, 7, 7), (4, 4, 1, 1), (19, 3, 2, 5)]):
            cpu_pool.load(slot, make_adapter(r, u, m, n, alpha=4.0, seed=slot, modules={module: (4301, 9)}))
    get_backend("reference").apply(expected, x.double(), cpu_pool, module, build_adapter_batch(slots))
    assert_close_for_dtype(fast.cpu(), expected, torch.float32)

