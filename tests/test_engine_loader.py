"""Loading base models: HF directories (sharded, tied/untied), quantization options, the cache of
quantized weights, bad input, and the embedded default model (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from prolora_serve.server.engine import default_model, quantize
from prolora_serve.kernels.metadata import SeqSlice, StepMetadata, build_attention_metadata
from prolora_serve.server.engine.loader import LoadedModel, load_base_model
from prolora_serve.server.engine.packed_linear import PackedLinear

VOCAB = 128


def write_tiny_model(directory: Path, tied: bool = False, shard: bool = False,
                     **overrides) -> LlamaForCausalLM:
    """A small random LLaMA saved like a Hub checkpoint, with a word-level tokenizer."""
    settings = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                    initializer_range=0.1, tie_word_embeddings=tied, eos_token_id=2)
    settings.update(overrides)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**settings)).eval()
    hf.save_pretrained(directory, max_shard_size="40KB" if shard else "1GB")
    GenerationConfig(eos_token_id=[2, 5]).save_pretrained(directory)
    vocab = {f"w{i}": i for i in range(VOCAB)}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=word_level, eos_token="w7").save_pretrained(directory)
    return hf


@torch.inference_mode()
def prefill_logits(loaded: LoadedModel, tokens: list[int]) -> torch.Tensor:
    model = loaded.model
    kv = model.make_kv_cache(num_blocks=4, block_size=8)
    meta = build_attention_metadata([SeqSlice([2, 0, 3], 0, len(tokens))], 8)
    hidden = model(torch.tensor(tokens), torch.arange(len(tokens)), StepMetadata(meta), kv)
    return model.compute_logits(hidden)


TOKENS = [3, 17, 99, 42, 8, 120, 64, 1, 77, 5, 31, 2]


@torch.inference_mode()
def hf_logits(hf: LlamaForCausalLM, tokens: list[int]) -> torch.Tensor:
    return hf(torch.tensor([tokens])).logits[0]


@pytest.mark.parametrize("tied,shard", [(False, False), (True, True)])
def test_fp32_hf_directory_loads_exactly(tmp_path: Path, tied: bool, shard: bool) -> None:
    hf = write_tiny_model(tmp_path / "m", tied=tied, shard=shard)
    assert (tmp_path / "m" / "model.safetensors.index.json").is_file() == shard
    loaded = load_base_model(str(tmp_path / "m"), dtype="fp32", cache_dir=tmp_path / "cache")
    torch.testing.assert_close(prefill_logits(loaded, TOKENS), hf_logits(hf, TOKENS),
                               atol=1e-4, rtol=1e-4)
    assert loaded.name == "m" and loaded.dtype == "fp32"
    assert loaded.eos_token_ids == [2, 5, 7]  # generation config, then config, then tokenizer
    params = sum(p.numel() for p in hf.parameters())  # counts a tied matrix once
    # On the CPU the output layer is packed for oneDNN: a tied one becomes its own copy (the
    # embedding keeps the dense matrix for lookups), an untied one just changes layout.
    assert isinstance(loaded.model.lm_head, PackedLinear)
    head_copy = hf.config.vocab_size * hf.config.hidden_size if tied else 0
    assert loaded.nbytes == 4 * (params + head_copy)


def dequantized_reference(hf: LlamaForCausalLM, dtype: str) -> LlamaForCausalLM:
    """HF's model with every projection replaced by its quantize -> dequantize round trip."""
    reference = LlamaForCausalLM(hf.config).eval()
    reference.load_state_dict(hf.state_dict())
    with torch.no_grad():
        for name, module in reference.named_modules():
            if name.endswith("_proj"):
                module.weight.copy_(ROUND_TRIPS[dtype](module.weight))
    return reference


def nf4_round_trip(weight: torch.Tensor) -> torch.Tensor:
    packed, state = bnbf.quantize_4bit(weight.detach().contiguous(), blocksize=64,
                                       compress_statistics=False, quant_type="nf4")
    return bnbf.dequantize_4bit(packed, state)


def int8_round_trip(weight: torch.Tensor) -> torch.Tensor:
    scales = weight.double().abs().amax(dim=1, keepdim=True) / 127
    return ((weight.double() / scales).round() * scales).float()


