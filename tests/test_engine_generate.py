"""End-to-end generation: a tiny random LLaMA with the default model's real tokenizer (fast),
and the embedded default model itself (slow). Compares against Hugging Face ``generate`` and
float64 references; checks batch invariance with mixed adapters, stop conditions, logprobs,
preemption, cancellation and the async engine's error paths."""

from __future__ import annotations

import asyncio
import copy
import time
from dataclasses import dataclass, field

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine_testing import load_default_tokenizer
from prolora_serve.adapters.config import ProLoRAConfig
from prolora_serve.adapters.dense import delta_weight
from prolora_serve.adapters.weights import CompactAdapter
from prolora_serve.server.engine.async_engine import AsyncLLMEngine
from prolora_serve.server.engine.client import EngineClient
from prolora_serve.server.engine.engine import EngineConfig, LLMEngine, RequestOutput
from prolora_serve.server.engine.errors import (
    AdapterTooLargeError,
    EngineStoppedError,
    PromptTooLongError,
    QueueFullError,
)
from prolora_serve.adapters.registry import AdapterNotFoundError
from prolora_serve.server.engine.loader import LoadedModel, build_model
from prolora_serve.server.engine.sampling import SamplingParams
from test_engine_residency import FakeSource

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
            initializer_range=0.2)  # wide logits: greedy choices are far from ties


@dataclass
class Tiny:
    hf: LlamaForCausalLM
    tokenizer: object
    adapters: dict[str, CompactAdapter] = field(default_factory=dict)

    @property
    def config(self) -> LlamaConfig:
        return self.hf.config

    def loaded(self, eos: list[int] | None = None) -> LoadedModel:
        model = build_model(self.config, self.hf.state_dict())
        eos_ids = [self.tokenizer.eos_token_id] if eos is None else eos
        return LoadedModel(model, self.tokenizer, self.config, "tiny", 0, eos_ids, "fp32")

    def engine(self, eos: list[int] | None = None, **overrides) -> LLMEngine:
        options = dict(dtype="fp32", kv_cache_memory=4 << 20, max_batched_tokens=64,
                       adapter_memory=64 << 20)
        options.update(overrides)
        return LLMEngine(EngineConfig(**options), self.loaded(eos), FakeSource(self.adapters))


def random_adapters(shapes: dict[str, tuple[int, int]]) -> dict[str, CompactAdapter]:
    """PRoLoRA adapters of several shapes and plain LoRA ones, all with non-zero B."""
    all_proj = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    configs = {
        "pro-a": ProLoRAConfig(8, 1, 7, 7, 16, all_proj),
        "pro-b": ProLoRAConfig(6, 2, 3, 5, 12, ("q_proj", "v_proj", "down_proj")),
        "pro-c": ProLoRAConfig(4, 0, 2, 2, 8, ("o_proj", "up_proj")),
        "pro-d": ProLoRAConfig(8, 1, 7, 7, 16, all_proj),
        "lora-a": ProLoRAConfig(4, 4, 1, 1, 8, all_proj, peft_type="LORA"),
        "lora-b": ProLoRAConfig(2, 2, 1, 1, 4, ("k_proj", "gate_proj"), peft_type="LORA"),
    }
    return {name: CompactAdapter.random(config, shapes, torch.Generator().manual_seed(i), std=0.15)
            for i, (name, config) in enumerate(configs.items())}


@pytest.fixture(scope="module")
def tiny() -> Tiny:
    torch.manual_seed(0)
    tokenizer = load_default_tokenizer()
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **TINY)).eval()
    setup = Tiny(hf, tokenizer)
    setup.adapters = random_adapters(setup.loaded().model.linear_shapes())
    return setup


@dataclass
class Request:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    adapter: str | None = None
    arrival_step: int = 0


@dataclass
class Result:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list | None = None
    outputs: int = 0


def collect(result: Result, output: RequestOutput) -> None:
    assert not result.finish_reason, "output after the final one"
    result.token_ids += output.token_ids
    result.text += output.text
    result.logprobs += output.logprobs
    result.outputs += 1
    if output.prompt_logprobs is not None:
        assert result.prompt_logprobs is None, "prompt logprobs sent twice"
        result.prompt_logprobs = output.prompt_logprobs
    if output.finished:
        result.finish_reason = output.finish_reason
    assert output.num_generated_tokens == len(result.token_ids)


