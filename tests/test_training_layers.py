"""ProLoRALinear against the float64 dense reference: forward, gradients, initialization, swap."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from conftest import build_tiny_llama
from prolora_serve.adapters.config import LayerSpec, ProLoRAConfig
from prolora_serve.adapters.dense import apply_dense, materialize
from prolora_serve.adapters.weights import CompactLinearWeights
from prolora_serve.server.training.inject import (attach_adapter, detach_adapters, extract_adapter,
                                                  inject_prolora)
from prolora_serve.server.training.layers import ProLoRALinear

F64 = torch.float64
AWKWARD = [  # (h, o, r, u, m, n): h, o not divisible by m, n; u = 0; u = r; m = 1; m > h
    (24, 36, 8, 2, 4, 6), (576, 192, 8, 1, 7, 7), (576, 1536, 16, 0, 3, 5), (10, 10, 4, 4, 2, 2),
    (13, 11, 5, 0, 3, 4), (7, 5, 3, 1, 1, 1), (3, 9, 6, 2, 5, 2), (1, 1, 1, 0, 1, 1),
]
ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_layer(spec: LayerSpec, seed: int = 0) -> tuple[ProLoRALinear, CompactLinearWeights]:
    generator = torch.Generator().manual_seed(seed)
    base = nn.Linear(spec.in_features, spec.out_features, dtype=F64)
    layer = ProLoRALinear(base, spec, dtype=F64)
    weights = CompactLinearWeights.random(spec, generator, dtype=F64)
    layer.load_compact_weights(weights)
    return layer, weights


@pytest.mark.parametrize("shape", AWKWARD)
def test_forward_equals_dense_reference(shape):
    spec = LayerSpec(*shape, alpha=16.0)
    layer, weights = random_layer(spec)
    x = torch.randn(3, 5, spec.in_features, dtype=F64)
    expected = layer.base(x) + apply_dense(weights, x)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 40), o=st.integers(1, 40), r=st.integers(1, 9), data=st.data())
def test_forward_equals_dense_reference_random_shapes(h, o, r, data):
    u = data.draw(st.integers(0, r))
    m, n = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    spec = LayerSpec(h, o, r, u, m, n, alpha=data.draw(st.sampled_from([1.0, 16.0, 7.5])))
    layer, weights = random_layer(spec, seed=h * 1000 + o)
    x = torch.randn(4, h, dtype=F64)
    torch.testing.assert_close(layer.adapter_delta(x), apply_dense(weights, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", AWKWARD[:5])
def test_gradients_equal_dense_reference(shape):
    """Autograd through the compact apply equals autograd through the dense materialization."""
    spec = LayerSpec(*shape, alpha=8.0)
    layer, weights = random_layer(spec, seed=3)
    x = torch.randn(6, spec.in_features, dtype=F64)
    probe = torch.randn(6, spec.out_features, dtype=F64)
    (layer.adapter_delta(x) * probe).sum().backward()
    leaves = [t.clone().requires_grad_(True) for t in weights.tensors()]
    dense_a, dense_b = materialize(CompactLinearWeights(spec, *leaves))
    (spec.scale * (x @ dense_a.T) @ dense_b.T * probe).sum().backward()
    for name, leaf in zip(("prolora_A0", "prolora_B0", "prolora_Au", "prolora_Bu"), leaves):
        if leaf.numel() == 0:  # u = 0: the empty unshared tensors take no part
            continue
        torch.testing.assert_close(getattr(layer, name).grad, leaf.grad, rtol=1e-10, atol=1e-10)


def test_rectified_initialization_uses_full_in_dimension():
    h, o = 1536, 576
    spec = LayerSpec(h, o, r=64, unshared_r=8, reduce_a=7, reduce_b=7, alpha=16.0)
    torch.manual_seed(0)
    layer = ProLoRALinear(nn.Linear(h, o), spec)
    bound = 1.0 / math.sqrt(h)  # the chunk's own fan-in would give 1/sqrt(ceil(h/7)), 2.6x larger
    for name in ("prolora_A0", "prolora_Au"):
        values = getattr(layer, name).detach()
        assert values.abs().max() <= bound
        assert values.abs().max() > 0.99 * bound
        assert abs(values.mean().item()) < 0.02 * bound
        assert values.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)
    assert not layer.prolora_B0.any() and not layer.prolora_Bu.any()
    x = torch.randn(2, h)
    torch.testing.assert_close(layer(x), layer.base(x))  # B = 0: the adapter starts as a no-op


def test_dropout_only_in_training_mode():
    spec = LayerSpec(32, 16, 4, 1, 2, 2, alpha=4.0)
    layer, weights = random_layer(spec)
    layer.dropout = nn.Dropout(0.5)
    x = torch.randn(8, 32, dtype=F64)
    layer.eval()
    torch.testing.assert_close(layer(x), layer.base(x) + apply_dense(weights, x))
    layer.train()
    assert not torch.allclose(layer(x), layer.base(x) + apply_dense(weights, x))


def test_invalid_dropout_is_rejected():
    with pytest.raises(ValueError, match="dropout"):
        ProLoRALinear(nn.Linear(4, 4), LayerSpec(4, 4, 2, 1, 1, 1, 2.0), dropout=1.0)


def tiny_config(**overrides) -> ProLoRAConfig:
    values = dict(r=4, unshared_r=1, reduce_lora_A_x=3, reduce_lora_B_x=5, lora_alpha=8.0,
                  target_modules=ALL_LINEARS)
    return ProLoRAConfig(**{**values, **overrides})


def test_injection_swaps_every_target_and_freezes_the_base():
    model = build_tiny_llama(vocab_size=50)
    layers = inject_prolora(model, tiny_config())
    assert sorted(layers) == sorted(f"model.layers.{i}.{kind}.{name}" for i in range(2)
                                    for kind, names in (("self_attn", ALL_LINEARS[:4]),
                                                        ("mlp", ALL_LINEARS[4:]))
                                    for name in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{path}.{t}" for path in layers
                         for t in ("prolora_A0", "prolora_B0", "prolora_Au", "prolora_Bu")}
    assert layers["model.layers.0.self_attn.k_proj"].spec.out_features == 32  # 2 kv heads x 16


def test_gradient_reaches_only_the_four_compact_tensors():
    model = build_tiny_llama(vocab_size=50)
    layers = inject_prolora(model, tiny_config(), dropout=0.1)
    for layer in layers.values():  # B = 0 at init would zero A's gradient; make it flow
        nn.init.normal_(layer.prolora_B0)
        nn.init.normal_(layer.prolora_Bu)
    model.train()
    ids = torch.randint(0, 50, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    for name, parameter in model.named_parameters():
        if name.rsplit(".", 1)[-1].startswith("prolora_"):
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name


def test_target_modules_that_match_nothing_are_rejected():
    with pytest.raises(ValueError, match="target_modules"):
        inject_prolora(build_tiny_llama(vocab_size=50), tiny_config(target_modules=("qkv",)))


def test_extract_attach_and_detach_round_trip():
    trained = build_tiny_llama(vocab_size=50, seed=1)
    for layer in inject_prolora(trained, tiny_config(target_modules=("q_proj", "down_proj"))).values():
        nn.init.normal_(layer.prolora_B0)
        nn.init.normal_(layer.prolora_Bu)
    adapter = extract_adapter(trained, tiny_config(target_modules=("q_proj", "down_proj")))
    assert adapter.num_params == sum(p.numel() for p in trained.parameters() if p.requires_grad)
    fresh = build_tiny_llama(vocab_size=50, seed=1)
    ids = torch.randint(0, 50, (1, 7))
    base_logits = fresh(input_ids=ids).logits
    attach_adapter(fresh, adapter)
    torch.testing.assert_close(fresh(input_ids=ids).logits, trained(input_ids=ids).logits)
    assert not torch.allclose(fresh(input_ids=ids).logits, base_logits)
    detach_adapters(fresh)
    torch.testing.assert_close(fresh(input_ids=ids).logits, base_logits)


def test_plain_lora_config_has_no_shared_part():
    model = build_tiny_llama(vocab_size=50)
    config = tiny_config(peft_type="LORA", unshared_r=4, reduce_lora_A_x=1, reduce_lora_B_x=1)
    layer = inject_prolora(model, config)["model.layers.1.mlp.up_proj"]
    assert layer.prolora_A0.numel() == 0 and layer.prolora_B0.numel() == 0
    assert layer.prolora_Au.shape == (4, 64) and layer.prolora_Bu.shape == (96, 4)
