"""Dense LoRA import (compress) and export, checked against PEFT itself on a tiny LLaMA."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from prolora_serve.adapters.config import AdapterConfigError, ProLoRAConfig
from prolora_serve.adapters.dense import delta_weight, materialize
from prolora_serve.adapters.factory import random_adapter
from prolora_serve.adapters.format import (CONFIG_NAME, WEIGHTS_NAME, AdapterFormatError,
                                           load_adapter, save_adapter)
from prolora_serve.adapters.peft_io import compress_dense_adapter, dense_state_dict, export_dense
from prolora_serve.adapters.weights import CompactAdapter, CompactLinearWeights
from test_adapters_format import recorded_dims, strip_recorded_dims

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def linear_shapes(tiny_llama) -> dict[str, tuple[int, int]]:
    return {name: (module.in_features, module.out_features)
            for name, module in tiny_llama.named_modules()
            if isinstance(module, torch.nn.Linear) and ".layers." in name}


def prolora_config(**overrides) -> ProLoRAConfig:
    fields = dict(r=6, unshared_r=1, reduce_lora_A_x=3, reduce_lora_B_x=5, lora_alpha=12,
                  target_modules=PROJECTIONS)
    fields.update(overrides)
    return ProLoRAConfig(**fields)


def merged_reference(base: torch.nn.Module, adapter: CompactAdapter) -> torch.nn.Module:
    """The base model with ``delta_weight`` added to every adapted linear (float64 math)."""
    merged = copy.deepcopy(base)
    for path, weights in adapter.modules.items():
        linear = merged.get_submodule(path)
        delta = delta_weight(weights.to(dtype=torch.float64))
        linear.weight.data = (linear.weight.data.double() + delta).float()
    return merged


def logits(model: torch.nn.Module) -> torch.Tensor:
    input_ids = torch.arange(3, 27).reshape(2, 12) % 128
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def lora_view(adapter: CompactAdapter) -> CompactAdapter:
    """The same adapter held as dense PEFT LoRA (u = r): what a training run would save."""
    config = ProLoRAConfig.from_json_dict({**adapter.config.to_json_dict(), "peft_type": "LORA"})
    modules = {}
    for path, weights in adapter.modules.items():
        dense_a, dense_b = materialize(weights)
        spec = config.layer_spec(path, weights.spec.in_features, weights.spec.out_features)
        shapes = spec.tensor_shapes()
        empty_a0 = torch.zeros(shapes["prolora_A0"], dtype=dense_a.dtype)
        empty_b0 = torch.zeros(shapes["prolora_B0"], dtype=dense_b.dtype)
        modules[path] = CompactLinearWeights(spec, empty_a0, empty_b0, dense_a, dense_b)
    return CompactAdapter(config, modules)


def test_peft_saved_lora_loads_with_peft_scaling(tiny_llama, linear_shapes, tmp_path):
    lora_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                  rank_pattern={"down_proj": 2}, init_lora_weights=False)
    model = peft.get_peft_model(copy.deepcopy(tiny_llama), lora_config)
    model.save_pretrained(tmp_path / "peft")
    adapter = load_adapter(tmp_path / "peft", linear_shapes)
    assert len(adapter.modules) == 6
    for path, weights in adapter.modules.items():
        layer = model.base_model.model.get_submodule(path)
        assert weights.spec.unshared_r == weights.spec.r == layer.r["default"]
        assert torch.equal(weights.Au, layer.lora_A["default"].weight)
        assert torch.equal(weights.Bu, layer.lora_B["default"].weight)
        torch.testing.assert_close(delta_weight(weights), layer.get_delta_weight("default"))


def test_export_dense_matches_peft_logits_and_merge(tiny_llama, linear_shapes, tmp_path):
    config = prolora_config(rank_pattern={"down_proj": 4}, alpha_pattern={"v_proj": 3.0})
    adapter = random_adapter(config, linear_shapes, seed=5, b_std=0.5)
    export_dense(adapter, tmp_path / "dense")
    saved = json.loads((tmp_path / "dense" / CONFIG_NAME).read_text())
    assert (saved["peft_type"], saved["r"], saved["lora_alpha"]) == ("LORA", 6, 12)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_llama), tmp_path / "dense").eval()
    reference = logits(merged_reference(tiny_llama, adapter))
    assert (reference - logits(tiny_llama)).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(logits(peft_model), reference, rtol=1e-4, atol=1e-4)
    merged = peft_model.merge_and_unload()
    for path, weights in adapter.modules.items():
        expected = tiny_llama.get_submodule(path).weight.double() + delta_weight(weights.to(dtype=torch.float64))
        torch.testing.assert_close(merged.get_submodule(path).weight.double(), expected,
                                   rtol=1e-5, atol=1e-6)


def test_compress_recovers_exported_adapter(linear_shapes, tmp_path):
    adapter = random_adapter(prolora_config(), linear_shapes, seed=2)
    export_dense(adapter, tmp_path / "dense")
    compact, deviation = compress_dense_adapter(tmp_path / "dense", 1, 3, 5, linear_shapes=linear_shapes)
    assert deviation < 1e-6
    assert compact.config.peft_type == "PROLORA" and compact.num_params == adapter.num_params
    for path, weights in adapter.modules.items():
        assert compact.modules[path].spec == weights.spec
        for got, want in zip(compact.modules[path].tensors(), weights.tensors()):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 30), o=st.integers(1, 30), r=st.integers(1, 8), u=st.integers(0, 8),
       m=st.integers(1, 7), n=st.integers(1, 7))
@example(h=10, o=11, r=4, u=0, m=3, n=5)  # u = 0, dims not multiples of m, n
@example(h=10, o=11, r=4, u=4, m=3, n=5)  # u = r
@example(h=24, o=36, r=8, u=2, m=1, n=6)  # m = 1
@example(h=5, o=3, r=8, u=1, m=7, n=7)  # more chunks than columns
def test_compress_round_trip_random_specs(h, o, r, u, m, n):
    u = min(u, r)
    config = ProLoRAConfig(r=r, unshared_r=u, reduce_lora_A_x=m, reduce_lora_B_x=n,
                           lora_alpha=2 * r, target_modules=("q_proj",))
    adapter = random_adapter(config, {"model.layers.0.self_attn.q_proj": (h, o)},
                             seed=h + 31 * o, dtype=torch.float64)
    compact, deviation = compress_dense_adapter(lora_view(adapter), u, m, n, tolerance=1e-12)
    assert deviation <= 1e-12
    for got, want in zip(compact.modules["model.layers.0.self_attn.q_proj"].tensors(),
                         adapter.modules["model.layers.0.self_attn.q_proj"].tensors()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-14)


def test_unstructured_dense_weights_are_refused(linear_shapes, tmp_path):
    config = ProLoRAConfig(r=4, unshared_r=4, reduce_lora_A_x=1, reduce_lora_B_x=1, lora_alpha=8,
                           target_modules=PROJECTIONS, peft_type="LORA")
    export_dense(random_adapter(config, linear_shapes, seed=1), tmp_path / "plain")
    with pytest.raises(AdapterFormatError, match=r"lora_[AB]\.weight.*does not have the PRoLoRA"):
        compress_dense_adapter(tmp_path / "plain", 1, 2, 2)


def test_refusal_names_the_worst_module_and_small_noise_passes(linear_shapes):
    dense = lora_view(random_adapter(prolora_config(), linear_shapes, seed=4))
    worst = "model.layers.1.mlp.up_proj"
    dense.modules[worst].Au[0, -1] += 0.05  # breaks the shared structure of dense A
    with pytest.raises(AdapterFormatError, match=worst.replace(".", r"\.") + r"\.lora_A\.weight"):
        compress_dense_adapter(dense, 1, 3, 5)
    noisy = lora_view(random_adapter(prolora_config(), linear_shapes, seed=4))
    noisy.modules[worst].Bu.mul_(1 + 1e-6)  # rounding-level change keeps the structure
    _, deviation = compress_dense_adapter(noisy, 1, 3, 5, tolerance=1e-4)
    assert deviation < 1e-4


def test_compress_rejects_unshared_rank_above_rank(linear_shapes):
    dense = lora_view(random_adapter(prolora_config(rank_pattern={"q_proj": 2}), linear_shapes))
    with pytest.raises(AdapterConfigError, match="q_proj.*unshared_r"):
        compress_dense_adapter(dense, 3, 3, 5)


def test_dense_state_dict_keeps_dtype_and_peft_keys(linear_shapes):
    adapter = random_adapter(prolora_config(), linear_shapes, dtype=torch.bfloat16)
    tensors = dense_state_dict(adapter)
    path = "model.layers.0.self_attn.k_proj"
    dense_a = tensors[f"base_model.model.{path}.lora_A.weight"]
    dense_b = tensors[f"base_model.model.{path}.lora_B.weight"]
    h, o = linear_shapes[path]
    assert dense_a.shape == (6, h) and dense_b.shape == (o, 6)
    assert dense_a.dtype == dense_b.dtype == torch.bfloat16
    assert len(tensors) == 2 * len(adapter.modules)



# ---- u = 0 on dims that m and n do not divide: the file records h and o -------------------
# SmolLM2-like attention (h = 576, 9 heads of 64, 3 KV heads: k/v project to 192), one layer;
# m = 7 and n = 5 divide none of 576, 192, 100. A0/B0 alone would allow h up to 581 and o up
# to 580: an exporter that guessed from them would write padded lora_A / lora_B.
U0 = dict(r=6, unshared_r=0, reduce_lora_A_x=7, reduce_lora_B_x=5, lora_alpha=12,
          rank_pattern={"k_proj": 3, "down_proj": 12})  # strides 1 and 2 as well as 1


@pytest.fixture(scope="module")
def gqa_base_dir(tmp_path_factory) -> Path:
    config = transformers.LlamaConfig(hidden_size=576, intermediate_size=100, num_hidden_layers=1,
                                      num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                                      vocab_size=16)
    directory = tmp_path_factory.mktemp("gqa_base")
    config.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def gqa_shapes(gqa_base_dir) -> dict[str, tuple[int, int]]:
    """(in, out) of every decoder linear, read off the instantiated Hugging Face model."""
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_pretrained(gqa_base_dir))
    return {name: (module.in_features, module.out_features)
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and ".layers." in name}


def dense_reference(weights: CompactLinearWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense A (r, h) and B (o, r) in float64, element by element as
    docs/prolora-math.md#dense-form writes them."""
    spec = weights.spec
    shared, h, o = spec.shared_r, spec.in_features, spec.out_features
    a0, b0 = weights.A0.double().tolist(), weights.B0.double().tolist()
    dense_a = [[a0[(k + (col // spec.chunk_a) * spec.stride_a) % shared][col % spec.chunk_a]
                for col in range(h)] for k in range(shared)]
    dense_b = [[b0[row % spec.chunk_b][(k + (row // spec.chunk_b) * spec.stride_b) % shared]
                for k in range(shared)] for row in range(o)]
    shared_a = torch.tensor(dense_a, dtype=torch.float64).reshape(shared, h)
    shared_b = torch.tensor(dense_b, dtype=torch.float64).reshape(o, shared)
    return torch.cat([shared_a, weights.Au.double()]), torch.cat([shared_b, weights.Bu.double()], 1)


def test_model_dir_shapes_follow_gqa_and_head_dim(gqa_base_dir, gqa_shapes):
    from prolora_serve.adapters.accounting import ModelShape

    assert gqa_shapes["model.layers.0.self_attn.q_proj"] == (576, 576)
    assert gqa_shapes["model.layers.0.self_attn.k_proj"] == (576, 192)
    assert ModelShape.from_model_dir(gqa_base_dir).linear_shapes() == gqa_shapes


@pytest.mark.parametrize("single_file", [False, True])
@pytest.mark.parametrize("dims_from", ["file", "base model"])
def test_u0_export_dense_is_exact_and_equals_the_float64_reference(gqa_shapes, tmp_path,
                                                                   single_file, dims_from):
    adapter = random_adapter(prolora_config(**U0), gqa_shapes, seed=9, b_std=0.5)
    src = tmp_path / ("a.safetensors" if single_file else "a")
    save_adapter(adapter, src, single_file=single_file)
    if dims_from == "base model":
        strip_recorded_dims(src)
    loaded = load_adapter(src, gqa_shapes if dims_from == "base model" else None)
    dst = tmp_path / ("dense.safetensors" if single_file else "dense")
    export_dense(loaded, dst, single_file=single_file)
    tensors = safetensors.torch.load_file(str(dst / WEIGHTS_NAME if not single_file else dst))
    assert len(tensors) == 2 * len(gqa_shapes) == 14
    for path, (h, o) in gqa_shapes.items():
        weights = adapter.modules[path]
        dense_a = tensors[f"base_model.model.{path}.lora_A.weight"]
        dense_b = tensors[f"base_model.model.{path}.lora_B.weight"]
        assert dense_a.shape == (weights.spec.r, h) and dense_b.shape == (o, weights.spec.r)
        reference_a, reference_b = dense_reference(weights)
        assert torch.equal(dense_a.double(), reference_a)
        assert torch.equal(dense_b.double(), reference_b)
        expected_delta = weights.spec.scale * reference_b @ reference_a
        torch.testing.assert_close(weights.spec.scale * dense_b.double() @ dense_a.double(),
                                   expected_delta, rtol=0, atol=1e-12)
    assert recorded_dims(dst) == {path: list(dims) for path, dims in gqa_shapes.items()}
    assert load_adapter(dst).linear_shapes() == gqa_shapes


@pytest.mark.parametrize("single_file", [False, True])
def test_u0_without_recorded_dims_or_base_model_is_refused(gqa_shapes, tmp_path, single_file):
    src = tmp_path / ("a.safetensors" if single_file else "a")
    adapter = random_adapter(prolora_config(**U0), gqa_shapes, seed=1)
    save_adapter(adapter, src, single_file=single_file)
    strip_recorded_dims(src)
    with pytest.raises(AdapterFormatError) as caught:
        load_adapter(src)
    message = str(caught.value)
    assert "dimensions unknown for 7 module(s)" in message and "(and 4 more module(s))" in message
    # sorted: down_proj (in 100, out 576) is named first
    assert ("'model.layers.0.mlp.down_proj' in_features unknown (ceil(h/7) = 15: h is 99..105), "
            "out_features unknown (ceil(o/5) = 116: o is 576..580)") in message
    assert "--base-model" in message


@pytest.mark.parametrize("single_file", [False, True])
def test_u0_compress_round_trip_keeps_the_dims(gqa_shapes, tmp_path, single_file):
    adapter = random_adapter(prolora_config(**U0), gqa_shapes, seed=4)
    suffix = ".safetensors" if single_file else ""
    save_adapter(adapter, tmp_path / f"a{suffix}", single_file=single_file)
    export_dense(load_adapter(tmp_path / f"a{suffix}"), tmp_path / f"dense{suffix}", single_file)
    compact, deviation = compress_dense_adapter(tmp_path / f"dense{suffix}", 0, 7, 5)
    assert deviation < 1e-6 and compact.linear_shapes() == gqa_shapes
    save_adapter(compact, tmp_path / f"back{suffix}", single_file=single_file)
    assert recorded_dims(tmp_path / f"back{suffix}") == {p: list(d) for p, d in gqa_shapes.items()}
    back = load_adapter(tmp_path / f"back{suffix}")
    for path, weights in adapter.modules.items():
        assert back.modules[path].spec == weights.spec
        for got, want in zip(back.modules[path].tensors(), weights.tensors()):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