def run(engine: LLMEngine, requests: list[Request], max_steps: int = 2000,
        batch_sizes: list[int] | None = None) -> dict[str, Result]:
    """Drive the engine step by step, adding each request at its arrival step."""
    results = {r.request_id: Result() for r in requests}
    for step in range(max_steps):
        for r in requests:
            if r.arrival_step == step:
                engine.add_request(r.request_id, r.prompt, r.params, r.adapter)
        for output in engine.step():
            collect(results[output.request_id], output)
        if not engine.last_step_ran:  # waiting on an adapter read: give the loader thread time
            time.sleep(0.002)
        if batch_sizes is not None:
            batch_sizes.append(engine.stats().last_batch_size)
        if step >= max(r.arrival_step for r in requests) and not engine.has_work():
            break
    assert all(r.finish_reason for r in results.values()), "unfinished requests"
    assert engine.stats().kv_blocks_used == 0
    return results


def greedy(max_tokens: int = 12, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kwargs)


def hf_greedy(hf: LlamaForCausalLM, prompt_ids: list[int], max_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                          do_sample=False, min_new_tokens=max_tokens, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def merged_hf(tiny: Tiny, adapter: CompactAdapter) -> LlamaForCausalLM:
    """HF model with the adapter's dense delta merged into its weights (float64 sum)."""
    merged = copy.deepcopy(tiny.hf)
    with torch.no_grad():
        for path, weights in adapter.modules.items():
            linear = merged.get_submodule(path)
            merged_weight = linear.weight.double() + delta_weight(weights.to(dtype=torch.float64))
            linear.weight.copy_(merged_weight.float())
    return merged


def prompt_ids(tiny: Tiny, length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(100, len(tiny.tokenizer) - 100, (length,), generator=generator).tolist()


# --- correctness against Hugging Face ----------------------------------------------------------
def test_base_model_matches_hf_generate_greedy(tiny: Tiny) -> None:
    prompts = ["The quick brown fox", "Once upon a time, in a land far away,", "1 2 3"]
    results = run(tiny.engine(max_batched_tokens=8),
                  [Request(str(i), p, greedy(10)) for i, p in enumerate(prompts)])
    for i, prompt in enumerate(prompts):
        assert results[str(i)].token_ids == hf_greedy(tiny.hf, tiny.tokenizer.encode(prompt), 10)
        assert results[str(i)].finish_reason == "length"


@pytest.mark.parametrize("adapter_id", ["pro-a", "pro-b", "lora-a"])
def test_unmerged_adapter_matches_hf_with_the_merged_dense_delta(tiny: Tiny, adapter_id: str) -> None:
    ids = prompt_ids(tiny, 9, seed=5)
    results = run(tiny.engine(), [Request("r", ids, greedy(10), adapter_id),
                                  Request("base", ids, greedy(10))])
    expected = hf_greedy(merged_hf(tiny, tiny.adapters[adapter_id]), ids, 10)
    assert results["r"].token_ids == expected
    assert results["base"].token_ids != expected  # the adapter really changes the output


def test_logprobs_and_prompt_logprobs_match_float64_reference(tiny: Tiny) -> None:
    ids = prompt_ids(tiny, 21, seed=6)
    params = greedy(6, logprobs=3, prompt_logprobs=2)
    engine = tiny.engine(max_batched_tokens=8)  # the prompt is prefilled over three steps
    result = run(engine, [Request("r", ids, params, "pro-b")])["r"]
    model = merged_hf(tiny, tiny.adapters["pro-b"]).double()
    with torch.no_grad():
        full = torch.tensor([ids + result.token_ids])
        reference = torch.log_softmax(model(full).logits[0], dim=-1)
    assert result.prompt_logprobs[0] is None and len(result.prompt_logprobs) == len(ids)
    for pos, entry in enumerate(result.prompt_logprobs[1:], start=1):
        assert entry.token_id == ids[pos]
        assert entry.logprob == pytest.approx(float(reference[pos - 1, ids[pos]]), abs=2e-4)
        assert len(entry.top_logprobs) <= 2
    for i, entry in enumerate(result.logprobs):
        row = reference[len(ids) - 1 + i]
        assert entry.token_id == result.token_ids[i] == int(row.argmax())
        assert entry.logprob == pytest.approx(float(row[entry.token_id]), abs=2e-4)
        top = row.topk(3)
        expected = {tiny.tokenizer.decode([t]): float(v) for t, v in zip(top.indices, top.values)}
        assert entry.top_logprobs.keys() == expected.keys()
        for token, value in expected.items():
            assert entry.top_logprobs[token] == pytest.approx(value, abs=2e-4)


# --- batch invariance ---------------------------------------------------------------------------
def mixed_requests(tiny: Tiny, count: int) -> list[Request]:
    adapters = [*tiny.adapters, None]
    return [Request(f"req{i}", prompt_ids(tiny, 3 + (i * 7) % 31, seed=100 + i),
                    greedy(8 + i % 5), adapters[i % len(adapters)], arrival_step=(i * 3) % 11)
            for i in range(count)]


def test_each_request_gives_the_same_tokens_alone_and_in_a_mixed_batch(tiny: Tiny) -> None:
    requests = mixed_requests(tiny, 18)
    engine = tiny.engine(max_batched_tokens=40)  # prefill chunks share steps with decodes
    batch_sizes: list[int] = []
    together = run(engine, requests, batch_sizes=batch_sizes)
    assert max(batch_sizes) >= 10  # most requests really ran together
    assert engine.stats().adapter_cache.loads == len(tiny.adapters)
    for r in requests:
        alone = run(engine, [Request(r.request_id, r.prompt, r.params, r.adapter)])
        assert together[r.request_id].token_ids == alone[r.request_id].token_ids, r.request_id
        assert together[r.request_id].text == alone[r.request_id].text
    without = run(engine, [Request(r.request_id, r.prompt, r.params) for r in requests if r.adapter])
    changed = [rid for rid, res in without.items() if res.token_ids != together[rid].token_ids]
    assert len(changed) >= len(without) - 2  # adapters really act (a few may agree by chance)


def test_preemption_under_a_tiny_kv_cache_keeps_outputs_identical(tiny: Tiny) -> None:
    requests = [Request(f"p{i}", prompt_ids(tiny, 10 + i, seed=200 + i), greedy(20),
                        ["pro-a", None, "lora-a"][i % 3]) for i in range(6)]
    block_bytes = 2 * 2 * 4 * 2 * 16 * 4  # layers * k/v * block_size * kv_heads * head_dim * fp32
    engine = tiny.engine(kv_cache_memory=24 * block_bytes, block_size=4)
    together = run(engine, requests)
    assert engine.stats().num_preemptions > 0
    for r in requests:
        alone = run(engine, [Request(r.request_id, r.prompt, r.params, r.adapter)])
        assert together[r.request_id].token_ids == alone[r.request_id].token_ids


def test_seeded_sampling_is_independent_of_the_batch(tiny: Tiny) -> None:
    ids = prompt_ids(tiny, 7, seed=7)
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    engine = tiny.engine()
    alone = run(engine, [Request("s", ids, params, "pro-c")])["s"].token_ids
    others = [Request(f"o{i}", prompt_ids(tiny, 5 + i, seed=i), SamplingParams(max_tokens=9, seed=i))
              for i in range(5)]
    mixed = run(engine, others + [Request("s", ids, params, "pro-c", arrival_step=2)])
    assert mixed["s"].token_ids == alone
    other_seed = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=99, ignore_eos=True)
    assert run(engine, [Request("s", ids, other_seed, "pro-c")])["s"].token_ids != alone


# --- stop conditions ----------------------------------------------------------------------------
def test_stop_strings_cut_the_text_and_stream_consistently(tiny: Tiny) -> None:
    engine = tiny.engine()
    prompt = "Tell me a story:"
    full = run(engine, [Request("full", prompt, greedy(24))])["full"]
    middle = len(full.text) // 2
    stop = full.text[middle:middle + 3]
    cut = full.text[:full.text.find(stop)]
    result = run(engine, [Request("cut", prompt, greedy(24, stop=["@@never@@", stop]))])["cut"]
    assert result.text == cut and result.finish_reason == "stop"
    assert len(result.token_ids) < len(full.token_ids)
    assert full.text.startswith(tiny.tokenizer.decode(result.token_ids[:-1]))


def test_stop_token_ids_eos_and_length(tiny: Tiny) -> None:
    ids = prompt_ids(tiny, 6, seed=8)
    full = run(tiny.engine(), [Request("f", ids, greedy(10))])["f"].token_ids
    stop_at = next(i for i, t in enumerate(full) if i >= 3 and t not in full[:i])
    by_id = run(tiny.engine(), [Request("s", ids, greedy(10, stop_token_ids=[full[stop_at]]))])["s"]
    assert by_id.token_ids == full[:stop_at + 1] and by_id.finish_reason == "stop"
    eos_engine = tiny.engine(eos=[full[stop_at]])
    params = SamplingParams(max_tokens=10, temperature=0)
    assert run(eos_engine, [Request("e", ids, params)])["e"].token_ids == full[:stop_at + 1]
    ignored = run(eos_engine, [Request("i", ids, greedy(10))])["i"]
    assert ignored.token_ids == full and ignored.finish_reason == "length"
    short = run(tiny.engine(max_model_len=10), [Request("m", ids, greedy(10))])["m"]
    assert short.token_ids == full[:4] and short.finish_reason == "length"


def test_bad_requests_are_refused_and_lose_nothing(tiny: Tiny) -> None:
    engine = tiny.engine(max_model_len=16, max_queue=2)
    with pytest.raises(PromptTooLongError, match="at most 15"):
        engine.add_request("long", prompt_ids(tiny, 16, seed=1), greedy())
    with pytest.raises(AdapterNotFoundError):
        engine.add_request("unknown", "hi", greedy(), "no-such-adapter")
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("ids", [len(tiny.tokenizer) + 5], greedy())
    engine.add_request("a", "hello", greedy(3))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", "hello", greedy(3))
    engine.add_request("b", "hello", greedy(3))
    with pytest.raises(QueueFullError):
        engine.add_request("c", "hello", greedy(3))
    finished = set()
    while engine.has_work():
        finished |= {o.request_id for o in engine.step() if o.finished}
    assert finished == {"a", "b"}
    assert engine.stats().num_requests == 2 and engine.stats().generated_tokens == 6


def test_abort_frees_blocks_and_adapter_reference(tiny: Tiny) -> None:
    engine = tiny.engine()
    engine.add_request("x", prompt_ids(tiny, 30, seed=3), greedy(100), "pro-a")
    engine.add_request("y", "hello", greedy(5))
    for _ in range(20):
        engine.step()
        if engine.stats().num_running == 2:
            break
    engine.step()
    assert engine.stats().kv_blocks_used > 0
    engine.abort("x")
    outputs = engine.step()
    aborted = [o for o in outputs if o.request_id == "x"]
    assert aborted and aborted[0].finished and aborted[0].finish_reason == "abort"
    assert [i.in_use for i in engine.adapter_cache.resident()] == [0]
    while engine.has_work():
        engine.step()
    assert engine.stats().kv_blocks_used == 0 and engine.stats().num_aborted == 1


# --- the async engine ------------------------------------------------------------------------------
def async_engine(tiny: Tiny, **overrides) -> AsyncLLMEngine:
    engine = AsyncLLMEngine(tiny.engine(**overrides))
    engine.start()
    return engine


async def consume(engine: AsyncLLMEngine, request_id: str, prompt, params, adapter=None) -> Result:
    result = Result()
    async for output in engine.generate(request_id, prompt, params, adapter):
        collect(result, output)
    return result


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_async_generate_streams_the_same_tokens_as_the_sync_engine(tiny: Tiny) -> None:
    requests = mixed_requests(tiny, 6)
    expected = run(tiny.engine(), [Request(r.request_id, r.prompt, r.params, r.adapter) for r in requests])
    engine = async_engine(tiny)

    async def main() -> list[Result]:
        return await asyncio.gather(*(consume(engine, r.request_id, r.prompt, r.params, r.adapter)
                                      for r in requests))

    try:
        results = asyncio.run(main())
    finally:
        engine.shutdown()
    for r, result in zip(requests, results):
        assert result.token_ids == expected[r.request_id].token_ids
        assert result.text == expected[r.request_id].text and result.outputs > 1


def test_closing_the_stream_early_or_cancelling_aborts(tiny: Tiny) -> None:
    engine = async_engine(tiny)

    async def close_early() -> None:
        stream = engine.generate("early", "Once upon a time", greedy(500), "pro-a")
        async for _ in stream:
            break
        await stream.aclose()

    async def cancel() -> None:
        task = asyncio.ensure_future(consume(engine, "cancel", "Once upon a time", greedy(500)))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(close_early())
        asyncio.run(cancel())
        wait_until(lambda: engine.stats().num_running == 0 and engine.stats().num_waiting == 0)
        stats = engine.stats()
        assert stats.kv_blocks_used == 0 and stats.num_aborted == 2
        assert stats.generated_tokens < 1000
        assert [i.in_use for i in engine.adapter_cache.resident()] == [0]
    finally:
        engine.shutdown()


def test_async_errors_are_raised_to_the_caller(tiny: Tiny) -> None:
    engine = async_engine(tiny, adapter_memory=1000)
    assert isinstance(engine, EngineClient)  # the API's one seam to the engine
    info = engine.model
    assert info.max_model_len == engine.engine.max_len and info.name == engine.engine.model_name
    assert info.linear_shapes == engine.engine.loaded.model.linear_shapes()
    try:
        with pytest.raises(AdapterNotFoundError):
            asyncio.run(consume(engine, "u", "hi", greedy(), "missing"))
        with pytest.raises(AdapterTooLargeError):
            asyncio.run(consume(engine, "t", "hi", greedy(), "pro-a"))
        with pytest.raises(PromptTooLongError):
            asyncio.run(consume(engine, "l", prompt_ids(tiny, 5000, seed=0), greedy()))
        assert asyncio.run(consume(engine, "ok", "hi", greedy(4))).finish_reason == "length"
    finally:
        engine.shutdown()
    with pytest.raises(EngineStoppedError):
        asyncio.run(consume(engine, "late", "hi", greedy()))


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(tiny: Tiny) -> None:
    engine = async_engine(tiny)
    real_run = engine.engine.runner.run
    calls = {"n": 0}

    def flaky_run(chunks):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device fell over")
        return real_run(chunks)

    engine.engine.runner.run = flaky_run
    try:
        with pytest.raises(RuntimeError, match="fell over"):
            asyncio.run(consume(engine, "doomed", "hello", greedy(4)))
        assert asyncio.run(consume(engine, "fine", "hello", greedy(4))).finish_reason == "length"
        assert engine.stats().kv_blocks_used == 0
    finally:
        engine.shutdown()


# --- the embedded default model (slow) -------------------------------------------------------------
@pytest.mark.slow
def test_default_fp32_model_matches_hf_generate(default_model_dir) -> None:
    from prolora_serve.server.engine.loader import load_base_model

    loaded = load_base_model(None, "fp32")
    hf = LlamaForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    engine = LLMEngine(EngineConfig(dtype="fp32", kv_cache_memory=32 << 20), loaded)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    results = run(engine, [Request(str(i), p, greedy(8)) for i, p in enumerate(prompts)])
    for i, prompt in enumerate(prompts):
        assert results[str(i)].token_ids == hf_greedy(hf, loaded.tokenizer.encode(prompt), 8)


@pytest.mark.slow
def test_default_nf4_model_knows_the_capital_of_france(default_model_nf4) -> None:
    engine = AsyncLLMEngine(LLMEngine(EngineConfig(kv_cache_memory=32 << 20), default_model_nf4))
    engine.start()
    try:
        prompt = engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
            add_generation_prompt=True)
        result = asyncio.run(consume(engine, "paris", prompt, SamplingParams(max_tokens=24, temperature=0)))
    finally:
        engine.shutdown()
    assert "Paris" in result.text, result.text


