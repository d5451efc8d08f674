"""The device check: one command on one H100/H200 (no network) that verifies and measures the GPU path.

    prolora-serve bench device [--dry-run] [--budget-s 450] [--json PATH] [--skip STEP ...]
    bash scripts/device_check.sh          # on a device machine without this project installed

Steps (``--dry-run`` lists them with what this machine has, and exits 0 without a GPU):
  env        the GPU, versions, and the device-to-device copy bandwidth every floor below uses
  tests      ``pytest -m "triton or gpu"`` on the device (TRITON_INTERPRET unset): the Triton
             kernels against float64, engine logits against transformers on the same weights,
             batch invariance of a mixed batch, CUDA graphs on against off (same tokens)
  kernels    the slot-table adapter kernels per module (LLaMA2-7B shapes, 32 rows on 32
             distinct adapters) against their bytes floor, beside the module's bf16 base GEMM
  throughput 32 concurrent requests of 128 prompt + 128 generated tokens: base only / 32
             distinct PRoLoRA r=8 u=1 m=n=7 / 32 distinct LoRA r=8 / 1 shared adapter, and
             PRoLoRA r=32 u=4 m=n=7 against LoRA r=16 (32 distinct), on a LLaMA2-7B-shaped
             model with random weights built on the device (bf16 and nf4) and on SmolLM2-135M
             (the embedded weights where converted on this machine, else its shapes with random
             weights); the decode step against its weight-bytes floor
Prints one JSON document (also written to ``--json``, default ``$OUT/device-check.json`` where
``OUT`` is set), then one table, last. Each step stops the check from starting work that would
end past ``--budget-s``; what was skipped says so. Imports stay within what a device machine
has (torch, triton, transformers, safetensors, numpy, pytest) plus bitsandbytes, which travels
as a wheel (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
GPU_TEST_FILES = ("tests/test_kernels_triton_attention.py", "tests/test_kernels_triton.py",
                  "tests/test_engine_cuda_graphs.py", "tests/test_engine_gpu.py")
REQUESTS, PROMPT_TOKENS, GENERATED_TOKENS = 32, 128, 128
GIB = 1 << 30
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# name -> (r, u, m, n) of its adapters, or None (base only); "shared": one adapter for every row
VARIANTS: dict[str, tuple[int, int, int, int] | None] = {
    "base only": None,
    "32 distinct PRoLoRA r=8 u=1 m=n=7": (8, 1, 7, 7),
    "32 distinct LoRA r=8": (8, 8, 1, 1),
    "1 shared PRoLoRA r=8 u=1 m=n=7": (8, 1, 7, 7),
    "32 distinct PRoLoRA r=32 u=4 m=n=7": (32, 4, 7, 7),
    "32 distinct LoRA r=16": (16, 16, 1, 1),
}
PAPER_PAIR = ("32 distinct PRoLoRA r=32 u=4 m=n=7", "32 distinct LoRA r=16")
# (model, weight format, variants), in the order they run (most telling first)
THROUGHPUT_RUNS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("llama2-7b", "bf16", tuple(VARIANTS)),
    ("llama2-7b", "nf4", tuple(VARIANTS)),
    ("smollm2-135m", "nf4", tuple(VARIANTS)[:4]),
    ("smollm2-135m", "bf16", tuple(VARIANTS)[:4]),
)
KERNEL_MODULES = {"q_proj": (4096, 4096), "gate_proj": (4096, 11008), "down_proj": (11008, 4096)}
KERNEL_VARIANTS = ("32 distinct PRoLoRA r=8 u=1 m=n=7", "32 distinct LoRA r=8",
                   "32 distinct PRoLoRA r=32 u=4 m=n=7", "32 distinct LoRA r=16")


@dataclass
class Step:
    name: str
    summary: str
    estimate_s: float  # what the step is expected to take on an H100/H200 (for the budget)
    run: Callable[["Check"], None]


@dataclass
class Check:
    budget_s: float
    started: float = field(default_factory=time.perf_counter)
    results: dict[str, Any] = field(default_factory=dict)
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)  # section, item, value, note
    bandwidth: float | None = None  # bytes/s, read + written, of a device copy

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def fits(self, estimate_s: float) -> bool:
        return self.elapsed() + estimate_s <= self.budget_s

    def row(self, section: str, item: str, value: str, note: str = "") -> None:
        self.rows.append((section, item, value, note))
        print(f"[{self.elapsed():6.1f}s] {section} | {item} | {value} | {note}", flush=True)


# --- what this machine has ----------------------------------------------------------------------
def environment() -> dict[str, Any]:
    """Versions and the device, without initialising CUDA when there is none."""
    found = {name: importlib.util.find_spec(name) is not None
             for name in ("torch", "triton", "transformers", "safetensors", "bitsandbytes", "pytest",
                          "peft", "numpy")}
    info: dict[str, Any] = {"python": platform.python_version(), "packages": found}
    if found["torch"]:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.is_available()
        if info["cuda"]:
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = props.name
            info["gpu_memory_gib"] = round(props.total_memory / GIB, 1)
            info["multiprocessors"] = props.multi_processor_count
    for name in ("triton", "transformers", "bitsandbytes"):
        if found[name]:
            try:
                info[name] = __import__(name).__version__
            except Exception as err:  # noqa: BLE001 - a broken install is reported, not fatal
                info[name] = f"import failed: {err}"
    return info


def copy_bandwidth(nbytes: int = 2 * GIB, repeats: int = 10) -> float:
    """Bytes per second a device-to-device copy moves, counting bytes read and written."""
    import torch

    source = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    for _ in range(2):
        target.copy_(source)
    seconds = cuda_time(lambda: target.copy_(source), repeats)
    del source, target
    return 2 * nbytes / seconds


def graph_time(fn: Callable[[], Any], repeats: int) -> float:
    """Mean seconds of ``fn`` as the GPU runs it: ``repeats`` calls captured in one CUDA graph and
    the graph replayed (no launch overhead, as under the engine's decode graphs); falls back to
    ``cuda_time`` where ``fn`` cannot be captured."""
    import torch

    try:
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(repeats):
                fn()
        return cuda_time(graph.replay, 3) / repeats
    except Exception:  # noqa: BLE001 - measured the plain way instead
        return cuda_time(fn, repeats)


def cuda_time(fn: Callable[[], Any], repeats: int) -> float:
    """Mean seconds of ``fn`` on the current stream, by CUDA events (after one warm call)."""
    import torch

    fn()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1000 / repeats


def step_env(check: Check) -> None:
    info = environment()
    check.bandwidth = copy_bandwidth()
    info["copy_bandwidth_tb_s"] = round(check.bandwidth / 1e12, 3)
    check.results["env"] = info
    check.row("env", "device", info.get("gpu", "?"), f"torch {info.get('torch')}, triton "
              f"{info.get('triton')}, bitsandbytes {info.get('bitsandbytes', 'missing')}")
    check.row("env", "device copy", f"{check.bandwidth / 1e12:.2f} TB/s",
              "read + written; the floors take it as the rate reads alone reach")


# --- tests on the device ------------------------------------------------------------------------
def step_tests(check: Check, timeout_s: float = 180) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-m", "triton or gpu", "-p", "no:cacheprovider",
                   "-o", "addopts=", f"--junitxml={report}", *GPU_TEST_FILES]
        started = time.perf_counter()
        try:
            done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=timeout_s)
            tail, code = (done.stdout + done.stderr)[-4000:], done.returncode
        except subprocess.TimeoutExpired as err:
            tail, code = f"timed out after {timeout_s} s: {str(err.stdout)[-2000:]}", -1
        seconds = time.perf_counter() - started
        cases = parse_junit(report) if report.is_file() else []
    counts = {outcome: sum(c["outcome"] == outcome for c in cases)
              for outcome in ("passed", "failed", "skipped")}
    check.results["tests"] = {"command": " ".join(command), "returncode": code, "seconds": round(seconds, 1),
                              **counts, "cases": cases, "output_tail": tail if code else ""}
    check.row("tests", "pytest -m 'triton or gpu'", f"{counts['passed']} passed, {counts['failed']} "
              f"failed, {counts['skipped']} skipped", f"{seconds:.0f} s, exit {code}")
    for case in cases:
        if case["outcome"] == "failed" or case["name"].startswith("test_engine_gpu"):
            check.row("tests", case["name"], case["outcome"], f"{case['seconds']:.1f} s")


def parse_junit(path: Path) -> list[dict[str, Any]]:
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
        elif case.find("skipped") is not None:
            outcome = "skipped"
        module = case.get("classname", "").rsplit(".", 1)[-1]
        cases.append({"name": f"{module}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time", 0))})
    return cases


# --- adapters -----------------------------------------------------------------------------------
class MemoryAdapterSource:
    """An ``AdapterSource`` over adapters made on demand: ``count`` distinct adapters of one
    (r, u, m, n), each the same random draw scaled by its own factor (distinct weights, distinct
    allocations, one draw: 32 LoRA r=16 adapters of a 7B model are 2.6 GB of random numbers
    otherwise)."""

    def __init__(self, shapes: dict[str, tuple[int, int]], variant: tuple[int, int, int, int],
                 count: int, seed: int = 0, std: float = 0.02) -> None:
        import torch

        from ...adapters.config import ProLoRAConfig
        from ...adapters.weights import CompactAdapter

        r, u, m, n = variant
        config = ProLoRAConfig(r=r, unshared_r=u, reduce_lora_A_x=m, reduce_lora_B_x=n,
                               lora_alpha=2 * r, target_modules=ALL_PROJECTIONS)
        self.base = CompactAdapter.random(config, shapes, torch.Generator().manual_seed(seed),
                                          dtype=torch.float16, std=std)
        self.ids = [f"ad{i}" for i in range(count)]

    def has_adapter(self, adapter_id: str) -> bool:
        return adapter_id in self.ids

    def load_adapter(self, adapter_id: str):
        from ...adapters.registry import AdapterNotFoundError
        from ...adapters.weights import CompactAdapter, CompactLinearWeights

        if adapter_id not in self.ids:
            raise AdapterNotFoundError(adapter_id)
        factor = 1.0 + self.ids.index(adapter_id) / 64
        return CompactAdapter(self.base.config, {
            path: CompactLinearWeights(w.spec, w.A0 * factor, w.B0, w.Au * factor, w.Bu)
            for path, w in self.base.modules.items()})


# --- throughput ---------------------------------------------------------------------------------
def model_config(name: str):
    from transformers import LlamaConfig

    return LlamaConfig(**(LLAMA2_7B if name == "llama2-7b" else SMOLLM2_135M))


def build_model(name: str, dtype: str):
    """(LoadedModel, where its weights come from)."""
    from .loader import load_base_model, random_base_model

    if name == "smollm2-135m":
        from .default_model import DEFAULT_MODEL_NAME, CONVERSION_VERSION, cache_root, is_converted

        if is_converted(cache_root() / f"{DEFAULT_MODEL_NAME}-v{CONVERSION_VERSION}"):
            return load_base_model(None, dtype, "cuda"), "the embedded SmolLM2-135M-Instruct"
        weights = "random (the embedded model is not converted on this machine)"
    else:
        weights = "random, built on the device layer by layer"
    return random_base_model(model_config(name), dtype, "cuda", name=name), weights


def engine_for(loaded, source, requests: int = REQUESTS, kv_cache_memory: int = 6 * GIB,
               enforce_eager: bool = False):
    from .engine import EngineConfig, LLMEngine

    config = EngineConfig(dtype=loaded.dtype, device=str(loaded.model.device), max_batch=requests,
                          max_batched_tokens=2048, kv_cache_memory=kv_cache_memory,
                          adapter_memory=8 * GIB, max_model_len=512, enforce_eager=enforce_eager)
    return LLMEngine(config, loaded, source)


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prompts(vocab: int, count: int, length: int, seed: int) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (length,), generator=gen).tolist() for _ in range(count)]


def drain(engine) -> dict[str, Any]:
    """Step until idle: generated tokens, and the time and tokens of pure decode steps."""
    generated, decode_s, decode_tokens, step_times = 0, 0.0, 0, []
    while engine.has_work():
        started = time.perf_counter()
        outputs = engine.step()
        seconds = time.perf_counter() - started
        for output in outputs:
            if output.error is not None:
                raise output.error
            generated += len(output.token_ids)
        counters = engine._counters  # noqa: SLF001 - the bench reads the step it just ran
        if engine.last_step_ran and counters.last_batch_tokens == counters.last_batch_size:
            decode_s += seconds
            decode_tokens += counters.last_batch_size
            step_times.append(seconds)
        elif not engine.last_step_ran and not outputs:
            time.sleep(0.001)  # adapters being read
    return {"generated": generated, "decode_s": decode_s, "decode_tokens": decode_tokens,
            "step_times": step_times}


def measure_variant(loaded, variant: str, seed: int, requests: int = REQUESTS,
                    prompt_tokens: int = PROMPT_TOKENS, generated_tokens: int = GENERATED_TOKENS,
                    kv_cache_memory: int = 6 * GIB) -> dict[str, Any]:
    """One engine, warmed (adapters resident, kernels compiled, graphs captured), then the timed
    ``requests`` concurrent requests (``variant``: a VARIANTS name)."""
    from .sampling import SamplingParams

    spec = VARIANTS[variant]
    shapes = loaded.model.linear_shapes()
    source = (MemoryAdapterSource(shapes, spec, 1 if variant.startswith("1 shared") else requests,
                                  seed) if spec is not None else None)
    ids: list[str | None] = [None] * requests if source is None else [
        source.ids[i % len(source.ids)] for i in range(requests)]
    engine = engine_for(loaded, source, requests, kv_cache_memory)
    vocab = loaded.hf_config.vocab_size
    warm = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    for i, (ids_, adapter) in enumerate(zip(prompts(vocab, requests, 16, seed + 1), ids)):
        engine.add_request(f"warm{i}", ids_, warm, adapter)
    drain(engine)
    graphs = engine.runner.graphs
    if graphs is not None:
        graphs.capture_all()
    synchronize()
    params = SamplingParams(max_tokens=generated_tokens, temperature=0, ignore_eos=True)
    started = time.perf_counter()
    for i, (ids_, adapter) in enumerate(zip(prompts(vocab, requests, prompt_tokens, seed), ids)):
        engine.add_request(f"req{i}", ids_, params, adapter)
    run = drain(engine)
    seconds = time.perf_counter() - started
    cache = engine.adapter_cache
    result = {
        "variant": variant, "requests": requests, "generated_tokens": run["generated"],
        "seconds": round(seconds, 3), "tokens_per_s": round(run["generated"] / seconds, 1),
        "decode_tokens_per_s": round(run["decode_tokens"] / max(run["decode_s"], 1e-9), 1),
        "decode_step_ms_median": round(1000 * statistics.median(run["step_times"]), 3)
        if run["step_times"] else None,
        "decode_steps": len(run["step_times"]),
        "graphs": "off: " + str(engine.runner.graphs_off_reason) if graphs is None else
        f"on ({graphs.num_captures} captured, {graphs.num_replays} replays)",
        "backends": {"adapter": engine.runner.backends.adapter,
                     "decode_attention": engine.runner.backends.decode_attention},
        "adapter_bytes": cache.used_bytes if cache is not None else 0,
        "kv_bytes_per_token": engine.runner.kv_cache.nbytes // max(
            engine.runner.kv_cache.num_blocks * engine.runner.block_size, 1),
    }
    del engine, source
    release_memory()
    return result


def step_throughput(check: Check) -> None:
    runs = check.results.setdefault("throughput", [])
    for model_name, dtype, variants in THROUGHPUT_RUNS:
        estimate = 20 + 12 * len(variants) if model_name == "llama2-7b" else 6 * len(variants)
        if not check.fits(estimate):
            check.row("throughput", f"{model_name} {dtype}", "skipped", "past --budget-s")
            continue
        if importlib.util.find_spec("bitsandbytes") is None:  # the loader imports it, any format
            check.row("throughput", f"{model_name} {dtype}", "skipped",
                      "bitsandbytes missing (carry its wheel: docs/BENCHMARKS.md)")
            continue
        try:
            started = time.perf_counter()
            loaded, weights = build_model(model_name, dtype)
            entry = {"model": model_name, "dtype": dtype, "weights": weights,
                     "build_s": round(time.perf_counter() - started, 1),
                     "model_bytes": loaded.nbytes, "variants": []}
            runs.append(entry)
            for index, variant in enumerate(variants):
                if not check.fits(12 if model_name == "llama2-7b" else 5):
                    check.row("throughput", f"{model_name} {dtype} {variant}", "skipped", "past --budget-s")
                    continue
                result = measure_variant(loaded, variant, seed=index)
                entry["variants"].append(result)
                check.row("throughput", f"{model_name} {dtype} {variant}",
                          f"{result['decode_tokens_per_s']:.0f} tok/s decode",
                          f"{result['tokens_per_s']:.0f} tok/s overall, step "
                          f"{result['decode_step_ms_median']} ms, graphs {result['graphs']}")
            summarize_model(check, entry, loaded)
            del loaded
        except Exception as err:  # noqa: BLE001 - one model's failure leaves the others to run
            check.row("throughput", f"{model_name} {dtype}", "FAILED", f"{type(err).__name__}: {err}")
            check.results.setdefault("errors", []).append(f"{model_name} {dtype}: {err!r}")
        release_memory()


def summarize_model(check: Check, entry: dict[str, Any], loaded) -> None:
    """Ratios against base only, the paper's pair, and the decode step against its floors."""
    by_name = {v["variant"]: v for v in entry["variants"]}
    base = by_name.get("base only")
    label = f"{entry['model']} {entry['dtype']}"
    if base:
        for name, result in by_name.items():
            if name != "base only":
                result["vs_base"] = round(result["decode_tokens_per_s"] / base["decode_tokens_per_s"], 3)
                check.row("ratio", f"{label} {name} / base only", f"{result['vs_base']:.3f}x",
                          "target >= 0.90x (LLaMA2-7B, 32 distinct PRoLoRA)"
                          if "distinct PRoLoRA r=8" in name and entry["model"] == "llama2-7b" else "")
    if all(p in by_name for p in PAPER_PAIR):
        ratio = by_name[PAPER_PAIR[0]]["decode_tokens_per_s"] / by_name[PAPER_PAIR[1]]["decode_tokens_per_s"]
        entry["paper_pair_ratio"] = round(ratio, 3)
        check.row("ratio", f"{label} PRoLoRA r=32 u=4 / LoRA r=16", f"{ratio:.3f}x", "target >= 1.0x")
    if base and base["decode_step_ms_median"] and check.bandwidth:
        config = loaded.hf_config
        embed = config.vocab_size * config.hidden_size * loaded.model.dtype.itemsize
        weights = loaded.nbytes - (0 if config.tie_word_embeddings else embed)  # rows, not the table
        context = PROMPT_TOKENS + GENERATED_TOKENS / 2
        kv = base["kv_bytes_per_token"] * context * REQUESTS
        floor_ms = 1000 * weights / check.bandwidth
        floor_kv_ms = 1000 * (weights + kv) / check.bandwidth
        step = base["decode_step_ms_median"]
        entry["decode_floor"] = {"weight_bytes": weights, "kv_bytes_at_mean_context": int(kv),
                                 "floor_ms": round(floor_ms, 3), "floor_with_kv_ms": round(floor_kv_ms, 3),
                                 "step_ms": step, "step_over_floor": round(step / floor_ms, 2)}
        check.row("floor", f"{label} decode step, batch {REQUESTS}", f"{step:.2f} ms",
                  f"weights floor {floor_ms:.2f} ms ({step / floor_ms:.2f}x; target <= 1.5x for bf16 7B), "
                  f"with KV at {context:.0f} tokens {floor_kv_ms:.2f} ms")


# --- the adapter kernels per module -------------------------------------------------------------
def step_kernels(check: Check) -> None:
    import torch
    import torch.nn.functional as F

    from ...adapters.config import ProLoRAConfig
    from ...adapters.weights import CompactAdapter
    from ...kernels import AdapterWeightPool, build_adapter_batch
    from ...kernels.triton_backend import TritonBackend

    rows = []
    x_rows = REQUESTS
    for module, (h, o) in KERNEL_MODULES.items():
        path = f"model.layers.0.mlp.{module}" if module != "q_proj" else "model.layers.0.self_attn.q_proj"
        x = torch.randn(x_rows, h, device="cuda", dtype=torch.bfloat16)
        weight = torch.randn(o, h, device="cuda", dtype=torch.bfloat16) * 0.02
        base_s = graph_time(lambda: F.linear(x, weight), 20)
        base_floor = (weight.numel() * 2 + x.numel() * 2 + x_rows * o * 2) / check.bandwidth
        for variant in KERNEL_VARIANTS:
            r, u, m, n = VARIANTS[variant]
            config = ProLoRAConfig(r=r, unshared_r=u, reduce_lora_A_x=m, reduce_lora_B_x=n,
                                   lora_alpha=2 * r, target_modules=(module,))
            pool = AdapterWeightPool("cuda", torch.bfloat16)
            gen = torch.Generator().manual_seed(r + u)
            adapter = CompactAdapter.random(config, {path: (h, o)}, gen, std=0.02)
            for slot in range(REQUESTS):
                pool.load(slot, adapter)
            backend = TritonBackend()
            batch = build_adapter_batch(list(range(REQUESTS)), "cuda")
            y = torch.zeros(x_rows, o, device="cuda", dtype=torch.bfloat16)
            seconds = graph_time(lambda: backend.apply(y, x, pool, path, batch), 20)
            params = adapter.num_params
            nbytes = REQUESTS * params * 2 + x.numel() * 2 + 2 * y.numel() * 2  # y read and written
            floor = nbytes / check.bandwidth
            rows.append({"module": module, "h": h, "o": o, "variant": variant, "us": round(1e6 * seconds, 2),
                         "bytes": nbytes, "floor_us": round(1e6 * floor, 2),
                         "over_floor": round(seconds / floor, 2), "base_gemm_us": round(1e6 * base_s, 2),
                         "base_floor_us": round(1e6 * base_floor, 2)})
            check.row("kernels", f"{module} {h}x{o} {variant}", f"{1e6 * seconds:.1f} us",
                      f"bytes floor {1e6 * floor:.1f} us ({seconds / floor:.1f}x); bf16 base GEMM "
                      f"{1e6 * base_s:.1f} us (floor {1e6 * base_floor:.1f})")
            del pool, backend
    check.results["kernels"] = rows


# --- the check ----------------------------------------------------------------------------------
STEPS = (
    Step("env", "GPU, versions, device-copy bandwidth (the floors' denominator)", 5, step_env),
    Step("tests", f"pytest -m 'triton or gpu' on the device: {', '.join(GPU_TEST_FILES)}", 120, step_tests),
    Step("kernels", "slot-table shrink/expand per module (7B shapes, 32 distinct adapters) vs bytes floor "
                    "and the bf16 base GEMM", 20, step_kernels),
    Step("throughput", "32 x (128 prompt + 128 generated): "
         + "; ".join(f"{m} {d}: {', '.join(v)}" for m, d, v in THROUGHPUT_RUNS)
         + "; decode step vs weight-bytes floor", 300, step_throughput),
)


def table(check: Check) -> str:
    headers = ("section", "item", "value", "note")
    rows = [headers, *check.rows]
    widths = [min(max(len(str(r[i])) for r in rows), 60) for i in range(3)]
    lines = []
    for index, row in enumerate(rows):
        cells = [str(c).ljust(w)[:max(w, 1)] for c, w in zip(row[:3], widths)]
        lines.append(" | ".join(cells + [str(row[3])]))
        if index == 0:
            lines.append("-+-".join("-" * w for w in widths) + "-+-" + "-" * 20)
    return "\n".join(lines)


def dry_run(steps: tuple[Step, ...]) -> int:
    info = environment()
    print("prolora-serve device check: the steps it runs on one H100/H200 (dry run: nothing runs)")
    for step in steps:
        print(f"  {step.name:<10} ~{step.estimate_s:>4.0f} s  {step.summary}")
    print("this machine:", json.dumps(info))
    if not info.get("cuda"):
        print("no CUDA device here: the check itself needs one (see docs/BENCHMARKS.md, device check)")
    if not info["packages"]["bitsandbytes"]:
        print("bitsandbytes is missing: nf4 steps will be skipped (carry its wheel, docs/BENCHMARKS.md)")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="prolora-serve bench device", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="list the steps and exit")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="start no work that would end past this many seconds (default 450)")
    parser.add_argument("--skip", nargs="+", default=[], choices=[s.name for s in STEPS if s.name != "env"],
                        help="steps to leave out")
    parser.add_argument("--json", type=Path, default=None,
                        help="where to write the JSON (default $OUT/device-check.json where OUT is set)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    steps = tuple(s for s in STEPS if s.name not in args.skip)
    if args.dry_run:
        return dry_run(steps)
    import torch

    if not torch.cuda.is_available():
        print("error: the device check needs a CUDA device (--dry-run lists its steps)", file=sys.stderr)
        return 2
    check = Check(args.budget_s)
    for step in steps:
        if step.name != "env" and not check.fits(min(step.estimate_s, 30)):
            check.row(step.name, "step", "skipped", "past --budget-s")
            continue
        try:
            step.run(check)
        except Exception as err:  # noqa: BLE001 - report it and go on with the next step
            check.row(step.name, "step", "FAILED", f"{type(err).__name__}: {err}")
            check.results.setdefault("errors", []).append(f"{step.name}: {err!r}")
    check.results["seconds"] = round(check.elapsed(), 1)
    check.results["table"] = [list(r) for r in check.rows]
    document = json.dumps(check.results, indent=2, default=str)
    target = args.json or (Path(os.environ["OUT"]) / "device-check.json" if os.environ.get("OUT") else None)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(document)
    print(document)
    print(table(check))
    failed = check.results.get("tests", {}).get("failed", 0) or check.results.get("errors")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
