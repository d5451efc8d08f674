"""Parameter/byte accounting: the paper's Table 1, GQA shapes, and agreement with real tensors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prolora_serve.adapters.accounting import (
    ALL_TARGETS, EQUAL_QUALITY_PAIR, GIB, MIB, PAPER_VARIANTS, AccountingError, AdapterVariant,
    ModelShape, adapter_num_params, adapters_that_fit, base_model_nbytes, base_model_num_params,
    footprint, kv_cache_bytes_per_token, linear_weight_bytes, lora,
)
from prolora_serve.adapters.config import LayerSpec
from prolora_serve.adapters.presets import MODEL_PRESETS, PAPER_TABLE1_LORA_R2, preset
from prolora_serve.adapters.weights import CompactLinearWeights

LLAMA2_7B = ModelShape.from_config(preset("llama2-7b"))

# Paper Table 1 (LLaMA2-7B, all seven projections) as exact integers.
TABLE1_7B = [
    (lora(2), 4_997_120),
    (lora(8), 19_988_480),
    (lora(16), 39_976_960),
    (lora(64), 159_907_840),
    (AdapterVariant(8, 1, 7, 7), 4_999_520),
    (AdapterVariant(32, 4, 7, 7), 19_998_080),
]


@pytest.mark.parametrize("variant,expected", TABLE1_7B, ids=lambda v: getattr(v, "id", str(v)))
def test_table1_llama2_7b_exact(variant: AdapterVariant, expected: int) -> None:
    assert footprint(LLAMA2_7B, variant).num_params == expected


@pytest.mark.parametrize("variant,millions", [(lora(2), "5.00"), (lora(8), "19.99"), (lora(16), "39.98"),
                                              (lora(64), "159.91"), (AdapterVariant(8, 1, 7, 7), "5.00"),
                                              (AdapterVariant(32, 4, 7, 7), "20.00")])
def test_table1_llama2_7b_rounded_millions(variant: AdapterVariant, millions: str) -> None:
    assert f"{footprint(LLAMA2_7B, variant).num_params / 1e6:.2f}" == millions


@pytest.mark.parametrize("variant,mib", [(lora(2), 19), (lora(16), 153), (lora(64), 610)])
def test_table1_fp32_sizes_in_mib(variant: AdapterVariant, mib: int) -> None:
    result = footprint(LLAMA2_7B, variant, dtype="fp32")
    assert result.nbytes == 4 * result.num_params
    assert abs(result.nbytes / MIB - mib) < 0.51  # the paper prints 152.498 MiB as 153


def test_half_precision_halves_bytes() -> None:
    for dtype in ("bf16", "fp16"):
        assert footprint(LLAMA2_7B, lora(16), dtype).nbytes == 2 * 39_976_960


def test_paper_variants_are_the_table1_rows() -> None:
    assert [v.id for v in PAPER_VARIANTS] == [v.id for v, _ in TABLE1_7B]
    prolora, lora16 = EQUAL_QUALITY_PAIR
    assert (prolora.kind, lora16.kind) == ("prolora", "lora")
    assert footprint(LLAMA2_7B, lora16).num_params / footprint(LLAMA2_7B, prolora).num_params == pytest.approx(1.999, abs=1e-3)


@pytest.mark.parametrize("name,expected", [("llama2-13b", 7_823_360), ("llama2-70b", 25_886_720)])
def test_larger_models_use_real_shapes_not_paper_figures(name: str, expected: int) -> None:
    params = footprint(ModelShape.from_config(preset(name)), lora(2)).num_params
    assert params == expected
    assert abs(params - PAPER_TABLE1_LORA_R2[name]) > 1_000_000  # the paper's row does not match


def test_llama2_70b_grouped_query_shapes() -> None:
    shape = ModelShape.from_config(preset("llama2-70b"))
    per_layer = shape.projection_shapes()
    assert per_layer["q_proj"] == (8192, 8192)
    assert per_layer["k_proj"] == per_layer["v_proj"] == (8192, 1024)
    assert per_layer["o_proj"] == (8192, 8192)
    assert per_layer["gate_proj"] == per_layer["up_proj"] == (8192, 28672)
    assert per_layer["down_proj"] == (28672, 8192)
    paths = shape.linear_shapes()
    assert len(paths) == 80 * 7
    assert paths["model.layers.79.self_attn.k_proj"] == (8192, 1024)
    assert paths["model.layers.0.mlp.down_proj"] == (28672, 8192)


@pytest.mark.parametrize("name,expected", [("llama2-7b", 6_738_415_616), ("llama2-13b", 13_015_864_320),
                                           ("llama2-70b", 68_976_648_192), ("smollm2-135m", 134_515_008)])
def test_base_model_params_match_published_counts(name: str, expected: int) -> None:
    assert base_model_num_params(ModelShape.from_config(preset(name))) == expected


def test_base_model_bytes_ordering_and_fp32() -> None:
    fp32 = base_model_nbytes(LLAMA2_7B, "fp32")
    assert fp32 == 4 * base_model_num_params(LLAMA2_7B)
    sizes = [base_model_nbytes(LLAMA2_7B, d) for d in ("nf4", "int8", "bf16", "fp32")]
    assert sizes == sorted(sizes)
    assert 3.5 * GIB < sizes[0] < 4.2 * GIB  # the familiar "about 3.9 GB" of a 4-bit 7B


def test_quantized_linear_bytes_match_bitsandbytes() -> None:
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    weight = torch.randn(96, 200)  # (out, in); 19200 weights, not a multiple of the block
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    codes, row_scales, _ = bnb_functional.int8_vectorwise_quant(weight.to(torch.float16))
    nf4_real = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
    int8_real = codes.numel() * codes.element_size() + row_scales.numel() * row_scales.element_size()
    assert linear_weight_bytes(weight.numel(), 96, "nf4") == nf4_real
    assert linear_weight_bytes(weight.numel(), 96, "int8") == int8_real
    assert linear_weight_bytes(weight.numel(), 96, "bf16") == 2 * weight.numel()


def test_kv_bytes_per_token() -> None:
    assert kv_cache_bytes_per_token(LLAMA2_7B) == 512 * 1024  # 0.5 MiB per token at 16 bits
    assert kv_cache_bytes_per_token(ModelShape.from_config(preset("llama2-70b"))) == 2 * 80 * 8 * 128 * 2


def test_from_hf_config_object_equals_dict() -> None:
    from transformers import LlamaConfig
    fields = {k: v for k, v in MODEL_PRESETS["llama2-70b"].items() if k != "name_or_path"}
    assert ModelShape.from_config(LlamaConfig(**fields)) == ModelShape.from_config(fields)
    no_head_dim = {k: v for k, v in fields.items() if k not in ("head_dim", "num_key_value_heads")}
    derived = ModelShape.from_config(no_head_dim)
    assert (derived.head_dim, derived.num_key_value_heads) == (128, 64)


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(AccountingError, match="num_hidden_layers"):
        ModelShape.from_config({**preset("llama2-7b"), "num_hidden_layers": 0})
    with pytest.raises(AccountingError, match="hidden_size"):
        ModelShape.from_config({"intermediate_size": 5})
    with pytest.raises(AccountingError, match="dtype"):
        footprint(LLAMA2_7B, lora(2), dtype="int4")
    with pytest.raises(AccountingError, match="weight dtype"):
        base_model_nbytes(LLAMA2_7B, "fp8")
    with pytest.raises(ValueError, match="unshared_r"):
        AdapterVariant(8, 9, 7, 7)


tiny_shapes = st.builds(
    lambda h, inter, layers, kv, group, hd: ModelShape(h, inter, layers, kv * group, kv, hd),
    st.integers(1, 40), st.integers(1, 60), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3),
    st.integers(1, 16),
)
variants = st.integers(1, 12).flatmap(lambda r: st.builds(
    AdapterVariant, st.just(r), st.integers(0, r), st.integers(1, 9), st.integers(1, 9)))
target_sets = st.sets(st.sampled_from(ALL_TARGETS), min_size=1).map(lambda s: tuple(sorted(s)))


@settings(max_examples=60, deadline=None)
@given(shape=tiny_shapes, variant=variants, targets=target_sets)
def test_accounting_equals_real_compact_tensors(shape: ModelShape, variant: AdapterVariant,
                                                targets: tuple[str, ...]) -> None:
    config = variant.config(targets)
    real = 0
    for path, (h, o) in shape.linear_shapes().items():
        if path.rsplit(".", 1)[-1] in targets:
            spec = LayerSpec(h, o, variant.r, variant.unshared_r, variant.reduce_a, variant.reduce_b, 1.0)
            real += CompactLinearWeights.zeros(spec).num_params
    assert adapter_num_params(shape, config) == real
    assert footprint(shape, variant, "bf16", targets).nbytes == 2 * real


@given(memory=st.integers(-10**6, 10**15), per_adapter=st.integers(1, 10**10))
def test_capacity_is_floor_of_bytes_over_adapter_bytes(memory: int, per_adapter: int) -> None:
    fit = adapters_that_fit(memory, per_adapter)
    assert fit >= 0
    if memory >= 0:
        assert fit * per_adapter <= memory < (fit + 1) * per_adapter
    else:
        assert fit == 0


def test_capacity_rejects_empty_adapters() -> None:
    with pytest.raises(AccountingError):
        adapters_that_fit(100, 0)