# Observed max errors on this model: fp16 0.003, bf16 0.035 (8 bits of mantissa); auto (fp32) is
# exact to float32 (2e-4, as the other logprob tests).
@pytest.mark.parametrize("kv_dtype, tolerance", [("auto", 2e-4), ("fp16", 1e-2), ("bf16", 1e-1)])
def test_a_16bit_kv_cache_keeps_logprobs_close_to_float64(tiny: Tiny, kv_dtype: str,
                                                          tolerance: float) -> None:
    """--kv-cache-dtype fp16/bf16 next to float32 compute: keys and values are rounded once when
    cached; chunked prefill and decode still track the float64 reference (teacher-forced on the
    engine's own tokens) within that rounding."""
    ids = prompt_ids(tiny, 21, seed=8)
    engine = tiny.engine(max_batched_tokens=8, kv_cache_dtype=kv_dtype)
    expected_dtype = {"auto": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[kv_dtype]
    assert engine.runner.kv_cache.keys[0].dtype == expected_dtype
    result = run(engine, [Request("r", ids, greedy(8, logprobs=1), "pro-a")])["r"]
    model = merged_hf(tiny, tiny.adapters["pro-a"]).double()
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([ids + result.token_ids])).logits[0], -1)
    errors = [abs(entry.logprob - float(reference[len(ids) - 1 + i, entry.token_id]))
              for i, entry in enumerate(result.logprobs)]
    assert len(errors) == 8 and max(errors) < tolerance, errors


