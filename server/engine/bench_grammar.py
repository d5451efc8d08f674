"""Structured-output cost: decode step time with every row under its own JSON schema, against
the same rows with no grammar, on the embedded default model.

    prolora-serve bench grammar [--dtype nf4] [--rows 32] [--steps 24] [--rounds 3]

Each round runs both scenarios on one engine, interleaved: ``rows`` requests (one distinct JSON
schema each, or none) are prefilled, then ``steps`` decode steps are timed while every row is
still running (a schema with a free string property keeps rows going). The cost is the median
decode step with grammars over the median without, per round; the table shows the median of
the rounds. Compilation happens before the timed steps (xgrammar caches each schema).
Prints one JSON document, then a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from .engine import EngineConfig, LLMEngine
from .grammar import GrammarSpec
from .loader import load_base_model
from .sampling import SamplingParams

PROMPT = "Describe the weather today as a JSON object."


def row_schema(index: int) -> GrammarSpec:
    """A distinct schema per row: its own property names, a free string that keeps going."""
    schema = {"type": "object", "additionalProperties": False,
              "properties": {f"report_{index}": {"type": "string", "minLength": 80},
                             f"level_{index}": {"type": "integer"}},
              "required": [f"report_{index}", f"level_{index}"]}
    return GrammarSpec.json_schema(schema, True, "bench")


def decode_step_times(engine: LLMEngine, rows: int, steps: int, grammars: bool,
                      tag: str) -> tuple[list[float], list[float]]:
    """Wall time and postprocess time (sampling, the grammar masks) of the full decode steps."""
    for i in range(rows):
        params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True,
                                grammar=row_schema(i) if grammars else None)
        if params.grammar is not None:
            engine.grammars.compile(params.grammar)
        engine.add_request(f"{tag}-{i}", PROMPT, params)
    times: list[float] = []
    post: list[float] = []
    while engine.has_work():
        before = engine.stats().postprocess_seconds
        started = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - started
        stats = engine.stats()
        if stats.last_batch_size == rows and stats.last_batch_tokens == rows and len(times) < steps:
            times.append(elapsed)  # a pure decode step with every row still running
            post.append(stats.postprocess_seconds - before)
    return times, post


def run(dtype: str, rows: int, steps: int, rounds: int) -> dict[str, Any]:
    loaded = load_base_model(None, dtype)
    engine = LLMEngine(EngineConfig(dtype=dtype, max_batch=rows, kv_cache_memory=64 << 20), loaded)
    decode_step_times(engine, rows, 4, True, "warm")  # loads xgrammar, warms both paths
    results = []
    for round_index in range(rounds):
        plain, plain_post = decode_step_times(engine, rows, steps, False, f"plain{round_index}")
        constrained, grammar_post = decode_step_times(engine, rows, steps, True, f"json{round_index}")
        row = {"round": round_index, "plain_ms": 1e3 * statistics.median(plain),
               "grammar_ms": 1e3 * statistics.median(constrained),
               "plain_post_ms": 1e3 * statistics.median(plain_post),
               "grammar_post_ms": 1e3 * statistics.median(grammar_post),
               "plain_steps": len(plain), "grammar_steps": len(constrained)}
        row["ratio"] = row["grammar_ms"] / row["plain_ms"]
        row["added_ms"] = row["grammar_post_ms"] - row["plain_post_ms"]
        row["added_fraction"] = row["added_ms"] / row["plain_ms"]
        results.append(row)
    return {"dtype": dtype, "rows": rows, "steps": steps, "threads": torch.get_num_threads(),
            "rounds": results, "median_ratio": statistics.median(r["ratio"] for r in results),
            "median_added_fraction": statistics.median(r["added_fraction"] for r in results)}


def print_table(report: dict[str, Any]) -> None:
    print(f"{'round':>5} {'no grammar ms':>14} {'schemas ms':>11} {'ratio':>7} "
          f"{'sampling ms':>12} {'+ masks ms':>11} {'added':>7}")
    for r in report["rounds"]:
        print(f"{r['round']:>5} {r['plain_ms']:>14.2f} {r['grammar_ms']:>11.2f} {r['ratio']:>7.3f} "
              f"{r['plain_post_ms']:>12.2f} {r['grammar_post_ms']:>11.2f} {r['added_fraction']:>7.1%}")
    print(f"median step ratio {report['median_ratio']:.3f}, median added (postprocess) "
          f"{report['median_added_fraction']:.1%} ({report['rows']} rows, {report['dtype']}, "
          f"{report['threads']} threads)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="nf4", choices=("nf4", "fp32", "int8", "bf16"))
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args.dtype, args.rows, args.steps, args.rounds)
    print(json.dumps(report, indent=2))
    print_table(report)


if __name__ == "__main__":
    main()
