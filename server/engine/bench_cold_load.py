"""Cold loads: what a first request on a registered, non-resident adapter adds to its TTFT.

    prolora-serve bench cold-load [--dtype nf4] [--adapters 24] [--under-load 100]

The embedded default model behind ``AsyncLLMEngine`` (the server's engine client) and an
on-disk registry of PRoLoRA adapters (r=8, u=1, m=n=7, all seven projections, fp16 files of
~1.3 MB). Scenarios, each TTFT measured from ``generate`` to the first token of a one-token
request (a short chat prompt):
- ``cold``: the first request on an adapter (read from disk, checked, laid out, installed)
  against the same request right after (``warm``); the added TTFT per adapter;
- ``host``: a device budget of 4 adapters cycled through 8: the evicted ones come back from
  the host tier (``--adapter-host-memory``) without a disk read;
- ``under load``: ``--under-load`` cold requests (distinct adapters) while 16 requests on warm
  adapters keep streaming, each followed by a warm request (its pair: p50/p99 added) and a
  second warm one (the control: the same figures for a warm-warm pair, the noise floor).
Also the loader's own split (medians over 8 adapters): registry read + validation, layout, digest,
and the step thread's install (with the fused CPU kernel's slot-table rows).
Prints one JSON document, then a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ...adapters.config import ProLoRAConfig
from ...adapters.format import save_adapter
from ...adapters.registry import AdapterRegistry
from ...adapters.weights import CompactAdapter
from ...kernels.cpu_backend import CpuBackend
from ...kernels.pool import resident_identity
from .async_engine import AsyncLLMEngine
from .startup_heap import CollectorPauses, frozen_startup_heap
from .bench import ALL_PROJECTIONS, ADAPTER_STD
from .engine import EngineConfig, LLMEngine
from .loader import LoadedModel, load_base_model
from .sampling import SamplingParams
from .threads import confine_this_thread, run_on_passing_thread

ONE_TOKEN = SamplingParams(max_tokens=1, temperature=0)
STREAMING = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)  # each stream, repeated


def make_registry(root: Path, loaded: LoadedModel, count: int) -> AdapterRegistry:
    registry = AdapterRegistry(root / "registry", loaded.model.linear_shapes(), 1 << 30)
    config = ProLoRAConfig(8, 1, 7, 7, 16, ALL_PROJECTIONS)
    for index in range(count):
        adapter = CompactAdapter.random(config, registry.linear_shapes,
                                        torch.Generator().manual_seed(index), std=ADAPTER_STD)
        path = root / f"ad{index}.safetensors"
        save_adapter(adapter.to(dtype=torch.float16), path, single_file=True)
        registry.register_path(f"ad{index}", path)
        path.unlink()
    return registry


async def ttft(engine: AsyncLLMEngine, request_id: str, prompt: str, adapter_id: str | None) -> float:
    started = time.perf_counter()
    async for _ in engine.generate(request_id, prompt, ONE_TOKEN, adapter_id):
        return time.perf_counter() - started
    raise RuntimeError("no token")


def loader_split(registry: AdapterRegistry, engine: LLMEngine, adapter_ids: list[str]) -> dict[str, float]:
    """The loader's steps for each adapter, run in this thread; medians over the adapters."""
    pool = engine.runner.pool
    backend = engine.runner.adapter_ctx.backend
    # what the step thread does: the install and, for the fused CPU kernel, its slot-table rows
    tables = backend.tables.of(pool) if isinstance(backend, CpuBackend) else None
    rows = []
    for adapter_id in adapter_ids:
        started = time.perf_counter()
        adapter = registry.load_adapter(adapter_id)
        read = time.perf_counter()
        pool.check_representable(adapter)
        laid_out = pool.layout(adapter)
        layout = time.perf_counter()
        resident_identity(laid_out)
        digest = time.perf_counter()
        slot = max(pool.slots, default=-1) + 1
        pool.install(slot, laid_out)
        if tables is not None:
            tables.sync()
        done = time.perf_counter()
        pool.unload(slot)
        rows.append({"read_validate_ms": 1e3 * (read - started), "layout_ms": 1e3 * (layout - read),
                     "digest_ms": 1e3 * (digest - layout), "install_ms": 1e3 * (done - digest)})
    split = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
    # the registry's first file of a header takes the full validation (known_headers.py)
    return {**split, "first_read_validate_ms": rows[0]["read_validate_ms"]}


