"""The shipped demo adapters: they beat the base on held-out prompts, and the serving engine
computes the same logits from their compact weights as the training model does."""

from __future__ import annotations

import pytest
import torch

from prolora_serve.adapters.format import load_adapter
from prolora_serve.server.training.base import load_training_base
from prolora_serve.server.training.data import render_chat
from prolora_serve.server.training.demo_tasks import DEMO_TASKS, is_french, is_pirate, is_strict_json_answer
from prolora_serve.server.training.evaluate_demo import score_task
from prolora_serve.server.training.inject import attach_adapter, detach_adapters

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def training_base(default_model_dir):
    return load_training_base(str(default_model_dir))


def test_scores_tell_the_behaviours_apart():
    assert is_french("La capitale de la France est Paris.")
    assert not is_french("The capital of France is Paris.")
    assert is_strict_json_answer('{"answer": "Paris", "topic": "geography"}')
    assert not is_strict_json_answer('Sure! {"answer": "Paris"}')
    assert not is_strict_json_answer('{"topic": "geography"}')
    assert is_pirate("Arr, matey! Th' capital be Paris.")
    assert not is_pirate("The capital of France is Paris.")


@pytest.mark.parametrize("name", list(DEMO_TASKS))
def test_demo_adapter_scores_clearly_above_the_base(training_base, name):
    score = score_task(training_base, DEMO_TASKS[name], prompts=6, max_tokens=40)
    assert score.adapter_score >= score.base_score + 0.5, score
    assert score.adapter_file_bytes < 1.5 * 2**20  # about a megabyte


@pytest.fixture(scope="module")
def engine_model(default_model_dir):
    from prolora_serve.server.engine.loader import load_base_model

    return load_base_model(str(default_model_dir), dtype="fp32").model


@torch.inference_mode()
def engine_prefill_logits(model, prompts: list[list[int]], slots: list[int], adapter,
                          pool_dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """One mixed prefill step of several prompts, each row using its slot (or none)."""
    from prolora_serve.kernels import AdapterContext, AdapterWeightPool, build_adapter_batch, get_backend
    from prolora_serve.kernels.metadata import SeqSlice, StepMetadata, build_attention_metadata

    pool = AdapterWeightPool(torch.device("cpu"), pool_dtype)
    pool.load(0, adapter)
    ctx = AdapterContext(pool, get_backend("auto"))
    block_size = 16
    kv = model.make_kv_cache(num_blocks=sum(-(-len(p) // block_size) for p in prompts), block_size=block_size)
    tables, next_block = [], 0
    for prompt in prompts:
        count = -(-len(prompt) // block_size)
        tables.append(list(range(next_block, next_block + count)))
        next_block += count
    meta = build_attention_metadata([SeqSlice(t, 0, len(p)) for t, p in zip(tables, prompts)], block_size)
    step = StepMetadata(meta, ctx.for_step(build_adapter_batch([slot for p, slot in zip(prompts, slots) for _ in p])))
    ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.cat([torch.arange(len(p)) for p in prompts])
    logits = model.compute_logits(model(ids, positions, step, kv))
    return list(torch.split(logits, [len(p) for p in prompts]))


@torch.inference_mode()
def test_engine_serves_the_trained_adapter_like_the_training_model(training_base, engine_model):
    from prolora_serve.kernels import NO_ADAPTER

    task = DEMO_TASKS["french"]
    adapter = load_adapter(task.adapter_path(), linear_shapes=engine_model.linear_shapes()).to(dtype=torch.float32)
    tokenizer = training_base.tokenizer
    prompts = [tokenizer(render_chat(tokenizer, c, add_generation_prompt=True),
                         add_special_tokens=False).input_ids for c in task.heldout_conversations()[:2]]
    served = engine_prefill_logits(engine_model, prompts, [0, NO_ADAPTER], adapter)
    hf = training_base.model
    base_logits = hf(torch.tensor([prompts[1]])).logits[0]
    attach_adapter(hf, adapter)
    try:
        adapted_logits = hf(torch.tensor([prompts[0]])).logits[0]
    finally:
        detach_adapters(hf)
    torch.testing.assert_close(served[0], adapted_logits, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(served[1], base_logits, atol=2e-3, rtol=1e-3)
    plain = hf(torch.tensor([prompts[0]])).logits[0]
    assert (adapted_logits - plain).abs().max() > 0.5  # the adapter really changes the output


@torch.inference_mode()
def test_float16_residency_of_a_float16_adapter_changes_no_logit(training_base, engine_model):
    """The demo adapters are stored in fp16, so resident fp16 weights (the default next to an
    nf4 base) widen to exactly the fp32 values: the logits are bit-identical."""
    task = DEMO_TASKS["pirate"]
    adapter = load_adapter(task.adapter_path(), linear_shapes=engine_model.linear_shapes())
    assert {t.dtype for w in adapter.modules.values() for t in w.tensors()} == {torch.float16}
    tokenizer = training_base.tokenizer
    prompts = [tokenizer(render_chat(tokenizer, c, add_generation_prompt=True),
                         add_special_tokens=False).input_ids for c in task.heldout_conversations()[:2]]
    wide = engine_prefill_logits(engine_model, prompts, [0, 0], adapter, torch.float32)
    narrow = engine_prefill_logits(engine_model, prompts, [0, 0], adapter, torch.float16)
    for a, b in zip(wide, narrow):
        assert torch.equal(a, b)
