"""Registry benchmark: opening, memory and queries with 10 to 10,000 registered adapters.

    prolora-serve bench registry [--counts 10 1000 10000] [--repeats 3] [--request-rounds 3]

Per store size N, N tiny random adapters (a 2-layer LLaMA-shaped base, hidden 64, PRoLoRA r=4
u=1 m=n=2 on q_proj and v_proj: ~7 KB files) are written the way the registry commits them
(``<id>.safetensors`` + ``<id>.json``), then each measurement runs in a fresh child process
(imports done before the clock starts; RSS from /proc/self/status):

- open, no index yet (built from the files: every record and header read once);
- open, index present and consistent (a directory listing and two stats per adapter);
- open after 1% of the adapters changed behind its back (touched and removed: re-read, dropped);
- open after the index was deleted (rebuilt);
- RSS of the opened registry above an opened empty one (each process's after-minus-before);
- ``page(limit=100, after=...)``, ``in``/``has_adapter``, ``get`` and ``len`` per call; one
  upload and one delete into the full store.

Then, unless ``--request-rounds 0``, requests on resident adapters side by side: the embedded
default model (nf4) serving the same 8 requests on 4 resident adapters with a registry of 10 and
of the largest N (filler adapters hard-linked, so the files take no space), interleaved rounds
(the order alternating), the median of the per-round ratios reported.
Prints one JSON document, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..adapters.config import ProLoRAConfig
from ..adapters.registry import AdapterRecord, AdapterRegistry

MIB = 1 << 20
TINY_SHAPES = {f"model.layers.{i}.{name}": dims for i in range(2) for name, dims in (
    ("self_attn.q_proj", (64, 64)), ("self_attn.k_proj", (64, 32)), ("self_attn.v_proj", (64, 32)),
    ("self_attn.o_proj", (64, 64)), ("mlp.gate_proj", (64, 96)), ("mlp.up_proj", (64, 96)),
    ("mlp.down_proj", (96, 64)))}
TINY_CONFIG = ProLoRAConfig(r=4, unshared_r=1, reduce_lora_A_x=2, reduce_lora_B_x=2, lora_alpha=8,
                            target_modules=("q_proj", "v_proj"))


def adapter_id(index: int) -> str:
    return f"ad{index:06d}"


def write_committed(root: Path, index: int, data: bytes, config: dict[str, Any], num_params: int,
                    nbytes: int) -> None:
    """The two files the registry's commit leaves for one adapter."""
    name = adapter_id(index)
    (root / f"{name}.safetensors").write_bytes(data)
    record = AdapterRecord(name, config, num_params, nbytes, len(data), time.time())
    (root / f"{name}.json").write_text(json.dumps(record.to_json()))


def generate_store(root: Path, count: int) -> None:
    """``count`` distinct random tiny adapters (seed = index)."""
    from ..adapters.factory import random_adapter
    from ..adapters.format import adapter_to_bytes

    root.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        adapter = random_adapter(TINY_CONFIG, TINY_SHAPES, seed=index)
        write_committed(root, index, adapter_to_bytes(adapter), adapter.config.to_json_dict(),
                        adapter.num_params, adapter.nbytes)


def delete_index(root: Path) -> None:
    for path in root.glob(".index-*"):
        path.unlink()


# --- the child: one open, then queries ---------------------------------------------------------
def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def per_call_us(function: Any, arguments: list[Any]) -> float:
    started = time.perf_counter()
    for argument in arguments:
        function(argument)
    return 1e6 * (time.perf_counter() - started) / len(arguments)


