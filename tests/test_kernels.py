"""Compact mixed-batch kernels against the float64 dense reference."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prolora_serve.adapters.config import LayerSpec, ProLoRAConfig
from prolora_serve.adapters.dense import apply_dense
from prolora_serve.adapters.weights import CompactAdapter, CompactLinearWeights
from prolora_serve.kernels import (NO_ADAPTER, AdapterContext, AdapterWeightPool, NoAdapters, build_adapter_batch,
                                   get_backend)
from prolora_serve.kernels.plan import SEGMENT_MIN_ROWS, build_module_plan, rotation_tables
from prolora_serve.kernels.testing import assert_close_for_dtype
from prolora_serve.kernels.cpu_extension import lane_builds_here

MODULES = {"model.layers.0.self_attn.q_proj": (24, 36), "model.layers.0.mlp.down_proj": (13, 7)}
# (r, u, m, n): u = 0, u = r, m = 1, R < m, dims not divisible by m or n.
CONFIGS = [(8, 2, 4, 6), (4, 4, 1, 1), (5, 0, 3, 2), (3, 1, 7, 5), (6, 0, 1, 4), (2, 1, 2, 2)]


def make_adapter(r: int, u: int, m: int, n: int, alpha: float, seed: int,
                 modules: dict[str, tuple[int, int]] = MODULES) -> CompactAdapter:
    config = ProLoRAConfig(r=r, unshared_r=u, reduce_lora_A_x=m, reduce_lora_B_x=n, lora_alpha=alpha,
                           target_modules=tuple(sorted({p.rsplit(".", 1)[1] for p in modules})))
    gen = torch.Generator().manual_seed(seed)
    return CompactAdapter(config, {p: CompactLinearWeights.random(config.layer_spec(p, h, o), gen)
                                   for p, (h, o) in modules.items()})


def popularity(kind: str, rows: int, num_adapters: int, rng: random.Random) -> list[int]:
    if kind == "distinct":
        return [i % num_adapters for i in range(rows)]
    if kind == "identical":
        return [0] * rows
    if kind == "zipf":
        weights = [1.0 / (k + 1) for k in range(num_adapters)]
        return rng.choices(range(num_adapters), weights=weights, k=rows)
    if kind == "skewed":
        return [0 if rng.random() < 0.8 else rng.randrange(num_adapters) for _ in range(rows)]
    raise ValueError(kind)


def with_gaps(slots: list[int], rng: random.Random, fraction: float = 0.2) -> list[int]:
    return [NO_ADAPTER if rng.random() < fraction else s for s in slots]


@pytest.fixture(scope="module")
def pool() -> AdapterWeightPool:
    pool = AdapterWeightPool()
    for slot, (r, u, m, n) in enumerate(CONFIGS):
        pool.load(slot, make_adapter(r, u, m, n, alpha=8.0 + slot, seed=slot))
    return pool


FAST_BACKENDS = ["torch", "cpu"]


def run_both(pool: AdapterWeightPool, slots: list[int], module: str, dtype: torch.dtype = torch.float32,
             backend: str = "torch"):
    h, o = MODULES[module]
    gen = torch.Generator().manual_seed(len(slots))
    x = torch.randn(len(slots), h, generator=gen)
    y0 = torch.randn(len(slots), o, generator=gen)
    batch = build_adapter_batch(slots)
    fast, expected = y0.clone().to(dtype), y0.clone().double()
    get_backend(backend).apply(fast, x.to(dtype), pool, module, batch)
    get_backend("reference").apply(expected, x.double(), pool, module, batch)
    return fast, expected


def test_build_adapter_batch_groups_rows_by_slot() -> None:
    batch = build_adapter_batch([3, NO_ADAPTER, 3, 0, NO_ADAPTER])
    assert batch.slots == (0, 3)
    assert [rows.tolist() for rows in batch.slot_rows] == [[3], [0, 2]]
    assert batch.num_rows == 5 and batch.has_adapters
    assert not build_adapter_batch([NO_ADAPTER, NO_ADAPTER]).has_adapters
    assert build_adapter_batch([]).num_rows == 0
    with pytest.raises(ValueError):
        build_adapter_batch([-5])


@pytest.mark.parametrize(
    "slots, segments, gathered_rows",
    [
        ([0, 1, 2], 0, [[0, 1, 2]]),  # three distinct adapters of... different classes
        ([0] * SEGMENT_MIN_ROWS + [1], 1, [[8]]),
        ([NO_ADAPTER, 0, NO_ADAPTER], 0, [[1]]),
    ],
)
def test_module_plan_from_table(pool: AdapterWeightPool, slots, segments, gathered_rows) -> None:
    plan = build_module_plan(pool.module("model.layers.0.self_attn.q_proj"), build_adapter_batch(slots))
    assert len(plan.segments) == segments
    got = sorted(row for g in plan.groups for row in (g.rows.tolist() if g.rows is not None
                                                       else range(len(slots))))
    assert got == sorted(r for rows in gathered_rows for r in rows)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("kind", ["distinct", "identical", "zipf", "skewed"])
@pytest.mark.parametrize("rows", [1, 2, 7, 31, 64])
@pytest.mark.parametrize("module", sorted(MODULES))
def test_fast_backends_match_reference(pool, kind: str, rows: int, module: str, backend: str) -> None:
    rng = random.Random(rows * 7 + len(kind))
    slots = with_gaps(popularity(kind, rows, len(CONFIGS), rng), rng)
    fast, expected = run_both(pool, slots, module, backend=backend)
    assert_close_for_dtype(fast, expected, torch.float32)


def test_rows_without_adapter_are_untouched(pool) -> None:
    slots = [NO_ADAPTER, 2, NO_ADAPTER, 2, 5]
    module = "model.layers.0.self_attn.q_proj"
    x, y = torch.randn(len(slots), 24), torch.randn(len(slots), 36)
    out = y.clone()
    get_backend("torch").apply(out, x, pool, module, build_adapter_batch(slots))
    assert torch.equal(out[[0, 2]], y[[0, 2]])
    assert not torch.allclose(out[[1, 3, 4]], y[[1, 3, 4]])


def test_gathered_group_stacks_each_adapter_once() -> None:
    pool = AdapterWeightPool()
    pool.load(0, make_adapter(8, 2, 4, 6, alpha=8.0, seed=0))
    pool.load(3, make_adapter(8, 2, 4, 6, alpha=4.0, seed=1))  # same shape class as slot 0
    slots = [0, 3, 0, 3, 3, NO_ADAPTER, 0]
    plan = build_module_plan(pool.module("model.layers.0.self_attn.q_proj"), build_adapter_batch(slots),
                             segment_min_rows=len(slots) + 1)  # no segments: every row gathered
    (group,) = plan.groups
    assert group.A0.shape[0] == 2 and group.scales.shape == (2, 1)
    assert group.rows.tolist() == [0, 1, 2, 3, 4, 6]
    assert group.weight_index.tolist() == [0, 1, 0, 1, 1, 0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_torch_backend_other_dtypes(dtype: torch.dtype) -> None:
    pool = AdapterWeightPool(dtype=dtype)
    for slot, (r, u, m, n) in enumerate(CONFIGS):
        pool.load(slot, make_adapter(r, u, m, n, alpha=4.0, seed=slot))
    slots = [i % len(CONFIGS) for i in range(13)] + [1] * SEGMENT_MIN_ROWS
    fast, expected = run_both(pool, slots, "model.layers.0.self_attn.q_proj", dtype)
    assert_close_for_dtype(fast, expected, dtype)


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 40), o=st.integers(1, 40), r=st.integers(1, 10), data=st.data(),
    rows=st.integers(1, 20),
)
def test_random_shapes_match_reference(h: int, o: int, r: int, data, rows: int) -> None:
    backend = data.draw(st.sampled_from(FAST_BACKENDS))
    u = data.draw(st.integers(0, r))
    m = data.draw(st.integers(1, min(h, 9)))
    n = data.draw(st.integers(1, min(o, 9)))
    modules = {"layer.proj": (h, o)}
    pool = AdapterWeightPool()
    pool.load(0, make_adapter(r, u, m, n, alpha=float(r), seed=h * o, modules=modules))
    pool.load(4, make_adapter(max(r - 1, 1), 0, 1, 1, alpha=3.0, seed=r, modules=modules))
    slots = data.draw(st.lists(st.sampled_from([0, 4, NO_ADAPTER]), min_size=rows, max_size=rows))
    x = torch.randn(rows, h)
    fast, expected = torch.zeros(rows, o), torch.zeros(rows, o, dtype=torch.float64)
    batch = build_adapter_batch(slots)
    get_backend(backend).apply(fast, x, pool, "layer.proj", batch)
    get_backend("reference").apply(expected, x.double(), pool, "layer.proj", batch)
    assert_close_for_dtype(fast, expected, torch.float32)


def test_reference_equals_dense_delta() -> None:
    spec = LayerSpec(24, 36, 8, 2, 4, 6, 16.0)
    weights = CompactLinearWeights.random(spec, torch.Generator().manual_seed(0), dtype=torch.float64)
    pool = AdapterWeightPool(dtype=torch.float64)
    pool.load(0, CompactAdapter(ProLoRAConfig(8, 2, 4, 6, 16.0, ("q_proj",)), {"q": weights}))
    x = torch.randn(3, 24, dtype=torch.float64)
    y = torch.zeros(3, 36, dtype=torch.float64)
    get_backend("reference").apply(y, x, pool, "q", build_adapter_batch([0, 0, 0]))
    torch.testing.assert_close(y, apply_dense(weights, x), rtol=1e-12, atol=1e-12)


def test_rotation_tables_are_permutation_folds() -> None:
    tables = rotation_tables((24, 36, 8, 2, 4, 6), torch.float32, torch.device("cpu"))
    assert tables.fold_a.shape == (4 * 6, 6) and tables.unfold_b.shape == (6, 6 * 6)
    assert torch.all(tables.fold_a.sum(0) == 4) and torch.all(tables.fold_a.sum(1) == 1)
    assert torch.all(tables.unfold_b.sum(0) == 1) and torch.all(tables.unfold_b.sum(1) == 6)


def test_pool_bytes_are_compact_and_released(pool) -> None:
    adapter = make_adapter(8, 1, 7, 7, 16.0, seed=99)
    local = AdapterWeightPool()
    local.load(3, adapter)
    assert local.slot_nbytes(3) == adapter.nbytes == adapter.num_params * 4
    assert local.nbytes == adapter.nbytes and local.slots == {3}
    with pytest.raises(ValueError):
        local.load(3, adapter)
    local.unload(3)
    assert local.nbytes == 0 and local.module("model.layers.0.self_attn.q_proj") is None


def test_context_applies_and_checks_rows(pool) -> None:
    ctx = AdapterContext(pool, get_backend("torch"))
    x, y = torch.randn(2, 24), torch.zeros(2, 36)
    NoAdapters().apply("model.layers.0.self_attn.q_proj", x, y)  # a base-only step: no-op
    ctx.for_step(build_adapter_batch([NO_ADAPTER, NO_ADAPTER])).apply("model.layers.0.self_attn.q_proj", x, y)
    assert torch.count_nonzero(y) == 0
    step = ctx.for_step(build_adapter_batch([0, NO_ADAPTER]))
    step.apply("model.layers.0.self_attn.q_proj", x, y)
    assert torch.count_nonzero(y[0]) > 0 and torch.count_nonzero(y[1]) == 0
    step.apply("model.layers.0.self_attn.not_adapted", x, y)  # module without adapters: no-op
    with pytest.raises(ValueError, match="rows"):
        ctx.for_step(build_adapter_batch([0])).apply("model.layers.0.self_attn.q_proj", x, y)


def test_get_backend_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown adapter backend"):
        get_backend("cuda-magic")
    assert get_backend("auto", "cpu").name == "cpu"
    assert get_backend("auto", "cpu", torch.bfloat16).name == "cpu"  # 16-bit activations too
    assert get_backend("auto", "cpu", torch.float64).name == "torch"
    with pytest.raises(TypeError, match="float32"):
        pool = AdapterWeightPool(dtype=torch.float64)
        pool.load(0, make_adapter(4, 1, 2, 2, 4.0, seed=0))
        get_backend("cpu").apply(torch.zeros(1, 36), torch.zeros(1, 24), pool,
                                 "model.layers.0.self_attn.q_proj", build_adapter_batch([0]))


# --- the fused CPU kernel: 16-bit resident weights, the portable build, the pool layout ---------
@pytest.mark.parametrize("pool_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["distinct", "identical", "zipf", "skewed"])
@pytest.mark.parametrize("rows", [1, 7, 33])
def test_cpu_backend_reads_16bit_pools(pool_dtype: torch.dtype, kind: str, rows: int) -> None:
    """Weights resident in 16 bits are widened in registers: against the reference on the very
    same (rounded) weights, the result is float32-accurate."""
    pool = AdapterWeightPool(dtype=pool_dtype)
    for slot, (r, u, m, n) in enumerate(CONFIGS):
        pool.load(slot, make_adapter(r, u, m, n, alpha=4.0, seed=slot))
    slots = with_gaps(popularity(kind, rows, len(CONFIGS), random.Random(rows)), random.Random(1))
    for module in MODULES:
        fast, expected = run_both(pool, slots, module, torch.float32, backend="cpu")
        assert_close_for_dtype(fast, expected, torch.float32)


@pytest.mark.parametrize("activations", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["distinct", "zipf"])
@pytest.mark.parametrize("rows", [1, 33])
def test_cpu_backend_serves_16bit_activations(activations: torch.dtype, kind: str, rows: int) -> None:
    """A bf16/fp16 base on the CPU: the fused kernel sums the deltas in float32 and adds them to
    the 16-bit output once; against the float64 reference within that dtype's tolerance."""
    pool = AdapterWeightPool(dtype=activations)
    for slot, (r, u, m, n) in enumerate(CONFIGS):
        pool.load(slot, make_adapter(r, u, m, n, alpha=4.0, seed=slot))
    slots = with_gaps(popularity(kind, rows, len(CONFIGS), random.Random(rows)), random.Random(2))
    for module in MODULES:
        fast, expected = run_both(pool, slots, module, activations, backend="cpu")
        assert fast.dtype == activations
        assert_close_for_dtype(fast, expected, activations)


