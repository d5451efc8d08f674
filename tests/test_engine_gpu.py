"""The engine on a CUDA device: logits against transformers on the same weights, batch invariance
of a mixed batch, CUDA graphs on against off, adapters loaded after capture, NF4 on CUDA.

Marked ``gpu`` and skipped without CUDA; the device check (``prolora-serve bench device``) runs
them on an H100/H200. NOT YET RUN ON A GPU: no device was lent to the task that wrote them."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SMALL = dict(vocab_size=512, hidden_size=256, intermediate_size=352, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
             rms_norm_eps=1e-5, tie_word_embeddings=False)


def small_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**{**SMALL, **overrides})


def hf_model(seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = small_config(initializer_range=0.2)  # wide logits: greedy tokens are well separated
    return LlamaForCausalLM(config).eval()


def our_model(hf, dtype: str):
    from prolora_serve.server.engine.loader import build_model
    from prolora_serve.server.engine.quantize import load_dtype_for, quantize_model

    model = build_model(hf.config, {k: v.detach().clone() for k, v in hf.state_dict().items()},
                        load_dtype_for(dtype))
    return quantize_model(model, dtype, "cuda", list(model.linear_shapes()), None)


@pytest.mark.parametrize("dtype, tolerance", [("fp32", 1e-3), ("bf16", 4e-2), ("fp16", 1e-2)])
@torch.inference_mode()
def test_engine_logits_match_transformers_on_the_same_weights(dtype: str, tolerance: float) -> None:
    """A prefill, then decode steps through the paged cache (the Triton decode kernel), against
    Hugging Face's forward of the whole sequence on the GPU, at every position."""
    from prolora_serve.kernels import SeqSlice, StepMetadata, build_attention_metadata

    torch.backends.cuda.matmul.allow_tf32 = False
    hf = hf_model()
    model = our_model(hf, dtype)
    hf = hf.to("cuda", {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype])
    tokens = torch.randint(0, SMALL["vocab_size"], (40,), generator=torch.Generator().manual_seed(1))
    expected = hf(tokens.unsqueeze(0).cuda()).logits[0].float()
    kv = model.make_kv_cache(8, 16)
    assert kv.decode_attention.name == "triton"
    table, prefill = [5, 2, 7], 33
    meta = build_attention_metadata([SeqSlice(table, 0, prefill)], 16, "cuda")
    got = [model.compute_logits(model(tokens[:prefill].cuda(), torch.arange(prefill).cuda(),
                                      StepMetadata(meta), kv))]
    for position in range(prefill, len(tokens)):
        meta = build_attention_metadata([SeqSlice(table, position, 1)], 16, "cuda")
        got.append(model.compute_logits(model(tokens[position:position + 1].cuda(),
                                              torch.tensor([position], device="cuda"),
                                              StepMetadata(meta), kv)))
    got = torch.cat(got)
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= tolerance * scale


def gpu_engine(dtype: str = "fp32", enforce_eager: bool = False, variants=((8, 1, 7, 7), (4, 4, 1, 1),
                                                                          (6, 0, 3, 2))):
    """An engine on a small random model with adapters of several shapes in memory."""
    from prolora_serve.server.engine.bench_device import MemoryAdapterSource
    from prolora_serve.server.engine.engine import EngineConfig, LLMEngine
    from prolora_serve.server.engine.loader import random_base_model

    loaded = random_base_model(small_config(), dtype, "cuda", seed=3, std=0.1)
    shapes = loaded.model.linear_shapes()
    sources = {f"v{i}": MemoryAdapterSource(shapes, v, 2, seed=i, std=0.05)
               for i, v in enumerate(variants)}

    class Union:
        def has_adapter(self, adapter_id):
            kind, _, index = adapter_id.partition("-")
            return kind in sources and sources[kind].has_adapter(index)

        def load_adapter(self, adapter_id):
            kind, _, index = adapter_id.partition("-")
            return sources[kind].load_adapter(index)

    config = EngineConfig(dtype=dtype, device="cuda", max_batch=8, kv_cache_memory=64 << 20,
                          adapter_memory=256 << 20, max_model_len=256, enforce_eager=enforce_eager)
    return LLMEngine(config, loaded, Union())


