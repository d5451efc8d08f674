"""The on-disk adapter registry: validated, atomic, persisted, thread-safe."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
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
    """The adapter files (not .staging, .pending or the index)."""
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("."))


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


# --- the index beside the files: consistency, rebuilds, kill -9, pagination ---------------------
def registry_with(root: Path, ids, config: ProLoRAConfig = PROLORA) -> AdapterRegistry:
    registry = AdapterRegistry(root, SHAPES)
    for seed, adapter_id in enumerate(ids):
        registry.register_upload(adapter_id, file=io.BytesIO(adapter_bytes(config, seed=seed)))
    return registry


def listed(registry: AdapterRegistry) -> list[str]:
    return [r.adapter_id for r in registry.list()]


def no_reads(monkeypatch) -> None:
    """Fail on any header or tensor read."""
    import prolora_serve.adapters.format as adapter_format
    import prolora_serve.adapters.registry as registry_module

    def refuse(*args, **kwargs):
        raise AssertionError("a consistent index must not read adapter files")

    monkeypatch.setattr(adapter_format, "load_adapter", refuse)
    monkeypatch.setattr(registry_module, "_read_header", refuse)


def test_reopening_with_a_consistent_index_reads_no_adapter_file(tmp_path: Path, monkeypatch) -> None:
    first = registry_with(tmp_path, ["b", "a", "c"])
    assert first.index_path.is_file() and first.index_path.name.startswith(".index-")
    no_reads(monkeypatch)
    second = AdapterRegistry(tmp_path, SHAPES)
    assert listed(second) == ["a", "b", "c"] and second.list() == first.list()
    report = second.open_report
    assert (report.index_created, report.reread, report.dropped, report.adapters) == (False, 0, 0, 3)
    assert second.get("b") == first.get("b") and "c" in second and len(second) == 3


@pytest.mark.parametrize("damage", ["deleted", "garbage", "other-schema", "no-table"])
def test_a_missing_or_unreadable_index_is_rebuilt_from_the_files(tmp_path: Path, damage: str,
                                                                   caplog) -> None:
    first = registry_with(tmp_path, ["x", "y"])
    records, path = first.list(), first.index_path
    first.close()
    if damage in ("other-schema", "no-table"):
        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE meta SET value = '0' WHERE key = 'schema_version'"
                         if damage == "other-schema" else "DROP TABLE adapters")
        conn.close()
    else:
        for companion in (path, path.with_name(path.name + "-wal"),
                          path.with_name(path.name + "-shm")):
            companion.unlink(missing_ok=True)
    if damage == "garbage":
        path.write_bytes(b"this is not an sqlite database" * 100)
    with caplog.at_level(logging.WARNING):
        second = AdapterRegistry(tmp_path, SHAPES)
    assert second.open_report.index_created and second.open_report.reread == 2
    assert second.list() == records
    assert ("unreadable" in caplog.text) == (damage in ("garbage", "no-table"))
    assert AdapterRegistry(tmp_path, SHAPES).open_report.reread == 0  # rebuilt once, then trusted


def test_files_added_changed_or_removed_behind_its_back_are_seen_at_the_next_open(
        tmp_path: Path, caplog) -> None:
    first = registry_with(tmp_path, ["keep", "touched", "removed", "replaced"])
    # Added by hand, in the registry's own form: a copy of keep's pair (the file name is the id).
    for suffix in (".safetensors", ".json"):
        (tmp_path / f"added{suffix}").write_bytes((tmp_path / f"keep{suffix}").read_bytes())
    # Same size, new mtime: re-read (and still valid).
    stat = (tmp_path / "touched.safetensors").stat()
    os.utime(tmp_path / "touched.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    for suffix in (".json", ".safetensors"):
        (tmp_path / f"removed{suffix}").unlink()
    (tmp_path / "replaced.safetensors").write_bytes(adapter_bytes(LORA, seed=7))  # other size
    with caplog.at_level(logging.WARNING):
        second = AdapterRegistry(tmp_path, SHAPES)
    assert listed(second) == ["added", "keep", "touched"] and second.get("added").adapter_id == "added"
    assert (second.open_report.reread, second.open_report.dropped) == (2, 2)
    assert "replaced" in caplog.text
    for gone in ("removed", "replaced"):
        assert gone not in second and not second.has_adapter(gone)
        with pytest.raises(AdapterNotFoundError):
            second.get(gone)
    assert_same_weights(second.load_adapter("added"), second.load_adapter("keep"))


def test_reupload_of_a_deleted_id_is_indexed_as_the_new_adapter(tmp_path: Path) -> None:
    registry = registry_with(tmp_path, ["same"])
    with pytest.raises(DuplicateAdapterError):
        registry.register_upload("same", file=io.BytesIO(adapter_bytes(LORA)))
    old = registry.delete("same")
    assert len(registry) == 0 and "same" not in registry
    new_adapter = random_adapter(LORA, SHAPES, seed=4)
    new = registry.register_upload("same", file=io.BytesIO(adapter_to_bytes(new_adapter)))
    assert new.config["peft_type"] == "LORA" != old.config["peft_type"]
    assert registry.get("same") == new and listed(registry) == ["same"] and len(registry) == 1
    reopened = AdapterRegistry(tmp_path, SHAPES)
    assert reopened.get("same") == new and reopened.open_report.reread == 0
    assert_same_weights(reopened.load_adapter("same"), new_adapter)


# A child process that opens the store, arms one kill point, then uploads or deletes: the
# registry's own code runs until SIGKILL stops it there.
KILL_CHILD = r"""
import io, json, os, signal, sys
from pathlib import Path
import prolora_serve.adapters.registry as reg