@pytest.mark.parametrize("lanes", [lanes for lanes in lane_builds_here() if lanes != "native"])
@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 70), o=st.integers(1, 70), r=st.integers(1, 19), data=st.data())
def test_other_lane_builds_match_reference(lanes: str, h: int, o: int, r: int, data) -> None:
    """The AVX2 lanes (AVX-512 left out of the build) and the plain-C++ lanes compute the same
    as the reference; ranks above the 8-rank block and dims above the 16-float lanes exercise
    every loop and tail."""
    from prolora_serve.kernels.cpu_backend import CpuBackend

    u = data.draw(st.integers(0, r))
    m, n = data.draw(st.integers(1, min(h, 9))), data.draw(st.integers(1, min(o, 9)))
    pool_dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    pool = AdapterWeightPool(dtype=pool_dtype)
    pool.load(1, make_adapter(r, u, m, n, alpha=float(r), seed=h + o, modules={"layer.proj": (h, o)}))
    slots = data.draw(st.lists(st.sampled_from([1, NO_ADAPTER]), min_size=1, max_size=9))
    x = torch.randn(len(slots), h)
    fast, expected = torch.zeros(len(slots), o), torch.zeros(len(slots), o, dtype=torch.float64)
    CpuBackend(lanes).apply(fast, x, pool, "layer.proj", build_adapter_batch(slots))
    get_backend("reference").apply(expected, x.double(), pool, "layer.proj", build_adapter_batch(slots))
    assert_close_for_dtype(fast, expected, torch.float32)


