"""Where adapter bytes matter, on this machine: LLaMA2-7B layer shapes with 32 distinct adapters,
PRoLoRA r=32 u=4 m=n=7 against LoRA r=16 (the paper's equal-quality pair, half the bytes).

    prolora-serve bench layers7b [--layers 4] [--dtype nf4] [--rounds 2] [--tokens 16]

A LLaMA2-7B-shaped model cut to ``--layers`` decoder layers (hidden 4096, intermediate 11008,
32 heads; random weights built layer by layer, ``--dtype`` projections), 32 concurrent requests
of 16 prompt tokens, each generating ``--tokens``; scenarios base only / 32 distinct PRoLoRA
r=32 u=4 m=n=7 / 32 distinct LoRA r=16 (fp16 resident adapters, all seven projections),
interleaved over ``--rounds``. Decode tokens/s counts pure decode steps only. The engine and
the adapters are the device check's (``bench_device.py``), on the CPU. Prints one JSON
document, then a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

import torch

from .bench_device import LLAMA2_7B, PAPER_PAIR, measure_variant
from .loader import random_base_model

SCENARIOS = ("base only", *PAPER_PAIR)


def run(layers: int, dtype: str, rounds: int, tokens: int, requests: int) -> dict[str, Any]:
    from transformers import LlamaConfig

    config = LlamaConfig(**{**LLAMA2_7B, "num_hidden_layers": layers})
    loaded = random_base_model(config, dtype, "cpu", name=f"llama2-7b-{layers}-layers")
    per_round = []
    for round_index in range(rounds):
        results = {name: measure_variant(loaded, name, seed=round_index, requests=requests,
                                         prompt_tokens=16, generated_tokens=tokens,
                                         kv_cache_memory=1 << 30)
                   for name in SCENARIOS}
        base = results["base only"]["decode_tokens_per_s"]
        pro, lora = (results[name]["decode_tokens_per_s"] for name in PAPER_PAIR)
        per_round.append({"results": results, "prolora_over_lora": pro / lora,
                          "prolora_over_base": pro / base, "lora_over_base": lora / base})
    return {"layers": layers, "dtype": dtype, "requests": requests, "tokens": tokens,
            "threads": torch.get_num_threads(), "rounds": per_round,
            **{key: statistics.median(r[key] for r in per_round)
               for key in ("prolora_over_lora", "prolora_over_base", "lora_over_base")}}


def print_table(report: dict[str, Any]) -> None:
    print(f"{'round':>5} {'scenario':<36} {'decode tok/s':>13} {'step ms':>9} {'adapter MiB':>12}")
    for index, entry in enumerate(report["rounds"]):
        for name, result in entry["results"].items():
            print(f"{index:>5} {name:<36} {result['decode_tokens_per_s']:>13.1f} "
                  f"{result['decode_step_ms_median']:>9.1f} {result['adapter_bytes'] / 2**20:>12.1f}")
    print(f"medians over rounds: PRoLoRA/LoRA {report['prolora_over_lora']:.3f}, PRoLoRA/base "
          f"{report['prolora_over_base']:.3f}, LoRA/base {report['lora_over_base']:.3f} "
          f"({report['layers']} layers of LLaMA2-7B, {report['dtype']}, {report['requests']} "
          f"requests, {report['threads']} threads)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dtype", default="nf4", choices=("nf4", "bf16", "fp32"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args.layers, args.dtype, args.rounds, args.tokens, args.requests)
    print(json.dumps(report, indent=2))
    print_table(report)


if __name__ == "__main__":
    main()