root, stage, shapes = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
registry = reg.AdapterRegistry(root, {k: tuple(v) for k, v in shapes.items()})
data = sys.stdin.buffer.read()

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if stage == "mid-staging":  # half of the upload written into .staging
    def half_copy(source, target, budget):
        with open(target, "wb") as out:
            out.write(source.read(len(data) // 2))
            out.flush()
        die()
    reg._copy_limited = half_copy
elif stage == "weights-moved":  # <id>.safetensors in place, no record yet
    reg._write_json_atomic = die
elif stage == "record-written":  # committed, the index not updated
    registry._index.apply = die
elif stage == "delete-marked":  # the marker written, no file removed yet
    original = registry._mark_pending
    registry._mark_pending = lambda adapter_id: (original(adapter_id), die())
elif stage == "delete-uncommitted":  # the record removed, the weights not yet
    registry._weights_path = die
if stage.startswith("delete"):
    registry.delete("keep")
else:
    registry.register_upload("new", file=io.BytesIO(data))
print("not killed")
"""

KILL_STAGES = {  # stage -> (listed after reopening, files on disk)
    "mid-staging": (["keep"], ["keep.json", "keep.safetensors"]),
    "weights-moved": (["keep"], ["keep.json", "keep.safetensors"]),
    "record-written": (["keep", "new"], ["keep.json", "keep.safetensors", "new.json",
                                         "new.safetensors"]),
    "delete-marked": (["keep"], ["keep.json", "keep.safetensors"]),
    "delete-uncommitted": ([], []),
}


@pytest.mark.parametrize("stage", list(KILL_STAGES))
def test_kill_9_during_an_upload_or_delete_leaves_only_committed_adapters(tmp_path: Path,
                                                                          stage: str) -> None:
    registry_with(tmp_path, ["keep"]).close()
    upload = adapter_bytes(seed=11)
    child = subprocess.run([sys.executable, "-c", KILL_CHILD, str(tmp_path), stage,
                            json.dumps(SHAPES)], input=upload, capture_output=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    if stage == "weights-moved":  # the scenario is real: uncommitted weights are on disk
        assert (tmp_path / "new.safetensors").is_file() and not (tmp_path / "new.json").exists()
    if stage.startswith("delete") or stage == "weights-moved":
        assert list((tmp_path / ".pending").iterdir())  # the marker the next open settles
    reopened = AdapterRegistry(tmp_path, SHAPES)
    expected_ids, expected_files = KILL_STAGES[stage]
    assert listed(reopened) == expected_ids and len(reopened) == len(expected_ids)
    assert stored_files(tmp_path) == expected_files
    assert list((tmp_path / ".pending").iterdir()) == [] and list((tmp_path / ".staging").iterdir()) == []
    for adapter_id in expected_ids:
        reopened.load_adapter(adapter_id)  # complete, valid weights
    if "new" in expected_ids:
        assert_same_weights(reopened.load_adapter("new"), random_adapter(PROLORA, SHAPES, seed=11))


UPLOAD_LOOP_CHILD = r"""
import io, json, sys
from pathlib import Path
from prolora_serve.adapters.registry import AdapterRegistry

root, shapes = Path(sys.argv[1]), json.loads(sys.argv[2])
registry = AdapterRegistry(root, {k: tuple(v) for k, v in shapes.items()})
data = sys.stdin.buffer.read()
for i in range(10_000):
    registry.register_upload(f"loop-{i:05d}", file=io.BytesIO(data))
    print(f"loop-{i:05d}", flush=True)
"""


def test_kill_9_at_an_arbitrary_moment_of_back_to_back_uploads(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", UPLOAD_LOOP_CHILD, str(tmp_path),
                              json.dumps(SHAPES)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    child.stdin.write(adapter_bytes(seed=2))
    child.stdin.close()
    acknowledged = [child.stdout.readline().decode().strip() for _ in range(4)]
    child.kill()  # SIGKILL while it is writing the next ones
    child.wait(timeout=60)
    acknowledged += [line.strip() for line in child.stdout.read().decode().splitlines()]
    reopened = AdapterRegistry(tmp_path, SHAPES)
    ids = listed(reopened)
    in_flight = f"loop-{len(acknowledged):05d}"  # the one upload that may or may not have committed
    assert ids in (acknowledged, acknowledged + [in_flight])
    assert stored_files(tmp_path) == sorted(f"{i}{s}" for i in ids for s in (".json", ".safetensors"))
    for adapter_id in ids:
        reopened.load_adapter(adapter_id)


def test_pages_walk_every_adapter_in_id_order(tmp_path: Path) -> None:
    registry = registry_with(tmp_path, ["d", "b", "e", "a", "c"])
    assert listed(registry) == ["a", "b", "c", "d", "e"]
    walked, after, pages = [], None, 0
    while True:
        page = registry.page(limit=1, after=after)
        walked += [r.adapter_id for r in page.records]
        pages += 1
        if not page.has_more:
            break
        after = page.records[-1].adapter_id
    assert walked == ["a", "b", "c", "d", "e"] and pages == 5
    assert [r.adapter_id for r in registry.page(2).records] == ["a", "b"] and registry.page(2).has_more
    assert [r.adapter_id for r in registry.page(2, after="c").records] == ["d", "e"]
    assert registry.page(2, after="c").has_more is False
    last = registry.page(5, after="e")
    assert (last.records, last.has_more) == ([], False)
    # ``after`` is a position: an unregistered id starts the page where it would be.
    assert [r.adapter_id for r in registry.page(10, after="bb").records] == ["c", "d", "e"]
    assert [r.adapter_id for r in registry.page(10, after="0").records] == ["a", "b", "c", "d", "e"]
    assert [r.adapter_id for r in registry.list(limit=2, after="a")] == ["b", "c"]
    assert [r.adapter_id for r in registry.iter_records(batch=2)] == ["a", "b", "c", "d", "e"]
    for bad_limit in (0, -1, True, 1.5, None):
        with pytest.raises(ValueError):
            registry.page(bad_limit)
    for bad_after in ("../x", "", "a b", ".."):
        with pytest.raises(InvalidAdapterIdError):
            registry.page(3, after=bad_after)
    assert None not in registry and 3 not in registry and not registry.has_adapter(None)