def test_pool_keeps_each_adapter_in_one_allocation() -> None:
    adapter = make_adapter(8, 2, 4, 6, 16.0, seed=5)
    pool = AdapterWeightPool(dtype=torch.float16)
    pool.load(0, adapter)
    storages = {t.untyped_storage().data_ptr()
                for path in MODULES for t in pool.module(path)[0].tensors()}
    assert len(storages) == 1
    assert pool.slot_nbytes(0) == adapter.num_params * 2  # exactly the compact bytes
    for path in MODULES:
        resident, original = pool.module(path)[0], adapter.modules[path]
        assert resident.B0.T.is_contiguous() and resident.Bu.T.is_contiguous()
        for got, want in zip(resident.tensors(), original.tensors()):
            assert torch.equal(got, want.to(torch.float16))


def test_pool_refuses_weights_that_overflow_its_dtype() -> None:
    from prolora_serve.adapters.errors import AdapterFormatError

    adapter = make_adapter(4, 1, 2, 2, 4.0, seed=0)
    adapter.modules["model.layers.0.mlp.down_proj"].Bu[0, 0] = 1e6
    AdapterWeightPool(dtype=torch.float32).check_representable(adapter)
    AdapterWeightPool(dtype=torch.bfloat16).check_representable(adapter)
    with pytest.raises(AdapterFormatError, match=r"down_proj\.prolora_Bu.*--adapter-dtype fp32"):
        AdapterWeightPool(dtype=torch.float16).check_representable(adapter)


