"""The on-disk adapter registry: validated, atomic, persisted, thread-safe."""

from __future__ import annotations

import io
import json
import logging
import pickle
import threading
from pathlib import Path

import pytest
import torch

from prolora_serve.adapters.config import ProLoRAConfig
from prolora_serve.adapters.factory import random_adapter
from prolora_serve.adapters.format import adapter_to_bytes, save_adapter
from prolora_serve.adapters.registry import (AdapterNotFoundError, AdapterRegistry,
                                             DuplicateAdapterError, InvalidAdapterError,
                                             InvalidAdapterIdError, UploadTooLargeError)

# A small base: two layers, awkward sizes (not divisible by the sharing ratios).
SHAPES = {f"model.layers.{i}.{name}": dims for i in range(2) for name, dims in (
    ("self_attn.q_proj", (40, 40)), ("self_attn.v_proj", (40, 12)), ("mlp.down_proj", (70, 40)))}
OTHER_SHAPES = {path: (h + 8, o) for path, (h, o) in SHAPES.items()}
PROLORA = ProLoRAConfig(r=8, unshared_r=2, reduce_lora_A_x=3, reduce_lora_B_x=4, lora_alpha=16,
                        target_modules=("q_proj", "v_proj", "down_proj"))
LORA = ProLoRAConfig(r=4, unshared_r=4, reduce_lora_A_x=1, reduce_lora_B_x=1, lora_alpha=8,
                     target_modules=("q_proj",), peft_type="LORA")


def adapter_bytes(config: ProLoRAConfig = PROLORA, shapes=SHAPES, seed: int = 0) -> bytes:
    return adapter_to_bytes(random_adapter(config, shapes, seed=seed))


def stored_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name != ".staging")


@pytest.fixture
def registry(tmp_path: Path) -> AdapterRegistry:
    return AdapterRegistry(tmp_path / "store", SHAPES, max_upload_bytes=1 << 20)


def assert_same_weights(a, b) -> None:
    assert a.modules.keys() == b.modules.keys()
    for path in a.modules:
        for x, y in zip(a.modules[path].tensors(), b.modules[path].tensors()):
            assert torch.equal(x, y)


def test_single_file_upload_is_stored_indexed_and_loads_back(registry: AdapterRegistry) -> None:
    original = random_adapter(PROLORA, SHAPES, seed=3)
    record = registry.register_upload("a-1", file=io.BytesIO(adapter_to_bytes(original)))
    assert record.adapter_id == "a-1" and record.num_params == original.num_params
    assert record.nbytes == original.nbytes and record.stored_bytes > record.nbytes
    assert record.config["unshared_r"] == 2 and registry.has_adapter("a-1")
    assert [r.adapter_id for r in registry.list()] == ["a-1"]
    assert stored_files(registry.root) == ["a-1.json", "a-1.safetensors"]
    assert_same_weights(registry.load_adapter("a-1"), original)


def test_peft_style_pair_and_plain_lora(registry: AdapterRegistry, tmp_path: Path) -> None:
    lora = random_adapter(LORA, SHAPES, seed=1)
    save_adapter(lora, tmp_path / "lora_dir")
    with open(tmp_path / "lora_dir/adapter_config.json", "rb") as config, \
            open(tmp_path / "lora_dir/adapter_model.safetensors", "rb") as weights:
        record = registry.register_upload("lora", config=config, weights=weights)
    assert record.config["peft_type"] == "LORA"
    assert record.num_params == 2 * 4 * (40 + 40)  # q_proj in both layers, r*(h+o)
    assert_same_weights(registry.load_adapter("lora"), lora)


def test_restart_reloads_the_index(tmp_path: Path) -> None:
    first = AdapterRegistry(tmp_path, SHAPES)
    for i in range(3):
        first.register_upload(f"ad{i}", file=io.BytesIO(adapter_bytes(seed=i)))
    second = AdapterRegistry(tmp_path, SHAPES)
    assert [r for r in second.list()] == first.list()
    assert_same_weights(second.load_adapter("ad2"), first.load_adapter("ad2"))


