"""Load generator: N concurrent streaming completions spread over a list of adapters.

    python -m prolora_serve.clients.loadgen --url http://127.0.0.1:8000 \\
        --concurrency 16 --requests 64 --adapters a,b,c --max-tokens 64

Prints one JSON object (stdout) and a table (stderr): throughput, latency and time-to-first-
token percentiles, errors, per-adapter counts. ``--adapters`` may include ``base`` for rows
without an adapter.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from .client import DEFAULT_URL, AsyncProloraClient

BASE = "base"
SELECT_BY = ("adapter", "model")
DEFAULT_PROMPT = "Write a short story about a lighthouse keeper."


@dataclass
class LoadConfig:
    url: str = DEFAULT_URL
    concurrency: int = 8
    requests: int = 32
    adapters: tuple[str, ...] = (BASE,)
    prompt: str = DEFAULT_PROMPT
    max_tokens: int = 64
    temperature: float = 0.0
    api_key: str | None = None
    ignore_eos: bool = False  # fixed-length outputs, for comparable runs
    # how a request names its adapter: our ``adapter`` field, or ``model`` as vLLM and the
    # OpenAI API do (both servers read ``model``); base rows then send ``base_model``, if any
    select_by: str = "adapter"
    base_model: str | None = None

    def __post_init__(self) -> None:
        for name in ("concurrency", "requests", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.adapters:
            raise ValueError("adapters must name at least one adapter (or 'base')")
        if self.select_by not in SELECT_BY:
            raise ValueError(f"select_by must be one of {SELECT_BY}, got {self.select_by!r}")

    def adapter_for(self, index: int) -> str | None:
        name = self.adapters[index % len(self.adapters)]
        return None if name == BASE else name

    def names(self, index: int) -> dict[str, str]:
        """The ``adapter`` / ``model`` fields of request ``index`` (absent ones left out)."""
        adapter = self.adapter_for(index)
        if self.select_by == "adapter":
            return {} if adapter is None else {"adapter": adapter}
        model = self.base_model if adapter is None else adapter
        return {} if model is None else {"model": model}


@dataclass
class RequestResult:
    adapter: str | None
    latency_s: float
    ttft_s: float | None
    output_tokens: int
    error: str | None = None


@dataclass
class LoadReport:
    config: LoadConfig
    results: list[RequestResult] = field(default_factory=list)
    duration_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        ok = [r for r in self.results if r.error is None]
        tokens = sum(r.output_tokens for r in ok)
        return {
            "url": self.config.url, "concurrency": self.config.concurrency,
            "requests": len(self.results), "succeeded": len(ok),
            "errors": len(self.results) - len(ok),
            "error_samples": sorted({r.error for r in self.results if r.error})[:5],
            "duration_s": round(self.duration_s, 3),
            "requests_per_s": round(len(ok) / self.duration_s, 3) if self.duration_s else 0.0,
            "output_tokens": tokens,
            "output_tokens_per_s": round(tokens / self.duration_s, 2) if self.duration_s else 0.0,
            "latency_s": percentiles([r.latency_s for r in ok]),
            "ttft_s": percentiles([r.ttft_s for r in ok if r.ttft_s is not None]),
            "per_adapter": _per_adapter(self.results),
        }


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100] of a non-empty list."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    keys = {"p50": 50, "p90": 90, "p99": 99, "max": 100}
    return {k: round(percentile(values, q), 4) if values else None for k, q in keys.items()}


def _per_adapter(results: list[RequestResult]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for result in results:
        key = result.adapter or BASE
        counts[key] = counts.get(key, 0) + 1
    return counts


async def _one(client: AsyncProloraClient, config: LoadConfig, index: int) -> RequestResult:
    adapter = config.adapter_for(index)
    start = time.perf_counter()
    ttft, tokens = None, 0
    try:
        async for chunk in client.stream_completion(config.prompt, **config.names(index),
                                                    max_tokens=config.max_tokens,
                                                    temperature=config.temperature,
                                                    ignore_eos=config.ignore_eos):
            if ttft is None and chunk.text:
                ttft = time.perf_counter() - start
            if chunk.usage:
                tokens = chunk.usage["completion_tokens"]
    except Exception as err:  # noqa: BLE001 - a failed request is counted, not fatal
        return RequestResult(adapter, time.perf_counter() - start, ttft, 0, f"{type(err).__name__}: {err}")
    return RequestResult(adapter, time.perf_counter() - start, ttft, tokens)


async def run_load(config: LoadConfig) -> LoadReport:
    report = LoadReport(config)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(config.requests):
        queue.put_nowait(index)

    async def worker(client: AsyncProloraClient) -> None:
        while not queue.empty():
            report.results.append(await _one(client, config, queue.get_nowait()))

    async with AsyncProloraClient(config.url, api_key=config.api_key,
                                  max_connections=config.concurrency) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(config.concurrency)))
        report.duration_s = time.perf_counter() - start
    return report


def format_table(summary: dict[str, Any]) -> str:
    rows = [("requests (ok / errors)", f"{summary['succeeded']} / {summary['errors']}"),
            ("duration", f"{summary['duration_s']:.2f} s"),
            ("throughput", f"{summary['requests_per_s']:.2f} req/s, "
                           f"{summary['output_tokens_per_s']:.1f} tok/s"),
            ("output tokens", str(summary["output_tokens"]))]
    for name in ("latency_s", "ttft_s"):
        values = summary[name]
        if values["p50"] is not None:
            rows.append((name.replace("_s", " (s)"), "  ".join(f"{k} {v:.3f}" for k, v in values.items())))
    rows.append(("per adapter", ", ".join(f"{k}: {v}" for k, v in summary["per_adapter"].items())))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)


def parse_args(argv: Sequence[str] | None = None) -> LoadConfig:
    parser = argparse.ArgumentParser(prog="python -m prolora_serve.clients.loadgen",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--requests", type=int, default=32, help="requests in total")
    parser.add_argument("--adapters", default=BASE,
                        help="comma-separated adapter ids, round-robin ('base' = no adapter)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--ignore-eos", action="store_true",
                        help="always generate --max-tokens tokens (comparable runs)")
    parser.add_argument("--select-by", choices=SELECT_BY, default="adapter",
                        help="name the adapter in the adapter field or, as vLLM reads it, in model")
    parser.add_argument("--base-model", default=None,
                        help="with --select-by model: the model name sent on base rows")
    args = parser.parse_args(argv)
    adapters = tuple(a.strip() for a in args.adapters.split(",") if a.strip())
    try:
        return LoadConfig(args.url, args.concurrency, args.requests, adapters, args.prompt,
                          args.max_tokens, args.temperature, args.api_key, args.ignore_eos,
                          args.select_by, args.base_model)
    except ValueError as err:
        parser.error(str(err))


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    summary = asyncio.run(run_load(config)).to_json()
    print(json.dumps(summary))
    print(format_table(summary), file=sys.stderr)
    return 0 if summary["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