# ---- automatic prefix caching ---------------------------------------------------------------------
def _shared_prefix_requests(tiny: Tiny, arrival_gap: int) -> list[Request]:
    system = prompt_ids(tiny, 70, seed=21)  # four full 16-token blocks and a partial one
    requests = []
    for i, adapter in enumerate([None, "pro-a", None, "pro-a", "lora-a", "pro-b", None, "lora-a"]):
        tail = prompt_ids(tiny, 5 + i, seed=40 + i)
        requests.append(Request(f"r{i}", system + tail, greedy(6), adapter, arrival_step=i * arrival_gap))
    return requests


@pytest.mark.parametrize("arrival_gap", [0, 12])  # all in one batch; each after the last finished
def test_prefix_cache_reuses_blocks_and_changes_no_output(tiny: Tiny, arrival_gap: int) -> None:
    requests = _shared_prefix_requests(tiny, arrival_gap)
    cached_engine = tiny.engine(prefix_caching=True)
    cached = run(cached_engine, requests)
    uncached_engine = tiny.engine(prefix_caching=False)
    uncached = run(uncached_engine, requests)
    assert {k: r.token_ids for k, r in cached.items()} == {k: r.token_ids for k, r in uncached.items()}
    stats, off = cached_engine.stats(), uncached_engine.stats()
    assert off.prefix_cache_hits == 0 and off.kv_blocks_cached == 0
    if arrival_gap:  # later requests found the 4 system-prompt blocks of their own adapter
        # per adapter, all but the first request hit: base 2, pro-a 1, lora-a 1 (pro-b: none)
        assert stats.prefix_cache_hits == 4 * 4
        assert stats.prompt_tokens == off.prompt_tokens - 4 * 4 * 16
    assert stats.kv_blocks_cached > 0 and stats.kv_blocks_used == 0  # cached, yet all free