def test_restart_skips_damaged_and_foreign_files(tmp_path: Path, caplog) -> None:
    first = AdapterRegistry(tmp_path, SHAPES)
    for name in ("good", "truncated", "no-config"):
        first.register_upload(name, file=io.BytesIO(adapter_bytes()))
    data = (tmp_path / "truncated.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "no-config.json").write_text("{not json")
    (tmp_path / "hand-placed.safetensors").write_bytes(adapter_bytes(seed=9))
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 100)
    with caplog.at_level(logging.WARNING):
        second = AdapterRegistry(tmp_path, SHAPES)
    assert sorted(r.adapter_id for r in second.list()) == ["good", "hand-placed"]
    assert "truncated" in caplog.text and "garbage" in caplog.text
    assert (tmp_path / "hand-placed.json").exists()  # indexed once, cheap next time
    # A store written for another base model is not served by this one.
    assert len(AdapterRegistry(tmp_path, OTHER_SHAPES)) == 0


@pytest.mark.parametrize("bad_id", ["", ".", "..", "../x", "a/b", "a\\b", "x" * 65, "a b", "é", None])
def test_invalid_ids_are_refused(registry: AdapterRegistry, bad_id) -> None:
    with pytest.raises(InvalidAdapterIdError):
        registry.register_upload(bad_id, file=io.BytesIO(adapter_bytes()))
    assert stored_files(registry.root) == []


def test_duplicate_id_is_refused_and_the_first_kept(registry: AdapterRegistry) -> None:
    registry.register_upload("dup", file=io.BytesIO(adapter_bytes(seed=1)))
    before = (registry.root / "dup.safetensors").read_bytes()
    with pytest.raises(DuplicateAdapterError):
        registry.register_upload("dup", file=io.BytesIO(adapter_bytes(seed=2)))
    assert (registry.root / "dup.safetensors").read_bytes() == before


def test_oversize_upload_is_refused(tmp_path: Path) -> None:
    data = adapter_bytes()
    small = AdapterRegistry(tmp_path, SHAPES, max_upload_bytes=len(data) - 1)
    with pytest.raises(UploadTooLargeError):
        small.register_upload("big", file=io.BytesIO(data))
    assert stored_files(tmp_path) == [] and list((tmp_path / ".staging").iterdir()) == []


def _nan_upload() -> bytes:
    adapter = random_adapter(PROLORA, SHAPES)
    next(iter(adapter.modules.values())).B0[0, 0] = float("nan")
    return adapter_to_bytes(adapter)


def _unknown_module_upload() -> bytes:
    shapes = {**SHAPES, "model.layers.0.mlp.gate_proj": (40, 70)}
    config = ProLoRAConfig(**{**PROLORA.__dict__, "target_modules": ("q_proj", "gate_proj")})
    return adapter_to_bytes(random_adapter(config, shapes))


@pytest.mark.parametrize("make_bytes", [
    lambda: adapter_bytes()[:-100],  # truncated
    lambda: adapter_bytes(shapes=OTHER_SHAPES),  # made for another base model
    _nan_upload,
    _unknown_module_upload,
    lambda: pickle.dumps({"base_model.model.x.lora_A.weight": [1.0]}),
    lambda: b"",
], ids=["truncated", "wrong-shapes", "nan", "unknown-module", "pickle", "empty"])
def test_bad_uploads_are_refused_and_leave_nothing(registry: AdapterRegistry, make_bytes) -> None:
    registry.register_upload("keep", file=io.BytesIO(adapter_bytes()))
    with pytest.raises(InvalidAdapterError):
        registry.register_upload("bad", file=io.BytesIO(make_bytes()))
    assert stored_files(registry.root) == ["keep.json", "keep.safetensors"]
    assert [r.adapter_id for r in registry.list()] == ["keep"]


def test_upload_needs_exactly_one_form(registry: AdapterRegistry) -> None:
    with pytest.raises(InvalidAdapterError):
        registry.register_upload("x")
    with pytest.raises(InvalidAdapterError):
        registry.register_upload("x", config=io.BytesIO(b"{}"))
    with pytest.raises(InvalidAdapterError):
        registry.register_upload("x", file=io.BytesIO(adapter_bytes()), weights=io.BytesIO(b""))


def test_delete_removes_files_and_entry(registry: AdapterRegistry) -> None:
    registry.register_upload("gone", file=io.BytesIO(adapter_bytes()))
    record = registry.delete("gone")
    assert record.adapter_id == "gone" and not registry.has_adapter("gone")
    assert stored_files(registry.root) == []
    for call in (registry.get, registry.load_adapter, registry.delete):
        with pytest.raises(AdapterNotFoundError):
            call("gone")
    registry.register_upload("gone", file=io.BytesIO(adapter_bytes(seed=5)))  # the id is free again


def test_register_directory_registers_each_adapter_once(registry: AdapterRegistry, tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    save_adapter(random_adapter(PROLORA, SHAPES, seed=1), demo / "dir-form")
    save_adapter(random_adapter(LORA, SHAPES, seed=2), demo / "file-form.safetensors", single_file=True)
    (demo / "broken.safetensors").write_bytes(b"junk")
    (demo / "notes.txt").write_text("not an adapter")
    assert registry.register_directory(demo) == ["dir-form", "file-form"]
    assert registry.register_directory(demo) == []  # present ids are skipped
    with pytest.raises(FileNotFoundError):
        registry.register_directory(tmp_path / "missing")


def test_concurrent_uploads_of_one_id_have_one_winner(registry: AdapterRegistry) -> None:
    data = [adapter_bytes(seed=i) for i in range(4)]
    outcomes: list[str] = []

    def upload(blob: bytes) -> None:
        try:
            registry.register_upload("race", file=io.BytesIO(blob))
            outcomes.append("ok")
        except DuplicateAdapterError:
            outcomes.append("duplicate")

    threads = [threading.Thread(target=upload, args=(blob,)) for blob in data]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["duplicate"] * 3 + ["ok"]
    stored = json.loads((registry.root / "race.json").read_text())
    assert stored["stored_bytes"] == (registry.root / "race.safetensors").stat().st_size


def test_restart_indexes_many_adapters_from_headers_only(tmp_path: Path, monkeypatch) -> None:
    import prolora_serve.adapters.format as adapter_format

    first = AdapterRegistry(tmp_path, SHAPES)
    template = first.register_upload("t", file=io.BytesIO(adapter_bytes()))
    weights = (tmp_path / "t.safetensors").read_bytes()
    for i in range(300):
        (tmp_path / f"copy-{i}.safetensors").write_bytes(weights)
        record = {**template.to_json(), "adapter_id": f"copy-{i}"}
        (tmp_path / f"copy-{i}.json").write_text(json.dumps(record))

    def no_tensor_reads(*args, **kwargs):
        raise AssertionError("restart must not read tensor data")

    monkeypatch.setattr(adapter_format, "load_adapter", no_tensor_reads)
    second = AdapterRegistry(tmp_path, SHAPES)
    assert len(second) == 301 and second.get("copy-299").num_params == template.num_params