ROUND_TRIPS = {"nf4": nf4_round_trip, "int8": int8_round_trip, "bf16": lambda w: w.bfloat16().float()}


@pytest.mark.parametrize("dtype", ["nf4", "int8", "bf16"])
def test_quantized_options_match_a_dequantized_reference_and_shrink_the_model(
        tmp_path: Path, dtype: str) -> None:
    hf = write_tiny_model(tmp_path / "m")
    loaded = load_base_model(str(tmp_path / "m"), dtype=dtype, cache_dir=tmp_path / "cache")
    got = prefill_logits(loaded, TOKENS)
    assert got.dtype == torch.float32
    expected = hf_logits(dequantized_reference(hf, dtype), TOKENS)
    # NF4 and bf16 compute in bf16 on this CPU (bitsandbytes' kernel), int8 in float32.
    relative = ((got - expected).norm() / expected.norm()).item()
    assert relative < {"nf4": 0.03, "int8": 1e-4, "bf16": 0.03}[dtype]
    assert (got - hf_logits(hf, TOKENS)).abs().max() > 1e-3  # really not the float weights
    projections = sum(m.weight.numel() for n, m in hf.named_modules() if n.endswith("_proj"))
    others = sum(p.numel() for p in hf.parameters()) - projections
    if dtype == "bf16":
        assert loaded.nbytes == 2 * (projections + others)
    else:  # embeddings, norms and lm_head stay fp32; the rest is 4 or 8 bits plus scales
        overhead = loaded.nbytes - 4 * others - {"nf4": 0.5, "int8": 1}[dtype] * projections
        assert 0 < overhead < 0.08 * projections  # absmax per 64 weights / scale per row


@pytest.mark.parametrize("shape", [(1, 576), (7, 576), (2, 5, 576)])
def test_nf4_linear_fast_cpu_path_equals_bitsandbytes_forward(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(576, 192, bias=False)
    module = quantize.nf4_linear(linear, quantize.quantize_nf4(linear.weight.data), torch.float32,
                                 torch.device("cpu")).eval()
    x = torch.randn(*shape)
    with torch.inference_mode():
        got = module(x)
        expected = bnb.nn.Linear4bit.forward(module, x)
    assert got.shape == (*shape[:-1], 192) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    reference = x @ nf4_round_trip(linear.weight).T  # float activations, the same NF4 weights
    assert ((got - reference).norm() / reference.norm()).item() < 0.01  # bf16 activations


def test_nf4_reuses_its_quantized_cache_and_survives_a_corrupt_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_tiny_model(tmp_path / "m")
    cache = tmp_path / "cache"
    first = prefill_logits(load_base_model(str(tmp_path / "m"), "nf4", cache_dir=cache), TOKENS)
    files = list((cache / "quantized").glob("m-nf4-*.safetensors"))
    assert len(files) == 1

    def no_quantizing(weight: torch.Tensor) -> dict:
        raise AssertionError("the cached quantized weights should have been used")

    with monkeypatch.context() as patch:
        patch.setitem(quantize.QUANTIZERS, "nf4", (no_quantizing, quantize.nf4_linear))
        again = prefill_logits(load_base_model(str(tmp_path / "m"), "nf4", cache_dir=cache), TOKENS)
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    files[0].write_bytes(b"not a safetensors file")
    rebuilt = prefill_logits(load_base_model(str(tmp_path / "m"), "nf4", cache_dir=cache), TOKENS)
    torch.testing.assert_close(rebuilt, first, atol=0, rtol=0)


def test_bad_inputs_get_clear_errors(tmp_path: Path) -> None:
    write_tiny_model(tmp_path / "m")
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        load_base_model(str(tmp_path / "m"), dtype="fp8")
    with pytest.raises(FileNotFoundError, match="neither a local Hugging Face directory"):
        load_base_model(str(tmp_path / "missing"), dtype="fp32")
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        load_base_model(str(tmp_path / "m"), dtype="fp32", device="tpu")


def _edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def test_unsupported_checkpoints_are_refused(tmp_path: Path) -> None:
    write_tiny_model(tmp_path / "m")
    _edit_config(tmp_path / "m", quantization_config={"quant_method": "bitsandbytes"})
    with pytest.raises(ValueError, match="pre-quantized"):
        load_base_model(str(tmp_path / "m"), dtype="fp32")
    write_tiny_model(tmp_path / "g")
    _edit_config(tmp_path / "g", model_type="gpt2")
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        load_base_model(str(tmp_path / "g"), dtype="fp32")


def test_checkpoint_with_missing_weights_names_them(tmp_path: Path) -> None:
    write_tiny_model(tmp_path / "m")
    _edit_config(tmp_path / "m", num_hidden_layers=3)  # the weights only have two layers
    with pytest.raises(ValueError, match=r"missing \['model.layers.2"):
        load_base_model(str(tmp_path / "m"), dtype="fp32")


def test_a_directory_with_several_gguf_files_must_name_one(tmp_path: Path) -> None:
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="several GGUF files"):
        load_base_model(str(tmp_path), dtype="fp32")


