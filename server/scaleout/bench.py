"""Scale-out benchmark: adapter affinity (Ray Serve multiplexing) against plain routing.

    prolora-serve bench ray [--requests 400] [--warmup 64] [--adapters 64] [--fit 16]
                            [--concurrency 8] [--tokens 16] [--model DIR] [--dtype nf4]

Two engine replicas on a local Ray cluster (127.0.0.1, no dashboard) behind the ingress, the
embedded default model (SmolLM2-135M, nf4) unless ``--model``. 64 random PRoLoRA adapters
(r=8, u=1, m=n=7 on all seven projections, fp16 resident) are registered once; each replica's
``--adapter-memory`` holds 16 of them (16.5 adapters' bytes), so Ray Serve's
``max_num_models_per_replica`` comes out at 16 too. The same request sequences (seeded), over
``/v1/completions`` through the ingress with ``--concurrency`` in flight, are sent with the
adapter id as multiplexed model id ("multiplexed") and without it ("plain": Ray's default
power-of-two-choices on queue length), for zipf (s = ``--zipf-s``) and uniform popularity over
the adapters. Each run starts on fresh replicas (the application is deleted and deployed
again); ``--warmup`` requests are sent first and not counted.

Reported per run: adapter loads into the replicas' device caches per 1,000 measured requests
(and how many of them read the disk rather than the host tier; the seconds the loads took,
reading plus copying into the pool, summed), generated tokens/s over the
measured requests, and the share of requests that went to their adapter's usual replica
(affinity; "hot 8": over the 8 most requested adapters), and how many adapter ids sit in
more than one replica's multiplexed list at the end ("on 2+"). Prints one JSON document, then a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from ...adapters.accounting import ModelShape
from ...adapters.config import ProLoRAConfig
from ...adapters.factory import random_adapter
from ...adapters.format import save_adapter
from ..config import ServerConfig

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER = ProLoRAConfig(r=8, unshared_r=1, reduce_lora_A_x=7, reduce_lora_B_x=7, lora_alpha=16,
                        target_modules=ALL_PROJECTIONS)
RESIDENT_BYTES_PER_PARAM = 2  # --adapter-dtype fp16
PROMPT = "Write one sentence about the sea."
ROUTINGS = ("multiplexed", "plain")
HOT = 8  # hot_affinity: over the 8 most requested adapters


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="prolora-serve bench ray",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="measured requests per run")
    parser.add_argument("--warmup", type=int, default=64, help="requests per run before measuring")
    parser.add_argument("--adapters", type=int, default=64, help="registered adapters")
    parser.add_argument("--fit", type=int, default=16, help="adapters each replica's budget holds")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--replica-cpus", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--tokens", type=int, default=16, help="generated tokens per request")
    parser.add_argument("--max-batch", type=int, default=8, help="each engine's batch size")
    parser.add_argument("--popularity", nargs="+", default=["zipf", "uniform"],
                        choices=["zipf", "uniform"])
    parser.add_argument("--zipf-s", type=float, default=1.0, help="zipf exponent")
    parser.add_argument("--model", default=None, help="HF model directory (default: embedded)")
    parser.add_argument("--dtype", default="nf4", help="base weight format")
    parser.add_argument("--adapter-host-memory", default=None,
                        help="each replica's host tier (default: the engine's; 0 turns it off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=0, help="the ingress port (0: a free one)")
    return parser.parse_args(argv)


def popularity_sequence(kind: str, count: int, adapters: int, s: float, seed: int) -> list[int]:
    rng = random.Random(f"{kind}-{seed}")
    if kind == "uniform":
        return [rng.randrange(adapters) for _ in range(count)]
    weights = [1.0 / (rank + 1) ** s for rank in range(adapters)]
    order = list(range(adapters))
    rng.shuffle(order)  # which adapter is hot is arbitrary (not the first ids)
    return [order[i] for i in rng.choices(range(adapters), weights=weights, k=count)]


def adapter_id(index: int) -> str:
    return f"bench-{index:03d}"


def write_adapters(directory: Path, model_dir: Path, count: int) -> int:
    """``count`` random adapters as single files; returns one adapter's parameter count."""
    directory.mkdir(parents=True, exist_ok=True)
    shapes = ModelShape.from_model_dir(model_dir).linear_shapes()
    num_params = 0
    for index in range(count):
        adapter = random_adapter(ADAPTER, shapes, seed=index, b_std=0.02)
        save_adapter(adapter, directory / f"{adapter_id(index)}.safetensors", single_file=True)
        num_params = adapter.num_params
    return num_params


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _send(url: str, sequence: list[int], concurrency: int, tokens: int) -> dict[str, Any]:
    import httpx

    gate = asyncio.Semaphore(concurrency)
    served: list[tuple[int, str]] = []
    generated = failures = 0

    async def one(client: httpx.AsyncClient, index: int) -> None:
        nonlocal generated, failures
        async with gate:
            response = await client.post(f"{url}/v1/completions", json={
                "model": adapter_id(index), "prompt": PROMPT, "max_tokens": tokens,
                "temperature": 0, "ignore_eos": True})
        if response.status_code != 200:
            failures += 1
            return
        generated += response.json()["usage"]["completion_tokens"]
        served.append((index, response.headers.get("x-prolora-replica", "?")))

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(one(client, index) for index in sequence))
    return {"seconds": time.perf_counter() - started, "generated": generated,
            "failures": failures, "served": served}


