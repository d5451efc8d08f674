"""Engine benchmark on the embedded default model: generated tokens/s and process memory.

Scenarios, per weight dtype (nf4, fp32): base model only; N concurrent requests on N distinct
PRoLoRA adapters (r=8, u=1, m=n=7 on all seven projections, random non-zero weights); the same
N requests on one shared adapter. Peer: Hugging Face PEFT ``generate(adapter_names=...)`` with N
dense LoRA adapters (r=8, same projections) in one mixed batch on the HF model, fp32 and
(QLoRA-style) bitsandbytes nf4 for the dtypes benchmarked. Memory:
RSS of a fresh process serving from an on-disk registry holding 1, 100 and 1000 adapters.

    python -m prolora_serve.server.engine.bench [--quick] [--requests N] [--tokens T]

Prints one JSON document, then a table. Timings on a shared machine are noisy: scenarios run
interleaved in rounds; the table shows each scenario's median run, and each ratio is computed
within a round (side by side) and then its median taken over rounds. Run it on a quiet
machine without ``OMP_WAIT_POLICY=PASSIVE``: that setting parks torch's pool threads between
parallel regions, and every one of a step's hundreds of regions then pays a wake-up (a 32-row
adapter kernel call 14-22 us -> 59-91 us). Only where other busy processes oversubscribe the
CPU do spinning threads cost more than that.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...adapters.config import ProLoRAConfig
from ...adapters.format import save_adapter
from ...adapters.registry import AdapterRegistry
from ...adapters.weights import CompactAdapter
from ..config import ADAPTER_DTYPES
from .engine import EngineConfig, LLMEngine
from .loader import LoadedModel, load_base_model
from .sampling import SamplingParams
from .startup_heap import CollectorPauses, frozen_startup_heap

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QUESTIONS = ("What is the capital of France?", "Explain photosynthesis in simple words.",
             "Write a haiku about the sea.", "How do vaccines work?",
             "Give me three tips for learning to cook.", "Why is the sky blue?",
             "Describe a cat to someone who has never seen one.", "What is a prime number?")
MIB = 1 << 20
PEFT_DTYPES = ("fp32", "nf4")  # weight formats the HF/PEFT peer runs in (bitsandbytes for nf4)
ADAPTER_STD = 0.02  # random but mild: the outputs stay text-like


@dataclass
class BenchConfig:
    dtypes: tuple[str, ...] = ("nf4", "fp32")
    requests: int = 32
    tokens: int = 64
    rss_counts: tuple[int, ...] = (1, 100, 1000)
    peft: bool = True
    rounds: int = 3  # each scenario runs this often, interleaved; medians count
    # room for every request's whole context in every scenario: with 128 MiB the distinct-adapter
    # run (whose prompts share no cached blocks) preempted 6 times where base-only preempted none
    kv_cache_memory: int = 512 * MIB
    adapter_memory: int = 256 * MIB
    adapter_dtype: str = "auto"  # resident adapter weights (EngineConfig.adapter_dtype)

    def __post_init__(self) -> None:
        if self.requests < 1 or self.tokens < 1 or self.rounds < 1:
            raise ValueError("--requests, --tokens and --rounds must be >= 1")
        if any(c < 1 for c in self.rss_counts) or list(self.rss_counts) != sorted(self.rss_counts):
            raise ValueError("--rss-counts must be increasing and >= 1")


@dataclass
class Measurement:
    scenario: str
    engine: str
    dtype: str
    requests: int
    generated_tokens: int
    seconds: float
    tokens_per_s: float
    steps: int = 0
    forward_share: float = 0.0  # of the wall time, inside the model forward (+ logits)
    overhead_ms_per_step: float = 0.0  # scheduling, sampling, detokenization, bookkeeping
    notes: dict[str, Any] = field(default_factory=dict)


def prolora_config() -> ProLoRAConfig:
    return ProLoRAConfig(r=8, unshared_r=1, reduce_lora_A_x=7, reduce_lora_B_x=7, lora_alpha=16,
                         target_modules=ALL_PROJECTIONS)


def random_adapter(shapes: dict[str, tuple[int, int]], seed: int) -> CompactAdapter:
    generator = torch.Generator().manual_seed(seed)
    return CompactAdapter.random(prolora_config(), shapes, generator, std=ADAPTER_STD)


def register_adapters(registry: AdapterRegistry, first: int, count: int) -> None:
    """Add adapters ``ad{first}`` .. ``ad{first + count - 1}`` through the registry's own path."""
    with tempfile.TemporaryDirectory() as scratch:
        for index in range(first, first + count):
            path = Path(scratch) / f"ad{index}.safetensors"
            save_adapter(random_adapter(registry.linear_shapes, index), path, single_file=True)
            registry.register_path(f"ad{index}", path)
            path.unlink()