def test_prefix_cache_keys_blocks_by_adapter_weights_never_by_id(tiny: Tiny) -> None:
    shapes = tiny.loaded().model.linear_shapes()
    first, replaced = (CompactAdapter.random(ProLoRAConfig(8, 1, 7, 7, 16, ("q_proj", "v_proj")), shapes,
                                             torch.Generator().manual_seed(seed), std=0.3)
                       for seed in (7, 8))
    prompt = prompt_ids(tiny, 60, seed=5)
    engine = tiny.engine()
    engine.adapter_source.adapters["same-id"] = first
    run(engine, [Request("a", prompt, greedy(4), "same-id")])
    engine.forget_adapter("same-id")  # deleted, then re-uploaded under the same id, new weights
    engine.adapter_source.adapters["same-id"] = replaced
    hits_before = engine.stats().prefix_cache_hits
    after = run(engine, [Request("b", prompt, greedy(4), "same-id")])["b"]
    assert engine.stats().prefix_cache_hits == hits_before  # the old blocks are not this adapter's
    fresh = tiny.engine(prefix_caching=False)
    fresh.adapter_source.adapters["same-id"] = replaced
    assert after.token_ids == run(fresh, [Request("c", prompt, greedy(4), "same-id")])["c"].token_ids
    again = run(engine, [Request("d", prompt, greedy(4), "same-id")])["d"]  # same weights: reuse
    assert engine.stats().prefix_cache_hits == hits_before + 3 and again.token_ids == after.token_ids


def test_cached_blocks_are_evicted_lru_when_the_cache_is_full(tiny: Tiny) -> None:
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4  # layers x (K, V) x slots x kv heads x head dim x fp32
    engine = tiny.engine(kv_cache_memory=12 * block_bytes)  # 12 blocks in all
    prompts = [prompt_ids(tiny, 50, seed=60 + i) for i in range(4)]  # 4 blocks each with output
    for i, prompt in enumerate(prompts):
        run(engine, [Request(f"p{i}", prompt, greedy(4))])
    assert engine.stats().kv_blocks_cached <= 12
    hits = engine.stats().prefix_cache_hits
    run(engine, [Request("last-again", prompts[-1], greedy(4))])  # recently used: still cached
    assert engine.stats().prefix_cache_hits == hits + 3
    # p3 needed one block more than the free ones: the least recently freed cached block went,
    # the tail of p0's chain (blocks are freed tail first), so p0 keeps its first two blocks
    run(engine, [Request("first-again", prompts[0], greedy(4))])
    assert engine.stats().prefix_cache_hits == hits + 3 + 2
