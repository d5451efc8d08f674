"""Files whose header was validated before load by checking only their values, and load to
exactly what the full validation gives; anything else takes the full path and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from prolora_serve.adapters.config import ProLoRAConfig
from prolora_serve.adapters.format import AdapterFormatError, load_adapter, save_adapter
from prolora_serve.adapters.known_headers import KnownHeaders
from prolora_serve.adapters.weights import CompactAdapter
from test_adapters_format import assert_same_adapter

# h and o not divisible by m or n; two layers of two modules
SHAPES = {f"model.layers.{i}.{block}.{name}": dims for i in range(2)
          for block, name, dims in (("self_attn", "q_proj", (26, 33)), ("mlp", "down_proj", (41, 17)))}
CONFIGS = {
    "prolora": dict(r=6, unshared_r=2, reduce_lora_A_x=4, reduce_lora_B_x=3),
    "u = 0": dict(r=4, unshared_r=0, reduce_lora_A_x=3, reduce_lora_B_x=5),
    "u = r": dict(r=3, unshared_r=3, reduce_lora_A_x=1, reduce_lora_B_x=1),
    "m = 1": dict(r=5, unshared_r=1, reduce_lora_A_x=1, reduce_lora_B_x=2),
    "plain LoRA": dict(r=4, unshared_r=4, reduce_lora_A_x=1, reduce_lora_B_x=1, peft_type="LORA"),
}


def adapter(kind: str, seed: int, dtype: torch.dtype = torch.float16) -> CompactAdapter:
    config = ProLoRAConfig(lora_alpha=8, target_modules=("q_proj", "down_proj"), **CONFIGS[kind])
    return CompactAdapter.random(config, SHAPES, torch.Generator().manual_seed(seed), dtype=dtype)


def write(tmp_path: Path, name: str, a: CompactAdapter) -> Path:
    path = tmp_path / f"{name}.safetensors"
    save_adapter(a, path, single_file=True)
    return path


def assert_same(loaded: CompactAdapter, expected: CompactAdapter) -> None:
    """Equal adapters, modules in the same order too (the pool lays them out in that order)."""
    assert_same_adapter(loaded, expected)
    assert list(loaded.modules) == list(expected.modules)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_a_second_file_with_a_known_header_loads_fast_and_equal(tmp_path: Path, kind: str,
                                                                dtype: torch.dtype) -> None:
    known = KnownHeaders(SHAPES)
    paths = [write(tmp_path, f"a{seed}", adapter(kind, seed, dtype)) for seed in range(4)]
    for path in paths:
        assert_same(known.load(path), load_adapter(path, SHAPES))
    assert (known.full_loads, known.fast_loads) == (1, 3)


def test_the_same_header_spelled_in_another_key_order_is_known(tmp_path: Path) -> None:
    known = KnownHeaders(SHAPES)
    known.load(write(tmp_path, "a", adapter("prolora", 0)))
    path = write(tmp_path, "b", adapter("prolora", 1))
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    header["__metadata__"] = dict(reversed(list(header["__metadata__"].items())))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (length - len(text))  # same length: the data section does not move
    assert len(text) == length
    path.write_bytes(data[:8] + text + data[8 + length:])
    assert_same(known.load(path), load_adapter(path, SHAPES))
    assert known.fast_loads == 1


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_value_in_a_known_file_is_refused_by_the_full_check(tmp_path: Path,
                                                                        value: float) -> None:
    known = KnownHeaders(SHAPES)
    known.load(write(tmp_path, "good", adapter("prolora", 0)))
    bad = adapter("prolora", 1)
    bad.modules["model.layers.1.mlp.down_proj"].Au[0, 3] = value
    path = write(tmp_path, "bad", bad)
    with pytest.raises(AdapterFormatError, match="down_proj.*NaN or Inf"):
        known.load(path)
    assert known.fast_loads == 0
    following = write(tmp_path, "next", adapter("prolora", 2))
    assert_same(known.load(following), load_adapter(following, SHAPES))  # still serving
    assert known.fast_loads == 1


def test_finite_values_whose_sum_overflows_still_load_fast(tmp_path: Path) -> None:
    """The fast path's finiteness check sums in float16 first: 60000s sum past 65504."""
    known = KnownHeaders(SHAPES)
    known.load(write(tmp_path, "good", adapter("prolora", 0)))
    large = adapter("prolora", 1)
    for weights in large.modules.values():
        for tensor in weights.tensors():
            tensor.fill_(60000.0)
    path = write(tmp_path, "large", large)
    assert_same(known.load(path), load_adapter(path, SHAPES))
    assert known.fast_loads == 1


def test_a_truncated_or_extended_file_with_a_known_header_takes_the_full_path(tmp_path: Path) -> None:
    known = KnownHeaders(SHAPES)
    known.load(write(tmp_path, "good", adapter("prolora", 0)))
    data = write(tmp_path, "other", adapter("prolora", 1)).read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-2])
    with pytest.raises(AdapterFormatError, match="corrupt or truncated"):
        known.load(cut)
    longer = tmp_path / "longer.safetensors"
    longer.write_bytes(data + b"\0\0")
    with pytest.raises(AdapterFormatError):
        known.load(longer)
    assert known.fast_loads == 0


def test_mixed_dtypes_always_take_the_full_path(tmp_path: Path) -> None:
    known = KnownHeaders(SHAPES)
    for seed in range(3):
        tensors = safetensors.torch.load_file(write(tmp_path, f"s{seed}", adapter("prolora", seed)))
        first = sorted(tensors)[0]
        tensors[first] = tensors[first].float()
        path = tmp_path / f"s{seed}.safetensors"
        metadata = safetensors.safe_open(path, "pt").metadata()
        safetensors.torch.save_file(tensors, path, metadata)
        assert_same(known.load(path), load_adapter(path, SHAPES))
    assert (known.full_loads, known.fast_loads) == (3, 0)


def test_other_base_shapes_are_checked_again(tmp_path: Path) -> None:
    """The memo belongs to one set of base shapes: a file that fits these may not fit others."""
    path = write(tmp_path, "a", adapter("prolora", 0))
    KnownHeaders(SHAPES).load(path)
    other = {**SHAPES, "model.layers.0.self_attn.q_proj": (26, 34)}
    with pytest.raises(AdapterFormatError, match="q_proj"):
        KnownHeaders(other).load(path)


def test_a_header_that_cannot_be_learned_is_remembered_as_such(tmp_path: Path, monkeypatch) -> None:
    """Mixed dtypes: the full path every time, but the header is worked out only once."""
    from prolora_serve.adapters import known_headers

    learned = []
    real = known_headers._structure_of
    monkeypatch.setattr(known_headers, "_structure_of", lambda *a: learned.append(1) or real(*a))
    known = KnownHeaders(SHAPES)
    tensors = safetensors.torch.load_file(write(tmp_path, "s", adapter("prolora", 0)))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].float()
    path = tmp_path / "s.safetensors"
    metadata = safetensors.safe_open(path, "pt").metadata()
    safetensors.torch.save_file(tensors, path, metadata)
    for _ in range(3):
        assert_same(known.load(path), load_adapter(path, SHAPES))
    assert (known.full_loads, known.fast_loads, len(learned)) == (3, 0, 1)