def prompts(tokenizer: Any, count: int) -> list[str]:
    return [tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} (request {i})"}],
        tokenize=False, add_generation_prompt=True) for i in range(count)]


# --- our engine ---------------------------------------------------------------------------------
def drain(engine: LLMEngine) -> int:
    """Step until idle; returns the generated tokens. Sleeps briefly while waiting on reads."""
    generated = 0
    while engine.has_work():
        outputs = engine.step()
        generated += sum(len(o.token_ids) for o in outputs)
        for output in outputs:
            if output.error is not None:
                raise output.error
        if not engine.last_step_ran and not outputs:
            time.sleep(0.001)
    return generated


def engine_scenario(name: str, loaded: LoadedModel, registry: AdapterRegistry, cfg: BenchConfig,
                    adapter_ids: list[str | None], texts: list[str]) -> Measurement:
    engine = LLMEngine(EngineConfig(dtype=loaded.dtype, max_batch=max(cfg.requests, 1),
                                    max_batched_tokens=max(512, cfg.requests),
                                    kv_cache_memory=cfg.kv_cache_memory,
                                    adapter_memory=cfg.adapter_memory,
                                    adapter_dtype=cfg.adapter_dtype), loaded, registry)
    warm = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    for i, adapter_id in enumerate(dict.fromkeys(adapter_ids)):  # reads adapters, warms kernels
        engine.add_request(f"warm{i}", texts[i], warm, adapter_id)
    drain(engine)
    before = engine.stats()
    params = SamplingParams(max_tokens=cfg.tokens, temperature=0, ignore_eos=True)
    started = time.perf_counter()
    with CollectorPauses() as pauses:
        for i, adapter_id in enumerate(adapter_ids):
            engine.add_request(f"req{i}", texts[i], params, adapter_id)
        generated = drain(engine)
    seconds = time.perf_counter() - started
    after = engine.stats()
    steps = after.num_steps - before.num_steps
    forward = after.forward_seconds - before.forward_seconds
    cache = after.adapter_cache
    return Measurement(name, "prolora-serve", loaded.dtype, len(adapter_ids), generated, seconds,
                       generated / seconds, steps, forward / seconds,
                       1000 * (seconds - forward) / max(steps, 1),
                       {"resident_adapters": cache.num_resident if cache else 0,
                        "adapter_bytes": cache.used_bytes if cache else 0,
                        "preemptions": after.num_preemptions - before.num_preemptions,
                        "garbage_collector": pauses.summary(),
                        "adapter_dtype": str(engine.runner.pool.dtype).removeprefix("torch.")})


def scenario_plans(n: int) -> dict[str, list[str | None]]:
    return {"base only": [None] * n,
            f"{n} distinct PRoLoRA adapters": [f"ad{i}" for i in range(n)],
            "1 shared PRoLoRA adapter": ["ad0"] * n}