async def cold_and_warm(engine: AsyncLLMEngine, prompt: str, adapters: list[str]) -> list[dict[str, float]]:
    rows = []
    for i, adapter_id in enumerate(adapters):
        cold = await ttft(engine, f"cold-{i}", prompt, adapter_id)
        warm = await ttft(engine, f"warm-{i}", prompt, adapter_id)
        rows.append({"cold_ms": 1e3 * cold, "warm_ms": 1e3 * warm, "added_ms": 1e3 * (cold - warm)})
    return rows


async def under_load(engine: AsyncLLMEngine, prompt: str, warm: list[str], cold: list[str]) -> dict[str, Any]:
    for adapter_id in warm:
        await ttft(engine, f"load-warmup-{adapter_id}", prompt, adapter_id)
    # Staggered starts: streams that restart together would prefill together, and those bursts
    # (not the adapter reads) would set the tail of every request's TTFT.
    streams = [asyncio.create_task(_drain(engine, f"stream-{a}", prompt, a, delay=i * STAGGER_S))
               for i, a in enumerate(warm)]
    await asyncio.sleep(len(warm) * STAGGER_S + 1.0)  # all 16 streams are decoding
    # Each cold request is followed by a warm one (its pair) and a second warm one (the control:
    # a warm-warm pair shows how far two requests a moment apart differ with no load at all).
    cold_ms, warm_ms, control_ms = [], [], []
    try:
        for i, adapter_id in enumerate(cold):
            cold_ms.append(1e3 * await ttft(engine, f"busy-cold-{i}", prompt, adapter_id))
            warm_ms.append(1e3 * await ttft(engine, f"busy-warm-{i}", prompt, warm[i % len(warm)]))
            control_ms.append(1e3 * await ttft(engine, f"busy-control-{i}", prompt,
                                               warm[(i + 1) % len(warm)]))
    finally:
        for task in streams:
            task.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
    added = sorted(c - w for c, w in zip(cold_ms, warm_ms))
    control_added = sorted(c - w for c, w in zip(control_ms, warm_ms))
    return {"cold_ms_p50": statistics.median(cold_ms), "warm_ms_p50": statistics.median(warm_ms),
            "added_ms_p50": statistics.median(added), "added_ms_p99": _p99(added),
            "control_added_ms_p50": statistics.median(control_added),
            "control_added_ms_p99": _p99(control_added),
            # the streams' own prefills land on either kind of request: p99 against p99
            "cold_ms_p99": _p99(sorted(cold_ms)), "warm_ms_p99": _p99(sorted(warm_ms)),
            "control_ms_p99": _p99(sorted(control_ms)),
            "count": len(added), "added_ms_worst": added[-5:], "cold_ms_in_order": cold_ms,
            "warm_ms_in_order": warm_ms, "control_ms_in_order": control_ms}


STAGGER_S = 0.25  # between the streams' starts: 16 of them spread over ~4 s of 64-token turns


def _p99(ordered: list[float]) -> float:
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


async def _drain(engine: AsyncLLMEngine, request_id: str, prompt: str, adapter_id: str,
                 delay: float) -> None:
    """One warm stream: 64-token requests back to back (bounded contexts: no KV pressure)."""
    await asyncio.sleep(delay)
    for turn in range(1_000_000):
        async for _ in engine.generate(f"{request_id}-{turn}", prompt, STREAMING, adapter_id):
            pass


def scenario_engine(loaded: LoadedModel, registry: AdapterRegistry, adapter_memory: int,
                    host_memory: int) -> AsyncLLMEngine:
    # No prefix caching: a warm repeat of the same prompt would skip its prefill, which is not
    # what a cold adapter costs.
    config = EngineConfig(dtype=loaded.dtype, max_batch=32, kv_cache_memory=128 << 20,
                          adapter_memory=adapter_memory, adapter_host_memory=host_memory,
                          prefix_caching=False)
    engine = AsyncLLMEngine(LLMEngine(config, loaded, registry))
    engine.start()
    return engine