def _cache_totals(deploy: Any) -> dict[str, dict[str, int]]:
    parts = deploy.replicas_handle().broadcast("snapshot").results(timeout_s=120)
    return {p.replica_id: {"loads": p.snapshot.stats.adapter_cache.loads,
                           "host_hits": p.snapshot.stats.adapter_cache.host_hits,
                           "evictions": p.snapshot.stats.adapter_cache.evictions,
                           "load_seconds": sum(t.sum_seconds for t in
                                               p.snapshot.stats.adapter_cache.load_times.values())}
            for p in parts}


def _affinity(served: list[tuple[int, str]], top: int | None = None) -> float:
    """The share of requests served by their adapter's most frequent replica (over the ``top``
    most requested adapters, or all)."""
    by_adapter: dict[int, Counter] = defaultdict(Counter)
    for index, replica in served:
        by_adapter[index][replica] += 1
    counters = sorted(by_adapter.values(), key=lambda c: -sum(c.values()))[:top]
    return sum(c.most_common(1)[0][1] for c in counters) / max(1, sum(sum(c.values()) for c in counters))


def run_one(deploy: Any, config: ServerConfig, routing: str, sequence: list[int],
            warmup: int, concurrency: int, tokens: int) -> dict[str, Any]:
    import httpx
    from ray import serve

    url = f"http://127.0.0.1:{config.port}"
    started = time.perf_counter()
    serve.run(deploy.build_application(config, affinity=routing == "multiplexed"),
              name=deploy.APP_NAME, route_prefix="/", blocking=False)
    while httpx.get(f"{url}/health", timeout=30).status_code != 200:
        time.sleep(0.5)
    deploy_seconds = time.perf_counter() - started
    try:
        asyncio.run(_send(url, sequence[:warmup], concurrency, tokens))
        before = _cache_totals(deploy)
        measured = asyncio.run(_send(url, sequence[warmup:], concurrency, tokens))
        after = _cache_totals(deploy)
        routed = [set(i.routing_ids) for i in
                  deploy.replicas_handle().broadcast("identify").results(timeout_s=120)]
    finally:
        serve.delete(deploy.APP_NAME)
    requests = len(sequence) - warmup
    loads = sum(after[r]["loads"] - before.get(r, {}).get("loads", 0) for r in after)
    host = sum(after[r]["host_hits"] - before.get(r, {}).get("host_hits", 0) for r in after)
    # the engines' load time histograms restart for an adapter that is forgotten, never here
    load_seconds = sum(after[r]["load_seconds"] - before.get(r, {}).get("load_seconds", 0.0)
                       for r in after)
    per_replica = Counter(replica for _, replica in measured["served"])
    return {
        "routing": routing, "requests": requests, "failures": measured["failures"],
        "adapter_loads": loads, "loads_per_1000": 1000 * loads / requests,
        "disk_reads_per_1000": 1000 * (loads - host) / requests,
        "load_seconds": load_seconds,  # read + copy into the pool, summed over the loads
        "tokens_per_s": measured["generated"] / measured["seconds"],
        "seconds": measured["seconds"], "affinity": _affinity(measured["served"]),
        "hot_affinity": _affinity(measured["served"], top=HOT),
        "requests_per_replica": sorted(per_replica.values(), reverse=True),
        # ids in more than one replica's multiplexed list at the end (multiplexed routing)
        "routed_on_several": sum(1 for ids in Counter(i for r in routed for i in r).values() if ids > 1),
        "deploy_seconds": deploy_seconds,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from . import deploy

    if args.model is None:
        from ..engine.loader import default_model_hf_dir

        model_dir = Path(default_model_hf_dir())
    else:
        model_dir = Path(args.model)
    work = Path(tempfile.mkdtemp(prefix="prolora-bench-ray-"))
    num_params = write_adapters(work / "source", model_dir, args.adapters)
    budget = int((args.fit + 0.5) * num_params * RESIDENT_BYTES_PER_PARAM)
    config = ServerConfig.from_options(
        model=str(model_dir), dtype=args.dtype, adapter_dir=work / "store",
        register=[work / "source"], adapter_memory=budget, adapter_dtype="fp16",
        max_batch=args.max_batch, kv_cache_memory=64 << 20,
        max_model_len=512, replicas=args.replicas, replica_cpus=args.replica_cpus,
        port=args.port or _free_port(), threads=max(1, int(args.replica_cpus)),
        log_level="warning",
        **({} if args.adapter_host_memory is None else {"adapter_host_memory": args.adapter_host_memory}))
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    deploy.start_ray(config, num_cpus=args.replicas * args.replica_cpus + 1)
    results = []
    try:
        for kind in args.popularity:
            sequence = popularity_sequence(kind, args.warmup + args.requests, args.adapters,
                                           args.zipf_s, args.seed)
            # alternate which routing runs first, so neither always gets the fresher machine
            for routing in ROUTINGS if len(results) % 4 == 0 else ROUTINGS[::-1]:
                result = run_one(deploy, config, routing, sequence, args.warmup,
                                 args.concurrency, args.tokens)
                results.append({"popularity": kind, **result})
                print(f"{kind} {routing}: {result['loads_per_1000']:.0f} loads / 1000 requests, "
                      f"{result['tokens_per_s']:.1f} tokens/s", flush=True)
    finally:
        deploy.stop()
    report = {
        "model": str(model_dir), "dtype": args.dtype, "replicas": args.replicas,
        "replica_cpus": args.replica_cpus, "adapters": args.adapters, "fit": args.fit,
        "adapter": ADAPTER.to_json_dict(), "adapter_resident_bytes": num_params * RESIDENT_BYTES_PER_PARAM,
        "adapter_memory": budget, "requests": args.requests, "warmup": args.warmup,
        "concurrency": args.concurrency, "tokens": args.tokens, "zipf_s": args.zipf_s,
        "cpus": os.cpu_count(), "results": results,
    }
    print(json.dumps(report, indent=2))
    print_table(report)
    return 0


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{report['replicas']} replicas, {report['adapters']} adapters, each budget holds "
          f"{report['fit']}; {report['requests']} measured requests per run, "
          f"{report['concurrency']} in flight, {report['tokens']} tokens each")
    print(f"{'popularity':<10} {'routing':<12} {'loads/1000':>10} {'disk/1000':>10} "
          f"{'load s':>7} {'tokens/s':>9} {'affinity':>9} {'hot 8':>6} {'on 2+':>6} "
          f"{'per replica':>12}")
    for r in report["results"]:
        print(f"{r['popularity']:<10} {r['routing']:<12} {r['loads_per_1000']:>10.0f} "
              f"{r['disk_reads_per_1000']:>10.0f} {r['load_seconds']:>7.2f} {r['tokens_per_s']:>9.1f} "
              f"{r['affinity']:>9.2f} {r['hot_affinity']:>6.2f} {r['routed_on_several']:>6} "
              f"{'/'.join(map(str, r['requests_per_replica'])):>12}")


if __name__ == "__main__":
    raise SystemExit(main())
