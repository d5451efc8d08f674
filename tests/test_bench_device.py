"""The device check's parts that run without a GPU: its adapters, a throughput run on a tiny CPU
model, the floors, the report of the tests it runs, the table; and its refusal without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from prolora_serve.server.engine import bench_device
from prolora_serve.server.engine.loader import random_base_model

TINY = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def test_memory_adapters_are_distinct_and_of_the_variant() -> None:
    shapes = {"model.layers.0.self_attn.q_proj": (48, 48), "model.layers.0.mlp.down_proj": (80, 48)}
    source = bench_device.MemoryAdapterSource(shapes, (8, 1, 7, 7), 3)
    assert source.has_adapter("ad2") and not source.has_adapter("ad3")
    first, second = source.load_adapter("ad0"), source.load_adapter("ad1")
    spec = first.modules["model.layers.0.mlp.down_proj"].spec
    assert (spec.r, spec.unshared_r, spec.reduce_a, spec.reduce_b) == (8, 1, 7, 7)
    assert not torch.equal(first.modules["model.layers.0.mlp.down_proj"].A0,
                           second.modules["model.layers.0.mlp.down_proj"].A0)
    with pytest.raises(Exception, match="ad9"):
        source.load_adapter("ad9")


def test_a_throughput_run_and_its_floors_on_a_tiny_cpu_model() -> None:
    loaded = random_base_model(TINY, "fp32", "cpu", seed=0)
    check = bench_device.Check(budget_s=600)
    check.bandwidth = 1e11
    entry = {"model": "tiny", "dtype": "fp32", "variants": []}
    for index, variant in enumerate(("base only", "32 distinct PRoLoRA r=8 u=1 m=n=7",
                                     "1 shared PRoLoRA r=8 u=1 m=n=7")):
        result = bench_device.measure_variant(loaded, variant, index, requests=3, prompt_tokens=8,
                                              generated_tokens=4, kv_cache_memory=1 << 20)
        assert result["generated_tokens"] == 12 and result["decode_steps"] >= 2
        assert result["graphs"].startswith("off: graphs run only on CUDA")
        assert (result["adapter_bytes"] > 0) == (variant != "base only")
        entry["variants"].append(result)
    bench_device.summarize_model(check, entry, loaded)
    assert "vs_base" in entry["variants"][1] and entry["decode_floor"]["floor_ms"] > 0
    assert any(row[0] == "floor" for row in check.rows)
    text = bench_device.table(check)
    assert text.splitlines()[0].startswith("section") and "tiny fp32" in text


def test_the_junit_report_of_the_gpu_tests_is_read(tmp_path: Path) -> None:
    report = tmp_path / "junit.xml"
    report.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_engine_gpu" name="test_a" time="1.5"/>'
        '<testcase classname="tests.test_kernels_triton" name="test_b" time="0.2"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_engine_gpu" name="test_c" time="0"><skipped/></testcase>'
        '</testsuite></testsuites>')
    assert bench_device.parse_junit(report) == [
        {"name": "test_engine_gpu::test_a", "outcome": "passed", "seconds": 1.5},
        {"name": "test_kernels_triton::test_b", "outcome": "failed", "seconds": 0.2},
        {"name": "test_engine_gpu::test_c", "outcome": "skipped", "seconds": 0.0}]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no GPU")
def test_without_a_gpu_only_the_dry_run_runs(capsys) -> None:
    assert bench_device.main([]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
    assert bench_device.main(["--dry-run"]) == 0