# --- the PEFT peer ------------------------------------------------------------------------------
def hf_base_model(directory: Path, dtype: str) -> Any:
    """The HF model in fp32, or (``nf4``) with bitsandbytes NF4 linears as QLoRA loads it."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    if dtype == "fp32":
        return LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.float32)
    return LlamaForCausalLM.from_pretrained(directory, quantization_config=quant, device_map="cpu",
                                            dtype=torch.float32).eval()


@dataclass
class PeftPeer:
    """HF ``LlamaForCausalLM`` (fp32 or bitsandbytes nf4) + PEFT with N dense LoRA adapters,
    one mixed batch."""

    dtype: str
    model: Any
    batch: dict[str, torch.Tensor]
    generate_kwargs: dict[str, Any]

    @classmethod
    def build(cls, cfg: BenchConfig, dtype: str) -> "PeftPeer":
        from peft import LoraConfig, get_peft_model
        from transformers import AutoTokenizer

        from .default_model import default_model_hf_dir

        directory = default_model_hf_dir()
        tokenizer = AutoTokenizer.from_pretrained(directory, padding_side="left")
        hf = hf_base_model(directory, dtype)
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=list(ALL_PROJECTIONS),
                          init_lora_weights=False)  # random, non-zero B
        model = get_peft_model(hf, lora, adapter_name="ad0")
        for i in range(1, cfg.requests):
            model.add_adapter(f"ad{i}", lora)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        batch = tokenizer(prompts(tokenizer, cfg.requests), return_tensors="pt", padding=True)
        kwargs = dict(do_sample=False, pad_token_id=pad,
                      adapter_names=[f"ad{i}" for i in range(cfg.requests)])
        return cls(dtype, model.eval(), dict(batch), kwargs)

    def measure(self, cfg: BenchConfig) -> Measurement:
        with torch.inference_mode():
            self.model.generate(**self.batch, max_new_tokens=2, **self.generate_kwargs)
            started = time.perf_counter()
            out = self.model.generate(**self.batch, max_new_tokens=cfg.tokens,
                                      min_new_tokens=cfg.tokens, **self.generate_kwargs)
            seconds = time.perf_counter() - started
        generated = (out.shape[1] - self.batch["input_ids"].shape[1]) * cfg.requests
        return Measurement(f"{cfg.requests} distinct LoRA adapters", "HF PEFT generate", self.dtype,
                           cfg.requests, generated, seconds, generated / seconds)


def run_rounds(cfg: BenchConfig, registry: AdapterRegistry) -> list[list[Measurement]]:
    """Every scenario once per round, rounds back to back, so that load from other processes
    hits all scenarios alike and each round's ratios compare runs minutes apart at most."""
    models = {dtype: load_base_model(None, dtype) for dtype in cfg.dtypes}
    peers = [PeftPeer.build(cfg, dtype) for dtype in cfg.dtypes if dtype in PEFT_DTYPES] if cfg.peft else []
    rounds = []
    with frozen_startup_heap():  # as the server does once serving: no full collection walks the models
        for _ in range(cfg.rounds):
            runs = [engine_scenario(name, loaded, registry, cfg, ids, prompts(loaded.tokenizer, cfg.requests))
                    for loaded in models.values() for name, ids in scenario_plans(cfg.requests).items()]
            rounds.append(runs + [peer.measure(cfg) for peer in peers])
    return rounds


