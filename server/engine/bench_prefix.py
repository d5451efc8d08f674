"""Automatic prefix caching: time to first token of chats that share a long system prompt.

    prolora-serve bench prefix [--dtype fp32] [--chats 32] [--adapters 8] [--system-tokens 1000]

``chats`` chat requests, spread round-robin over ``adapters`` random PRoLoRA adapters (r=8, u=1,
m=n=7, all seven projections), each a ~``system-tokens`` system prompt shared by all plus its
own short question, run one after another on one engine with the prefix cache on, then on a
fresh engine with it off. TTFT is the time from ``add_request`` to the step that returns the
first token (the adapter already resident: a warm-up request per adapter runs first, on a
different prompt). The ratio compares the median TTFT of the requests after the first per
adapter; the greedy outputs of both runs must be equal. Prints one JSON document, then a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ...adapters.registry import AdapterRegistry
from .bench import QUESTIONS, register_adapters
from .engine import EngineConfig, LLMEngine
from .loader import LoadedModel, load_base_model
from .sampling import SamplingParams

SENTENCE = ("You are a careful assistant for a travel company. Answer briefly, cite the booking "
            "rules when they apply, and never invent prices or dates. ")


def system_prompt(tokenizer: Any, tokens: int) -> str:
    text = ""
    while len(tokenizer.encode(text)) < tokens:
        text += SENTENCE
    return text


def chat_prompts(tokenizer: Any, count: int, system_tokens: int) -> list[str]:
    system = system_prompt(tokenizer, system_tokens)
    return [tokenizer.apply_chat_template(
        [{"role": "system", "content": system},
         {"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} (chat {i})"}],
        tokenize=False, add_generation_prompt=True) for i in range(count)]


def first_token_seconds(engine: LLMEngine, request_id: str, prompt: str, adapter_id: str | None,
                        params: SamplingParams) -> tuple[float, list[int]]:
    started = time.perf_counter()
    engine.add_request(request_id, prompt, params, adapter_id)
    first: float | None = None
    tokens: list[int] = []
    while engine.has_work():
        for output in engine.step():
            if output.error is not None:
                raise output.error
            if output.token_ids and first is None:
                first = time.perf_counter() - started
            tokens += output.token_ids
        if not engine.last_step_ran:
            time.sleep(0.001)
    assert first is not None
    return first, tokens


def scenario(loaded: LoadedModel, registry: AdapterRegistry, caching: bool, prompts: list[str],
             adapter_ids: list[str]) -> dict[str, Any]:
    engine = LLMEngine(EngineConfig(dtype=loaded.dtype, max_batch=4, max_batched_tokens=512,
                                    kv_cache_memory=512 << 20, prefix_caching=caching), loaded, registry)
    params = SamplingParams(max_tokens=8, temperature=0)
    for adapter_id in dict.fromkeys(adapter_ids):  # resident and warm; another prompt entirely
        first_token_seconds(engine, f"warm-{adapter_id}", "Hello there.", adapter_id, params)
    seen: set[str] = set()
    later, firsts, outputs = [], [], []
    for i, (prompt, adapter_id) in enumerate(zip(prompts, adapter_ids)):
        ttft, tokens = first_token_seconds(engine, f"chat-{i}", prompt, adapter_id, params)
        (later if adapter_id in seen else firsts).append(ttft)
        seen.add(adapter_id)
        outputs.append(tokens)
    stats = engine.stats()
    return {"prefix_caching": caching, "first_per_adapter_ttft_ms": 1e3 * statistics.median(firsts),
            "later_ttft_ms": 1e3 * statistics.median(later), "outputs": outputs,
            "prefix_cache_hits": stats.prefix_cache_hits, "prompt_tokens_computed": stats.prompt_tokens}


def run(dtype: str, chats: int, adapters: int, system_tokens: int) -> dict[str, Any]:
    loaded = load_base_model(None, dtype)
    prompts = chat_prompts(loaded.tokenizer, chats, system_tokens)
    adapter_ids = [f"ad{i % adapters}" for i in range(chats)]
    with tempfile.TemporaryDirectory() as root:
        registry = AdapterRegistry(Path(root), loaded.model.linear_shapes(), 1 << 30)
        register_adapters(registry, 0, adapters)
        cached = scenario(loaded, registry, True, prompts, adapter_ids)
        uncached = scenario(loaded, registry, False, prompts, adapter_ids)
    return {"dtype": dtype, "chats": chats, "adapters": adapters,
            "prompt_tokens": len(loaded.tokenizer.encode(prompts[0])), "threads": torch.get_num_threads(),
            "cached": {k: v for k, v in cached.items() if k != "outputs"},
            "uncached": {k: v for k, v in uncached.items() if k != "outputs"},
            "later_ttft_ratio": cached["later_ttft_ms"] / uncached["later_ttft_ms"],
            "outputs_equal": cached["outputs"] == uncached["outputs"]}


def print_table(report: dict[str, Any]) -> None:
    print(f"{'prefix cache':<13} {'TTFT first/adapter ms':>22} {'TTFT later ms':>14} "
          f"{'block hits':>11} {'prompt tokens computed':>23}")
    for key in ("uncached", "cached"):
        r = report[key]
        print(f"{'on' if r['prefix_caching'] else 'off':<13} {r['first_per_adapter_ttft_ms']:>22.1f} "
              f"{r['later_ttft_ms']:>14.1f} {r['prefix_cache_hits']:>11} {r['prompt_tokens_computed']:>23}")
    print(f"later TTFT cached / uncached: {report['later_ttft_ratio']:.3f}; greedy outputs equal: "
          f"{report['outputs_equal']} ({report['chats']} chats, {report['adapters']} adapters, "
          f"{report['prompt_tokens']}-token prompts, {report['dtype']}, {report['threads']} threads)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="fp32", choices=("nf4", "fp32", "int8", "bf16"))
    parser.add_argument("--chats", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args.dtype, args.chats, args.adapters, args.system_tokens)
    print(json.dumps(report, indent=2))
    print_table(report)


if __name__ == "__main__":
    main()