def test_publish_keeps_a_finished_copy_and_replaces_an_unfinished_one(tmp_path: Path) -> None:
    def staged(name: str, marker: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(marker)
        (path / default_model.WEIGHTS_FILE).write_text(marker)
        return path

    target = tmp_path / "target"
    default_model._publish(staged("first", "first"), target)
    default_model._publish(staged("second", "second"), target)  # lost the race: kept "first"
    assert (target / "config.json").read_text() == "first"
    (target / default_model.WEIGHTS_FILE).unlink()  # an unfinished leftover
    default_model._publish(staged("third", "third"), target)
    assert (target / "config.json").read_text() == "third"


# ----- the embedded default model (SmolLM2-135M-Instruct) -----

@pytest.mark.slow
def test_default_model_is_converted_once_and_reused(default_model_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    config = json.loads((default_model_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert (default_model_dir / "tokenizer.json").is_file()

    def no_conversion(*args, **kwargs) -> Path:
        raise AssertionError("the converted directory should have been reused")

    monkeypatch.setattr(default_model, "convert_gguf_to_hf_dir", no_conversion)
    assert default_model.default_model_hf_dir(default_model_dir.parent) == default_model_dir


@pytest.mark.slow
def test_default_model_nf4_answers_paris(default_model_dir: Path) -> None:
    loaded = load_base_model(None, dtype="nf4", cache_dir=default_model_dir.parent)
    assert loaded.name == "SmolLM2-135M-Instruct"
    # 4-bit projections (~57 MiB), the float32 embedding (108 MiB) and its oneDNN-packed copy as
    # the output layer; fp32 weights take about 620 MiB.
    assert loaded.nbytes < 300 * 2**20
    prompt = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, tokenize=False)
    ids = loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert "Paris" in loaded.tokenizer.decode(greedy(loaded, ids, max_tokens=12))


@torch.inference_mode()
def greedy(loaded: LoadedModel, prompt: list[int], max_tokens: int) -> list[int]:
    model, block_size = loaded.model, 16
    kv = model.make_kv_cache(num_blocks=8, block_size=block_size)
    table, cached, new, out = [5, 1, 7, 0, 2, 6, 3, 4], 0, list(prompt), []
    for _ in range(max_tokens):
        meta = build_attention_metadata([SeqSlice(table, cached, len(new))], block_size)
        hidden = model(torch.tensor(new), torch.arange(cached, cached + len(new)), StepMetadata(meta), kv)
        token = int(model.compute_logits(hidden[-1:]).argmax(-1))
        if token in loaded.eos_token_ids:
            break
        cached, new = cached + len(new), [token]
        out.append(token)
    return out


@pytest.mark.slow
def test_gguf_file_loads_like_its_converted_directory(default_model_dir: Path, tmp_path: Path) -> None:
    gguf = default_model.default_gguf_path()
    from_gguf = load_base_model(str(gguf), dtype="fp32", cache_dir=tmp_path)
    converted = load_base_model(str(default_model_dir), dtype="fp32", cache_dir=tmp_path)
    assert from_gguf.name == gguf.stem and from_gguf.eos_token_ids == converted.eos_token_ids
    tokens = converted.tokenizer("The capital of France is")["input_ids"]
    assert from_gguf.tokenizer("The capital of France is")["input_ids"] == tokens
    torch.testing.assert_close(prefill_logits(from_gguf, tokens), prefill_logits(converted, tokens),
                               atol=0, rtol=0)