def child(root: Path, queries: bool) -> dict[str, Any]:
    import gc

    from ..adapters import format as _format  # noqa: F401 - a server has imported it (and
    import safetensors  # noqa: F401 - safetensors) before it opens the registry

    gc.collect()
    before = rss_bytes()
    started = time.perf_counter()
    registry = AdapterRegistry(root, TINY_SHAPES)
    seconds = time.perf_counter() - started
    gc.collect()
    result: dict[str, Any] = {"open_seconds": seconds, "rss_open_bytes": rss_bytes() - before,
                              **{k: v for k, v in vars(registry.open_report).items()
                                 if k != "seconds"}}
    count = len(registry)
    if queries and count:
        rng = random.Random(0)
        ids = [adapter_id(rng.randrange(count)) for _ in range(2000)]
        afters = ids[:300]
        page_ms = [1e3 * t for t in (timed(registry.page, 100, a) for a in afters)]
        result.update({
            "page100_ms": statistics.median(page_ms),
            "contains_us": per_call_us(registry.has_adapter, ids),
            "get_us": per_call_us(registry.get, ids),
            "len_us": per_call_us(lambda _: len(registry), ids[:200]),
        })
        from ..adapters.factory import random_adapter
        from ..adapters.format import adapter_to_bytes
        import io

        data = adapter_to_bytes(random_adapter(TINY_CONFIG, TINY_SHAPES, seed=10**7))
        started = time.perf_counter()
        registry.register_upload("zz-upload", file=io.BytesIO(data))
        result["upload_ms"] = 1e3 * (time.perf_counter() - started)
        started = time.perf_counter()
        registry.delete("zz-upload")
        result["delete_ms"] = 1e3 * (time.perf_counter() - started)
        gc.collect()
        result["rss_after_queries_bytes"] = rss_bytes() - before
    return result


def timed(function: Any, *args: Any) -> float:
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started