MIXED = [None, "v0-ad0", "v1-ad1", "v2-ad0", "v0-ad1", None, "v1-ad0"]


def generate(engine, requests: list[tuple[list[int], str | None]], tokens: int = 12) -> list[list[int]]:
    from prolora_serve.server.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    for i, (prompt, adapter) in enumerate(requests):
        engine.add_request(f"r{i}", prompt, params, adapter)
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(requests))}
    while engine.has_work():
        for output in engine.step():
            assert output.error is None, output.error
            out[output.request_id].extend(output.token_ids)
    return [out[f"r{i}"] for i in range(len(requests))]


def mixed_requests() -> list[tuple[list[int], str | None]]:
    gen = torch.Generator().manual_seed(7)
    return [(torch.randint(1, SMALL["vocab_size"], (n,), generator=gen).tolist(), adapter)
            for n, adapter in zip((5, 17, 3, 30, 9, 12, 1), MIXED)]


def test_a_mixed_batch_gives_each_request_the_tokens_it_gets_alone() -> None:
    engine = gpu_engine()
    requests = mixed_requests()
    together = generate(engine, requests)
    alone = [generate(engine, [request])[0] for request in requests]
    assert together == alone
    assert engine.runner.graphs is not None and engine.runner.graphs.num_replays > 0


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_graphs_on_and_off_give_the_same_tokens(dtype: str) -> None:
    requests = mixed_requests()
    graphs = gpu_engine(dtype)
    eager = gpu_engine(dtype, enforce_eager=True)
    assert eager.runner.graphs is None and eager.runner.graphs_off_reason == "--enforce-eager"
    assert generate(graphs, requests) == generate(eager, requests)
    assert graphs.runner.graphs.num_replays > 0 and graphs.runner.graphs.num_captures > 0


@torch.inference_mode()
def test_adapters_loaded_after_capture_are_served_without_recapture() -> None:
    from prolora_serve.kernels import NO_ADAPTER
    from prolora_serve.server.engine.bench_device import MemoryAdapterSource
    from prolora_serve.server.engine.cuda_graphs import DecodeRow

    engine = gpu_engine()
    runner, graphs = engine.runner, engine.runner.graphs
    graphs.capture_all()
    captured = graphs.num_captures
    assert captured == 2 * len(graphs.buckets)
    shapes = runner.model.linear_shapes()
    runner.pool.load(3, MemoryAdapterSource(shapes, (8, 2, 4, 6), 1, seed=9).load_adapter("ad0"))
    rows = [DecodeRow(5, 0, [0], 3), DecodeRow(6, 0, [1], NO_ADAPTER), DecodeRow(7, 0, [2], 3)]
    replayed = graphs.run(rows)
    graphs.capture = False  # the same padded forward, eagerly
    eager = graphs.run(rows)
    torch.testing.assert_close(replayed, eager, rtol=1e-4, atol=1e-4)
    assert graphs.num_captures == captured


@torch.inference_mode()
def test_nf4_on_cuda_matches_its_dequantized_weights() -> None:
    import bitsandbytes.functional as bnbf

    from prolora_serve.server.engine import quantize

    torch.manual_seed(0)
    linear = torch.nn.Linear(576, 192, bias=False).cuda()
    module = quantize.nf4_linear(linear, quantize.quantize_nf4(linear.weight.data), torch.bfloat16,
                                 torch.device("cuda"))
    state = module.weight.quant_state
    dense = bnbf.dequantize_4bit(module.weight.data, state).float()
    for rows in (1, 7, 32):
        x = torch.randn(rows, 576, device="cuda", dtype=torch.bfloat16)
        got = module(x).float()
        reference = x.float() @ dense.T
        assert ((got - reference).norm() / reference.norm()).item() < 0.02
