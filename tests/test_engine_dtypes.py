"""Which dtype each base weight format computes in, per device (resolved on the CPU: no CUDA
call is made), fp16 through the whole path, and models with random weights built in place."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from prolora_serve.adapters.accounting import WEIGHT_DTYPES, linear_weight_bytes
from prolora_serve.server.config import DTYPES, EngineConfig
from prolora_serve.server.engine import quantize
from prolora_serve.server.engine.engine import resolve_adapter_dtype, resolve_kv_cache_dtype
from prolora_serve.server.engine.loader import quantized_cache_file, random_base_model

CUDA, CPU = torch.device("cuda"), torch.device("cpu")  # device objects only: nothing runs there


@pytest.mark.parametrize("weights, device, compute, adapters", [
    ("nf4", CPU, torch.float32, torch.float16),  # bitsandbytes' CPU kernel, the fused C++ path
    ("int8", CPU, torch.float32, torch.float16),
    ("bf16", CPU, torch.bfloat16, torch.bfloat16),
    ("fp16", CPU, torch.float16, torch.float16),
    ("fp32", CPU, torch.float32, torch.float32),
    ("nf4", CUDA, torch.bfloat16, torch.bfloat16),  # QLoRA's compute dtype
    ("int8", CUDA, torch.float16, torch.float16),  # bitsandbytes' int8 matmul runs in fp16
    ("bf16", CUDA, torch.bfloat16, torch.bfloat16),
    ("fp16", CUDA, torch.float16, torch.float16),
    ("fp32", CUDA, torch.float32, torch.float32),
])
def test_compute_adapter_and_kv_dtypes_per_format_and_device(weights, device, compute, adapters) -> None:
    assert quantize.compute_dtype_for(weights, device) == compute
    assert quantize.compute_dtype_for(weights, device.type) == compute
    assert resolve_adapter_dtype("auto", weights, compute) == adapters
    assert resolve_kv_cache_dtype("auto", compute) == compute


def test_every_weight_format_has_a_compute_dtype_on_both_devices() -> None:
    assert DTYPES == WEIGHT_DTYPES and "fp16" in DTYPES
    assert {(w, d) for w in DTYPES for d in ("cpu", "cuda")} == set(quantize.COMPUTE_DTYPES)
    assert {d: quantize.load_dtype_for(d) for d in DTYPES} == {
        "nf4": torch.float32, "int8": torch.float32, "bf16": torch.bfloat16,
        "fp16": torch.float16, "fp32": torch.float32}
    with pytest.raises(ValueError, match="unknown dtype"):
        quantize.compute_dtype_for("fp8", CUDA)
    with pytest.raises(ValueError, match="cpu or cuda"):
        quantize.compute_dtype_for("nf4", "mps")
    assert EngineConfig(dtype="fp16").dtype == "fp16"
    assert linear_weight_bytes(100, 10, "fp16") == 200


def test_quantized_caches_are_per_device(tmp_path: Path) -> None:
    """A CPU cache may hold NF4 weights repacked for the CPU kernel: CUDA never reads one."""
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    cpu = quantized_cache_file(tmp_path, "m", [weights], "nf4")
    assert quantized_cache_file(tmp_path, "m", [weights], "nf4", "cpu") == cpu
    cuda = quantized_cache_file(tmp_path, "m", [weights], "nf4", "cuda")
    assert cuda != cpu and "-nf4-cuda-" in cuda.name
    assert quantized_cache_file(tmp_path, "m", [weights], "fp16", "cuda") is None
    packed = {"model.l.q": {"packed": torch.zeros(4, 1, dtype=torch.uint8),
                            "absmax": torch.ones(2), "cpu_packed": torch.tensor([1], dtype=torch.uint8)}}
    quantize.write_quantized(cpu, "nf4", packed)
    assert quantize.read_quantized(cpu, "nf4", ["model.l.q"], "cuda") is None


TINY = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                   tie_word_embeddings=False)


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32", "nf4"])
def test_random_models_are_built_in_place_and_serve(dtype: str) -> None:
    """random_base_model (the device check's LLaMA2-7B-shaped models) on the CPU: right dtypes,
    the projections quantized, and a short generation through the engine, fp16 included."""
    from prolora_serve.server.engine.engine import LLMEngine
    from prolora_serve.server.engine.sampling import SamplingParams

    loaded = random_base_model(TINY, dtype, "cpu", seed=1)
    assert loaded.model.dtype == quantize.compute_dtype_for(dtype, CPU)
    q_proj = loaded.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, quantize.NF4Linear) == (dtype == "nf4")
    assert loaded.tokenizer.decode([5, 7]) == "t5 t7"
    engine = LLMEngine(EngineConfig(dtype=dtype, kv_cache_memory=1 << 20, max_model_len=64),
                       loaded)
    engine.add_request("r", [3, 4, 5, 6], SamplingParams(max_tokens=4, ignore_eos=True))
    outputs = []
    while engine.has_work():
        outputs.extend(engine.step())
    assert sum(len(o.token_ids) for o in outputs) == 4 and outputs[-1].finished
    assert outputs[-1].error is None


def test_fp16_base_matches_fp32_within_fp16_precision() -> None:
    """The same random weights served as fp32 and as fp16: prefill logits agree to fp16."""
    from prolora_serve.kernels.metadata import SeqSlice, StepMetadata, build_attention_metadata

    logits = {}
    for dtype in ("fp32", "fp16"):
        model = random_base_model(TINY, dtype, "cpu", seed=2, std=0.1).model  # same draws
        tokens = torch.tensor([1, 9, 33, 70, 2, 5])
        kv = model.make_kv_cache(4, 8)
        meta = build_attention_metadata([SeqSlice([1, 2], 0, len(tokens))], 8)
        with torch.inference_mode():
            logits[dtype] = model.compute_logits(model(tokens, torch.arange(6), StepMetadata(meta), kv))
    scale = logits["fp32"].abs().max()
    assert (logits["fp16"] - logits["fp32"]).abs().max() < 1e-2 * scale