def run_child(root: Path, queries: bool = False) -> dict[str, Any]:
    command = [sys.executable, "-m", __spec__.name, "--child", str(root)]
    if queries:
        command.append("--queries")
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_child(root: Path, repeats: int, queries: bool = False) -> dict[str, Any]:
    runs = [run_child(root, queries) for _ in range(repeats)]
    return sorted(runs, key=lambda r: r["open_seconds"])[len(runs) // 2]


def store_scenarios(count: int, repeats: int, scratch: Path, empty: dict[str, Any]) -> dict[str, Any]:
    root = scratch / f"store-{count}"
    started = time.perf_counter()
    generate_store(root, count)
    generated = time.perf_counter() - started
    first = run_child(root)  # no index yet
    present = median_child(root, repeats, queries=True)
    changed = max(1, count // 100)
    victims = random.Random(1).sample(range(count), 2 * changed)
    for index in victims[:changed]:  # touched: same size, new mtime
        path = root / f"{adapter_id(index)}.safetensors"
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    for index in victims[changed:]:  # removed
        for suffix in (".json", ".safetensors"):
            (root / f"{adapter_id(index)}{suffix}").unlink()
    repaired = run_child(root)
    delete_index(root)
    rebuilt = run_child(root)
    disk = sum(p.stat().st_size for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    index_bytes = sum(p.stat().st_size for p in root.glob(".index-*"))
    shutil.rmtree(root)
    return {"registered": count, "generate_seconds": generated, "disk_bytes": disk,
            "index_bytes": index_bytes, "open_first": first, "open_present": present,
            "open_after_changes": {**repaired, "changed": 2 * changed}, "open_rebuild": rebuilt,
            "rss_above_empty_bytes": present["rss_open_bytes"] - empty["rss_open_bytes"]}


# --- requests on resident adapters, side by side ------------------------------------------------
def model_store(root: Path, shapes: dict[str, tuple[int, int]], count: int, real: int) -> AdapterRegistry:
    """``real`` engine-bench adapters plus filler hard links of one small adapter up to ``count``."""
    from ..adapters.factory import random_adapter as factory_adapter
    from ..adapters.format import adapter_to_bytes
    from .engine.bench import register_adapters

    registry = AdapterRegistry(root, shapes)
    register_adapters(registry, 0, real)
    filler_config = ProLoRAConfig(r=1, unshared_r=1, reduce_lora_A_x=1, reduce_lora_B_x=1,
                                  lora_alpha=1, target_modules=("q_proj",))
    filler = factory_adapter(filler_config, shapes, seed=1)
    template = root.parent / f"filler-{count}.safetensors"
    template.write_bytes(adapter_to_bytes(filler))
    for index in range(real, count):
        name = f"filler{index:06d}"
        os.link(template, root / f"{name}.safetensors")
        record = AdapterRecord(name, filler.config.to_json_dict(), filler.num_params, filler.nbytes,
                               template.stat().st_size, time.time())
        (root / f"{name}.json").write_text(json.dumps(record.to_json()))
    registry.close()
    return AdapterRegistry(root, shapes)  # indexes the filler


def request_rounds(sizes: tuple[int, int], rounds: int, scratch: Path) -> dict[str, Any]:
    from .engine.bench import drain, prompts
    from .engine.engine import EngineConfig, LLMEngine
    from .engine.loader import load_base_model
    from .engine.sampling import SamplingParams

    loaded = load_base_model(None, "nf4")
    shapes = loaded.model.linear_shapes()
    stores = {n: model_store(scratch / f"model-store-{n}", shapes, n, real=4) for n in sizes}
    texts = prompts(loaded.tokenizer, 8)
    warm = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    seconds: dict[int, list[float]] = {n: [] for n in sizes}
    for round_index in range(rounds):
        for n in (sizes if round_index % 2 == 0 else sizes[::-1]):  # alternate who goes first
            engine = LLMEngine(EngineConfig(dtype="nf4", kv_cache_memory=64 * MIB,
                                            adapter_memory=64 * MIB), loaded, stores[n])
            for i in range(4):  # make the 4 adapters resident
                engine.add_request(f"warm{i}", texts[i], warm, f"ad{i}")
            drain(engine)
            started = time.perf_counter()
            for i in range(8):
                engine.add_request(f"r{i}", texts[i], params, f"ad{i % 4}")
            drain(engine)
            seconds[n].append(time.perf_counter() - started)
            assert engine.stats().adapter_cache.num_resident == 4
    small, large = sizes
    ratios = [b / a for a, b in zip(seconds[small], seconds[large])]
    return {"registered": list(sizes), "requests": 8, "tokens_each": 16, "resident_adapters": 4,
            "seconds": {str(n): s for n, s in seconds.items()},
            "median_seconds": {str(n): statistics.median(s) for n, s in seconds.items()},
            "median_ratio_large_over_small": statistics.median(ratios)}


# --- report -------------------------------------------------------------------------------------
def table(report: dict[str, Any]) -> str:
    lines = ["| registered | open, no index (build) | open, index present | open after 1% changed "
             "| open, index deleted (rebuild) | RSS above empty | page(100) | `in` | get | upload "
             "| delete |", "|" + "---|" * 11]
    for r in report["stores"]:
        p = r["open_present"]
        lines.append(
            f"| {r['registered']:,} | {r['open_first']['open_seconds']:.3f} s "
            f"| {p['open_seconds']:.3f} s | {r['open_after_changes']['open_seconds']:.3f} s "
            f"({r['open_after_changes']['reread']} re-read, {r['open_after_changes']['dropped']} dropped) "
            f"| {r['open_rebuild']['open_seconds']:.3f} s "
            f"| {r['rss_above_empty_bytes'] / MIB:.1f} MiB | {p.get('page100_ms', 0):.2f} ms "
            f"| {p.get('contains_us', 0):.1f} µs | {p.get('get_us', 0):.1f} µs "
            f"| {p.get('upload_ms', 0):.1f} ms | {p.get('delete_ms', 0):.1f} ms |")
    requests = report.get("requests")
    if requests:
        small, large = requests["registered"]
        med = requests["median_seconds"]
        lines += ["", f"Requests on resident adapters ({requests['requests']} x "
                      f"{requests['tokens_each']} tokens, 4 resident adapters, nf4 default model): "
                      f"{small} registered {med[str(small)]:.3f} s, {large:,} registered "
                      f"{med[str(large)]:.3f} s, median ratio {requests['median_ratio_large_over_small']:.3f}"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="prolora-serve bench registry", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[10, 1000, 10000],
                        help="store sizes (adapters registered)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="fresh processes for the index-present open (median)")
    parser.add_argument("--request-rounds", type=int, default=3,
                        help="interleaved rounds of the side-by-side request check (0: skip)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the requests")
    parser.add_argument("--json", type=Path, help="also write the JSON document here")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--queries", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if any(c < 1 for c in args.counts) or args.repeats < 1 or args.request_rounds < 0:
        parser.error("--counts and --repeats must be >= 1, --request-rounds >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.queries)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        (scratch / "empty").mkdir()
        empty = median_child(scratch / "empty", args.repeats)
        report: dict[str, Any] = {"empty_store": empty, "stores": [
            store_scenarios(count, args.repeats, scratch, empty) for count in args.counts]}
        if args.request_rounds:
            import torch

            torch.set_num_threads(args.threads)
            report["requests"] = request_rounds((10, max(max(args.counts), 11)),
                                                args.request_rounds, scratch)
    report["table"] = table(report)
    document = json.dumps({k: v for k, v in report.items() if k != "table"}, indent=2)
    if args.json:
        args.json.write_text(document)
    print(document)
    print(report["table"])


if __name__ == "__main__":
    main()