async def run_async(loaded: LoadedModel, registry: AdapterRegistry, count: int, busy: int) -> dict[str, Any]:
    prompt = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}], tokenize=False,
                                                  add_generation_prompt=True)
    ids = [f"ad{i}" for i in range(max(count, 16 + busy))]
    one = (await asyncio.to_thread(registry.load_adapter, ids[0])).num_params * 2
    engine = scenario_engine(loaded, registry, 256 << 20, 0)  # everything fits: nothing evicted
    try:
        await ttft(engine, "warmup", prompt, None)
        split = loader_split(registry, engine.engine, ids[-8:])
        cold = await cold_and_warm(engine, prompt, ids[:8])
    finally:
        engine.shutdown()
    engine = scenario_engine(loaded, registry, 4 * one, 1 << 30)  # 4 on the device, the rest on the host
    try:
        await ttft(engine, "warmup", prompt, None)
        for adapter_id in ids[8:16]:  # read each once: the later ones evict the earlier ones
            await ttft(engine, f"first-{adapter_id}", prompt, adapter_id)
        host = await cold_and_warm(engine, prompt, ids[8:12])  # evicted: back from the host tier
        host_hits = engine.engine.adapter_cache.stats().host_hits
    finally:
        engine.shutdown()
    engine = scenario_engine(loaded, registry, 256 << 20, 0)
    try:
        with CollectorPauses() as pauses:
            loaded_ttft = await under_load(engine, prompt, ids[:16], ids[16:16 + busy])
        loaded_ttft["garbage_collector"] = pauses.summary()
    finally:
        engine.shutdown()
    return {"split": split, "cold": cold, "host": host, "host_hits": host_hits, "under_load": loaded_ttft}


def run(dtype: str, adapters: int, busy: int, gc_freeze: bool = True) -> dict[str, Any]:
    # the model loads on a passing thread and this one computes alone: the engine's step thread
    # is to hold the only OpenMP team (threads.py), as in the server
    threads = torch.get_num_threads()  # the step thread's pool
    loaded = run_on_passing_thread(load_base_model, None, dtype)
    confine_this_thread()
    with tempfile.TemporaryDirectory() as root:
        registry = make_registry(Path(root), loaded, max(adapters, 16 + busy))
        with frozen_startup_heap() if gc_freeze else nullcontext() as heap:  # as the server does
            report = asyncio.run(run_async(loaded, registry, adapters, busy))
    report.update(dtype=dtype, threads=threads, startup_heap_freeze=heap and asdict(heap),
                  cold_added_ms_median=statistics.median(r["added_ms"] for r in report["cold"]),
                  host_added_ms_median=statistics.median(r["added_ms"] for r in report["host"]))
    return report


def print_table(report: dict[str, Any]) -> None:
    split = report["split"]
    print("loader split (median of 8 adapters): " + ", ".join(f"{k} {v:.1f}" for k, v in split.items()))
    print(f"{'scenario':<28} {'cold/busy TTFT ms':>18} {'warm TTFT ms':>13} {'added ms':>9}")
    for name, key in (("from disk", "cold"), ("from the host tier", "host")):
        rows = report[key]
        print(f"{name:<28} {statistics.median(r['cold_ms'] for r in rows):>18.1f} "
              f"{statistics.median(r['warm_ms'] for r in rows):>13.1f} "
              f"{statistics.median(r['added_ms'] for r in rows):>9.1f}")
    busy = report["under_load"]
    print(f"{'disk, 16 streams (p50/p99)':<28} {busy['cold_ms_p50']:>18.1f} {busy['warm_ms_p50']:>13.1f} "
          f"{busy['added_ms_p50']:>5.1f}/{busy['added_ms_p99']:.1f}")
    print(f"{'  control: warm after warm':<28} {'':>18} {'':>13} "
          f"{busy['control_added_ms_p50']:>5.1f}/{busy['control_added_ms_p99']:.1f}")
    print(f"{'  TTFT p99: cold vs warm':<28} {busy['cold_ms_p99']:>18.1f} {busy['warm_ms_p99']:>13.1f} "
          f"{busy['cold_ms_p99'] - busy['warm_ms_p99']:>9.1f}")
    print(f"{'  TTFT p99: control vs warm':<28} {busy['control_ms_p99']:>18.1f} {busy['warm_ms_p99']:>13.1f} "
          f"{busy['control_ms_p99'] - busy['warm_ms_p99']:>9.1f}")
    collector = busy["garbage_collector"]
    print(f"host-tier installs: {report['host_hits']}; {report['dtype']}, {report['threads']} threads, "
          f"{busy['count']} cold loads under load; garbage collector under load: "
          f"{collector['collections']} collections, longest {collector['longest_ms']:.1f} ms "
          f"(start-up heap {'frozen' if report['startup_heap_freeze'] else 'not frozen'})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="nf4", choices=("nf4", "fp32", "int8", "bf16"))
    parser.add_argument("--adapters", type=int, default=24)
    parser.add_argument("--under-load", type=int, default=100, help="cold loads while 16 requests stream")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-gc-freeze", dest="gc_freeze", action="store_false",
                        help="leave the start-up heap to the garbage collector (the server freezes it)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args.dtype, args.adapters, args.under_load, args.gc_freeze)
    print(json.dumps(report, indent=2))
    print_table(report)


if __name__ == "__main__":
    main()