def median_run(rounds: list[list[Measurement]]) -> list[Measurement]:
    """Per scenario, the run with the median tokens/s (the lower middle one for even counts)."""
    by_key: dict[tuple[str, str, str], list[Measurement]] = {}
    for runs in rounds:
        for m in runs:
            by_key.setdefault((m.engine, m.dtype, m.scenario), []).append(m)
    return [sorted(ms, key=lambda m: m.tokens_per_s)[(len(ms) - 1) // 2] for ms in by_key.values()]


def median_ratios(per_round: list[dict[str, float]]) -> dict[str, float]:
    """The median over rounds of each ratio, every one formed within its round (side by side)."""
    return {name: statistics.median(r[name] for r in per_round) for name in per_round[0]}


# --- memory: a fresh process per registry size ------------------------------------------------------
def rss_bytes() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


def rss_child(root: Path, dtype: str) -> dict[str, Any]:
    """Open the registry, serve 4 short requests on 4 of its adapters, report memory."""
    loaded = load_base_model(None, dtype)
    started = time.perf_counter()
    registry = AdapterRegistry(root, loaded.model.linear_shapes())
    scan_seconds = time.perf_counter() - started
    engine = LLMEngine(EngineConfig(dtype=dtype, kv_cache_memory=64 * MIB), loaded, registry)
    texts = prompts(loaded.tokenizer, 4)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    for i in range(4):
        engine.add_request(f"r{i}", texts[i], params, f"ad{i % len(registry)}")
    drain(engine)
    gc.collect()
    rss, hwm = rss_bytes()
    cache = engine.stats().adapter_cache
    return {"registered": len(registry), "rss_bytes": rss, "peak_rss_bytes": hwm,
            "registry_scan_seconds": scan_seconds, "resident_adapters": cache.num_resident,
            "resident_adapter_bytes": cache.used_bytes}


def rss_scenarios(cfg: BenchConfig, dtype: str) -> list[dict[str, Any]]:
    results = []
    with tempfile.TemporaryDirectory() as root:
        shapes = load_base_model(None, "fp32").model.linear_shapes()
        registry = AdapterRegistry(Path(root), shapes)
        for count in cfg.rss_counts:
            register_adapters(registry, len(registry), count - len(registry))
            command = [sys.executable, "-m", __spec__.name, "--rss-child", root, "--dtypes", dtype]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            report = json.loads(done.stdout.strip().splitlines()[-1])
            report["disk_bytes"] = sum(p.stat().st_size for p in Path(root).glob("*.safetensors"))
            results.append(report)
    return results


# --- report ---------------------------------------------------------------------------------------
def ratios(measurements: list[Measurement]) -> dict[str, float]:
    """Distinct adapters against base only (same dtype), against PEFT on the same weight format,
    and against the fastest PEFT run of any format."""
    speed = {(m.engine, m.dtype, m.scenario): m.tokens_per_s for m in measurements}
    peft = {m.dtype: m.tokens_per_s for m in measurements if m.engine != "prolora-serve"}
    out = {}
    for m in measurements:
        if m.engine != "prolora-serve" or "distinct" not in m.scenario:
            continue
        base = speed.get(("prolora-serve", m.dtype, "base only"))
        if base:
            out[f"{m.dtype}: distinct adapters / base only"] = m.tokens_per_s / base
        if m.dtype in peft:
            out[f"{m.dtype}: distinct adapters / PEFT ({m.dtype})"] = m.tokens_per_s / peft[m.dtype]
        if peft:
            fastest = max(peft, key=peft.get)
            out[f"{m.dtype}: distinct adapters / fastest PEFT run"] = m.tokens_per_s / peft[fastest]
    return out


def table(measurements: list[Measurement], memory: list[dict[str, Any]], summary: dict[str, float],
          per_round: list[dict[str, float]] | None = None) -> str:
    lines = [f"{'engine':<16} {'dtype':<5} {'adapters':<8} {'scenario':<32} {'tok/s':>8} {'tokens':>7} "
             f"{'s':>7} {'fwd%':>5} {'ovh ms/step':>11}"]
    for m in measurements:
        adapters = m.notes.get("adapter_dtype", "fp32")  # PEFT keeps LoRA weights in fp32
        lines.append(f"{m.engine:<16} {m.dtype:<5} {adapters:<8} {m.scenario:<32} {m.tokens_per_s:8.1f} "
                     f"{m.generated_tokens:7d} {m.seconds:7.2f} {100 * m.forward_share:5.1f} "
                     f"{m.overhead_ms_per_step:11.2f}")
    for name, value in summary.items():
        rounds = ", ".join(f"{r[name]:.2f}" for r in per_round or [])
        lines.append(f"{name:<60} {value:6.2f}x" + (f"  (per round: {rounds})" if rounds else ""))
    for r in memory:
        lines.append(f"registered {r['registered']:>5}: RSS {r['rss_bytes'] / MIB:8.1f} MiB "
                     f"(peak {r['peak_rss_bytes'] / MIB:.1f}), resident {r['resident_adapters']} "
                     f"adapters, registry on disk {r['disk_bytes'] / MIB:.0f} MiB, "
                     f"scan {r['registry_scan_seconds']:.2f} s")
    return "\n".join(lines)


def run(cfg: BenchConfig) -> dict[str, Any]:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as root:
        shapes = load_base_model(None, "fp32").model.linear_shapes()
        registry = AdapterRegistry(Path(root), shapes)
        register_adapters(registry, 0, cfg.requests)
        rounds = run_rounds(cfg, registry)
    memory = rss_scenarios(cfg, cfg.dtypes[0]) if cfg.rss_counts else []
    per_round = [ratios(runs) for runs in rounds]
    measurements, summary = median_run(rounds), median_ratios(per_round)
    return {"config": asdict(cfg), "torch_threads": torch.get_num_threads(),
            "load_average_before_after": [load_before, os.getloadavg()],
            "measurements": [asdict(m) for m in measurements], "ratios": summary,
            "rounds": [[asdict(m) for m in runs] for runs in rounds],
            "ratios_per_round": per_round, "memory": memory,
            "table": table(measurements, memory, summary, per_round)}


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, BenchConfig]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["nf4", "fp32"], choices=["nf4", "int8", "bf16", "fp32"])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64, help="generated tokens per request")
    parser.add_argument("--rss-counts", type=int, nargs="*", default=[1, 100, 1000])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repeats; medians count")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--adapter-dtype", default="auto", choices=ADAPTER_DTYPES,
                        help="resident adapter weights (default: the engine's auto)")
    parser.add_argument("--quick", action="store_true",
                        help="16 tokens, 1 round, registries of 1 and 100 adapters")
    parser.add_argument("--json", type=Path, help="also write the JSON document here")
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.rounds = min(args.tokens, 16), 1
        args.rss_counts = [c for c in args.rss_counts if c <= 100]
    cfg = BenchConfig(tuple(args.dtypes), args.requests, args.tokens, tuple(args.rss_counts),
                      not args.skip_peft, args.rounds, adapter_dtype=args.adapter_dtype)
    return args, cfg


def main(argv: list[str] | None = None) -> None:
    args, cfg = parse_args(argv)
    if args.rss_child:
        print(json.dumps(rss_child(Path(args.rss_child), cfg.dtypes[0])))
        return
    report = run(cfg)
    document = json.dumps({k: v for k, v in report.items() if k != "table"}, indent=2)
    if args.json:
        args.json.write_text(document)
    print(document)
    print(report["table"])


if __name__ == "__main__":
    main()
