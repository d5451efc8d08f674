"""Benchmark: base-model load time, resident bytes, one decode step at several batch sizes.

    python -m prolora_serve.server.engine.bench_model --dtypes nf4 fp32 --batches 1 32
    prolora-serve bench model --dtypes nf4 --batches 32 --adapters 32 --steps 60

Prints one JSON object, then a table. ``int8-bnb`` runs bitsandbytes' own CPU forward on the same
int8 weights (for comparison with our weight-only dequantizing path). Timing is the median over the
measured steps; the CPU is often shared, so also look at the minimum (and try --threads 1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import bitsandbytes as bnb
import torch

from ...kernels import (AdapterContext, AdapterStep, AdapterWeightPool, NoAdapters,
                        build_adapter_batch, get_backend)
from ...kernels.metadata import SeqSlice, StepMetadata, blocks_needed, build_attention_metadata
from ..config import ADAPTER_DTYPES
from .bench import random_adapter
from .engine import resolve_adapter_dtype
from .loader import LoadedModel, default_model_hf_dir, load_base_model
from .quantize import Int8Linear


def use_bnb_native_forward(loaded: LoadedModel) -> None:
    """Swap our int8 CPU forward for bitsandbytes' own, keeping the very same quantized weights."""
    for module in loaded.model.modules():
        if isinstance(module, Int8Linear):
            module.__class__ = bnb.nn.Linear8bitLt


def distinct_adapters(loaded: LoadedModel, count: int, batch: int,
                      adapter_dtype: str = "auto") -> AdapterStep:
    """``count`` random PRoLoRA adapters (``bench.py``'s: r=8, u=1, m=n=7 on all seven
    projections) resident in ``adapter_dtype`` as the engine resolves it (``--adapter-dtype``),
    row i of the batch on adapter i % count."""
    model = loaded.model
    pool = AdapterWeightPool(model.device, resolve_adapter_dtype(adapter_dtype, loaded.dtype, model.dtype))
    for slot in range(count):
        pool.load(slot, random_adapter(model.linear_shapes(), slot))
    context = AdapterContext(pool, get_backend("auto", model.device, model.dtype))
    return context.for_step(build_adapter_batch([i % count for i in range(batch)], model.device))


@torch.inference_mode()
def decode_step_times(loaded: LoadedModel, batch: int, context: int, steps: int,
                      adapters: AdapterStep | None = None) -> tuple[list[float], list[float]]:
    """Seconds per decode step of ``batch`` sequences whose context is ``context`` tokens; with
    ``adapters``, each step also runs with them, right after the base-only one (interleaved)."""
    model, block_size = loaded.model, 16
    per_seq = blocks_needed(context + steps + 1, block_size)
    kv = model.make_kv_cache(batch * per_seq, block_size)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
    vocab = loaded.hf_config.vocab_size
    for table in tables:  # prefill each sequence's context
        meta = build_attention_metadata([SeqSlice(table, 0, context)], block_size)
        model(torch.randint(0, vocab, (context,)), torch.arange(context), StepMetadata(meta), kv)
    appliers = [NoAdapters()] if adapters is None else [NoAdapters(), adapters]
    times: list[list[float]] = [[] for _ in appliers]
    for step in range(steps):
        cached = context + step
        meta = build_attention_metadata([SeqSlice(t, cached, 1) for t in tables], block_size)
        ids, positions = torch.randint(0, vocab, (batch,)), torch.full((batch,), cached)
        for applier, measured in zip(appliers, times):  # both write the same KV positions
            started = time.perf_counter()
            model.compute_logits(model(ids, positions, StepMetadata(meta, applier), kv))
            measured.append(time.perf_counter() - started)
    base, *adapted = (measured[1:] for measured in times)  # the first step warms caches
    return base, adapted[0] if adapted else []


def run(dtypes: list[str], batches: list[int], context: int, steps: int,
        cache_dir: Path | None = None, adapters: int = 0, adapter_dtype: str = "auto") -> dict:
    started = time.perf_counter()
    default_model_hf_dir(cache_dir)  # converts the GGUF on first use
    results: dict = {"context": context, "steps": steps, "threads": torch.get_num_threads(),
                     "adapters": adapters, "adapter_dtype": adapter_dtype,
                     "convert_or_locate_s": round(time.perf_counter() - started, 2), "runs": []}
    for name in dtypes:
        loaded = load_base_model(None, dtype=name.removesuffix("-bnb"), cache_dir=cache_dir)
        if name.endswith("-bnb"):
            use_bnb_native_forward(loaded)
        for batch in batches:
            step = distinct_adapters(loaded, adapters, batch, adapter_dtype) if adapters else None
            times, adapted = decode_step_times(loaded, batch, context, steps, step)
            row = {"dtype": name, "batch": batch, "load_s": round(loaded.load_seconds, 2),
                   "nbytes": loaded.nbytes, "step_ms_median": round(1e3 * statistics.median(times), 2),
                   "step_ms_min": round(1e3 * min(times), 2),
                   "tokens_per_s": round(batch / statistics.median(times), 1)}
            if adapted:
                row.update(adapted_step_ms_median=round(1e3 * statistics.median(adapted), 2),
                           # base / adapted of each interleaved pair, then the median
                           base_over_adapted=round(statistics.median(
                               b / a for b, a in zip(times, adapted)), 3))
            results["runs"].append(row)
    return results


def print_table(results: dict) -> None:
    print(f"threads {results['threads']}, context {results['context']} tokens, "
          f"default model convert/locate {results['convert_or_locate_s']} s")
    header = f"{'dtype':8} {'batch':>5} {'load s':>7} {'MiB':>7} {'median ms':>10} {'min ms':>8} {'tok/s':>8}"
    if results["adapters"]:
        header += f" {'adapted ms':>11} {'base/adapted':>13}"
    print(header)
    for r in results["runs"]:
        line = (f"{r['dtype']:8} {r['batch']:5d} {r['load_s']:7.2f} {r['nbytes'] / 2**20:7.1f} "
                f"{r['step_ms_median']:10.2f} {r['step_ms_min']:8.2f} {r['tokens_per_s']:8.1f}")
        if "adapted_step_ms_median" in r:
            line += f" {r['adapted_step_ms_median']:11.2f} {r['base_over_adapted']:13.3f}"
        print(line)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["nf4", "fp32"],
                        choices=["nf4", "int8", "int8-bnb", "bf16", "fp32"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="an empty directory measures the first conversion and quantization")
    parser.add_argument("--adapters", type=int, default=0,
                        help="also time each step with this many distinct adapters (row i on "
                             "adapter i %% N), interleaved with the base-only step")
    parser.add_argument("--adapter-dtype", default="auto", choices=ADAPTER_DTYPES,
                        help="resident weights of --adapters (auto: as the engine chooses)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (1 is steadier on a shared CPU)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(args.dtypes, args.batches, args.context, args.steps, args.cache_dir, args.adapters,
                  args.adapter_dtype)
    print(json.dumps(results))
    print_table(results)


if __name__ == "__main__":
    main()
