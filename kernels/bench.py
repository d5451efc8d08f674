"""Kernel benchmark: compact PRoLoRA apply vs gathered dense LoRA, distinct adapter per row.

    python -m prolora_serve.kernels.bench [--backend torch] [--batch-sizes 1,4,16,32,64] [--quick]

LoRA runs through the same backend as a PRoLoRA with u = r (Au = A, Bu = B: the gathered
dense LoRA of Punica/S-LoRA), so the comparison isolates the compact form. Prints one JSON
object per line, then a table. Times are medians of interleaved repetitions (steady decode:
the per-step plan is built once and reused, as the engine does while the batch is unchanged).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from ..adapters.config import ProLoRAConfig
from ..adapters.weights import ADAPTER_TORCH_DTYPES, CompactAdapter, CompactLinearWeights
from .interface import get_backend
from .metadata import build_adapter_batch
from .pool import AdapterWeightPool

LAYER_SHAPES = {
    "smollm2-135m": {"q_proj": (576, 576), "k_proj": (576, 192), "up_proj": (576, 1536),
                     "down_proj": (1536, 576)},
    "llama2-7b": {"q_proj": (4096, 4096), "up_proj": (4096, 11008), "down_proj": (11008, 4096)},
}
# name -> (r, u, m, n)
VARIANTS = {
    "prolora r=8 u=1 m=n=7": (8, 1, 7, 7),
    "lora r=8 (same rank)": (8, 8, 1, 1),
    "lora r=2 (same params)": (2, 2, 1, 1),
}


@dataclass
class Result:
    model: str
    module: str
    h: int
    o: int
    batch: int
    variant: str
    params_per_adapter: int
    median_us: float


def build_pool(variant: tuple[int, int, int, int], module: str, h: int, o: int, count: int,
               dtype: torch.dtype = torch.float32) -> AdapterWeightPool:
    r, u, m, n = variant
    config = ProLoRAConfig(r, u, m, n, 16.0, (module,))
    spec = config.layer_spec(module, h, o)
    pool = AdapterWeightPool(dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    for slot in range(count):
        pool.load(slot, CompactAdapter(config, {module: CompactLinearWeights.random(spec, gen, std=0.02)}))
    return pool


def time_once(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e6


def bench_shape(model: str, module: str, h: int, o: int, batch: int, reps: int, backend_name: str,
                pool_dtype: torch.dtype = torch.float32) -> list[Result]:
    backend = get_backend(backend_name)
    x = torch.randn(batch, h)
    step = build_adapter_batch(list(range(batch)))  # a distinct adapter per row
    runs = {}
    for name, variant in VARIANTS.items():
        pool = build_pool(variant, module, h, o, batch, pool_dtype)
        y = torch.zeros(batch, o)
        runs[name] = (pool, y)
        backend.apply(y, x, pool, module, step)  # warm-up; builds the cached plan
    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(reps):  # interleaved so machine noise hits every variant alike
        for name, (pool, y) in runs.items():
            samples[name].append(time_once(lambda: backend.apply(y, x, pool, module, step)))
    return [Result(model, module, h, o, batch, name,
                   runs[name][0].nbytes // (pool_dtype.itemsize * batch), statistics.median(samples[name]))
            for name in VARIANTS]


def print_table(results: list[Result]) -> None:
    names = list(VARIANTS)
    print(f"\n{'model':<13} {'module':<10} {'batch':>5} " + " ".join(f"{n:>24}" for n in names)
          + f" {'prolora/lora8':>14}")
    keyed: dict[tuple, dict[str, Result]] = {}
    for res in results:
        keyed.setdefault((res.model, res.module, res.batch), {})[res.variant] = res
    for (model, module, batch), row in keyed.items():
        cells = " ".join(f"{row[n].median_us:>21.1f} us" for n in names)
        ratio = row[names[0]].median_us / row[names[1]].median_us
        print(f"{model:<13} {module:<10} {batch:>5} {cells} {ratio:>14.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--batch-sizes", default="1,4,16,32,64")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--models", default=",".join(LAYER_SHAPES))
    parser.add_argument("--quick", action="store_true", help="batch sizes 1,32 and 10 reps")
    parser.add_argument("--pool-dtype", default="fp32", choices=ADAPTER_TORCH_DTYPES,
                        help="resident adapter weights (activations stay float32)")
    args = parser.parse_args(argv)
    batches = [1, 32] if args.quick else [int(b) for b in args.batch_sizes.split(",")]
    reps = 10 if args.quick else args.reps
    torch.manual_seed(0)
    results: list[Result] = []
    for model in args.models.split(","):
        for module, (h, o) in LAYER_SHAPES[model].items():
            for batch in batches:
                for res in bench_shape(model, module, h, o, batch, reps, args.backend,
                                       ADAPTER_TORCH_DTYPES[args.pool_dtype]):
                    print(json.dumps(asdict(res)))
                    results.append(res)
    print_table(results)


if __name__ == "__main__":
    main()
