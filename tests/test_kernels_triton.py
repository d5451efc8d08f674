"""The Triton backend against the float64 reference, run by the Triton interpreter on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="the triton extra is not installed")

SCRIPT = r"""
import random, torch
from prolora_serve.kernels import NO_ADAPTER, AdapterWeightPool, build_adapter_batch, get_backend
from prolora_serve.kernels.testing import assert_close_for_dtype
from test_kernels import CONFIGS, MODULES, make_adapter, popularity, with_gaps

pool = AdapterWeightPool()
for slot, (r, u, m, n) in enumerate(CONFIGS):
    pool.load(slot, make_adapter(r, u, m, n, alpha=8.0 + slot, seed=slot))
rng = random.Random(0)
for kind in ("distinct", "identical", "zipf", "skewed"):
    for rows in (1, 5, 12):
        slots = with_gaps(popularity(kind, rows, len(CONFIGS), rng), rng)
        for module, (h, o) in MODULES.items():
            x, y = torch.randn(rows, h), torch.randn(rows, o)
            fast, expected = y.clone(), y.clone().double()
            batch = build_adapter_batch(slots)
            get_backend("triton").apply(fast, x, pool, module, batch)
            get_backend("reference").apply(expected, x.double(), pool, module, batch)
            assert_close_for_dtype(fast, expected, torch.float32)
print("ok")
"""


def test_triton_backend_matches_reference_in_interpreter() -> None:
    # TRITON_INTERPRET must be set before triton is imported, hence a child process.
    env = dict(os.environ, TRITON_INTERPRET="1")
    tests_dir = os.path.dirname(__file__)
    env["PYTHONPATH"] = tests_dir + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