# q, k, v of one layer: one input, outputs of other widths (not multiples of n)
SHARED_INPUT = {"model.layers.5.self_attn.q_proj": (29, 36), "model.layers.5.self_attn.k_proj": (29, 11),
                "model.layers.5.self_attn.v_proj": (29, 11)}


@pytest.mark.parametrize("activations", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_16_bit_outputs_round_once_like_a_float32_delta_added_after(
        activations: torch.dtype, pool_dtype: torch.dtype) -> None:
    """16-bit x and y straight into the kernel: bit for bit the float32 kernel on x widened,
    its delta then added with ``y.add_(delta)`` (one rounding per element); mixed y dtypes too."""
    pool = AdapterWeightPool(dtype=pool_dtype)
    for slot, (r, u, m, n) in enumerate(CONFIGS):
        pool.load(slot, make_adapter(r, u, m, n, alpha=4.0, seed=slot, modules=SHARED_INPUT))
    rows = 19
    batch = build_adapter_batch(with_gaps(popularity("zipf", rows, len(CONFIGS), random.Random(1)),
                                          random.Random(2)))
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(rows, 29, generator=gen).to(activations)
    paths = list(SHARED_INPUT)
    dtypes = [activations, torch.float32, activations][:len(paths)]
    ys = [torch.randn(rows, SHARED_INPUT[p][1], generator=gen).to(d) for p, d in zip(paths, dtypes)]
    deltas = [torch.zeros(y.shape) for y in ys]
    cpu = get_backend("cpu")
    cpu.apply_many(deltas, x.float(), pool, paths, batch)
    expected = [y.clone().add_(d) if y.dtype != torch.float32 else None for y, d in zip(ys, deltas)]
    float_ys = [y.clone() for y in ys]
    cpu.apply_many(ys, x, pool, paths, batch)
    for index, (y, want, start) in enumerate(zip(ys, expected, float_ys)):
        if want is None:  # a float32 output accumulates in place from its start values
            cpu.apply_many([start], x.float(), pool, [paths[index]], batch)
            want = start
        assert torch.equal(y, want), paths[index]
    assert any(d.abs().max() > 0 for d in deltas)


@pytest.mark.parametrize("activations", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["distinct", "identical", "zipf", "skewed"])
@pytest.mark.parametrize("rows", [1, 7, 33])
def test_cpu_apply_many_equals_the_reference_per_module(activations: torch.dtype, kind: str,
                                                        rows: int) -> None:
    """One fused call for projections sharing an input, with adapters that target all of them,
    only q and v, or only k, and rows without an adapter; each output against float64."""
    pool = AdapterWeightPool(dtype=activations)
    targets = [SHARED_INPUT, {p: d for p, d in SHARED_INPUT.items() if "k_proj" not in p},
               {p: d for p, d in SHARED_INPUT.items() if "k_proj" in p}]
    for slot, (r, u, m, n) in enumerate(CONFIGS):
        pool.load(slot, make_adapter(r, u, m, n, alpha=4.0, seed=slot, modules=targets[slot % 3]))
    slots = with_gaps(popularity(kind, rows, len(CONFIGS), random.Random(rows)), random.Random(3))
    batch = build_adapter_batch(slots)
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 29, generator=gen).to(activations)
    paths = list(SHARED_INPUT)
    ys = [torch.randn(rows, SHARED_INPUT[p][1], generator=gen).to(activations) for p in paths]
    expected = [y.double() for y in ys]
    for path, reference in zip(paths, expected):
        get_backend("reference").apply(reference, x.double(), pool, path, batch)
    get_backend("cpu").apply_many(ys, x, pool, paths, batch)
    for y, reference in zip(ys, expected):
        assert_close_for_dtype(y, reference, activations)
