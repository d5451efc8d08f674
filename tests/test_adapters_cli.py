"""Offline adapter commands: inspect / export-dense / compress, in-process and as a module."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch

from prolora_serve.adapters.cli import main, register_offline_commands
from prolora_serve.adapters.config import ProLoRAConfig
from prolora_serve.adapters.dense import delta_weight
from prolora_serve.adapters.factory import random_adapter
from prolora_serve.adapters.format import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter

SHAPES = {f"model.layers.{layer}.{module}": shape
          for layer in range(2)
          for module, shape in (("self_attn.q_proj", (40, 40)), ("self_attn.k_proj", (40, 20)),
                                ("mlp.down_proj", (72, 40)))}


def make_adapter(**overrides):
    fields = dict(r=8, unshared_r=1, reduce_lora_A_x=3, reduce_lora_B_x=7, lora_alpha=16,
                  target_modules=("q_proj", "k_proj", "down_proj"), rank_pattern={"k_proj": 4})
    fields.update(overrides)
    return random_adapter(ProLoRAConfig(**fields), SHAPES, seed=11)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(map(str, argv)))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_register_offline_commands_sets_funcs():
    parser = argparse.ArgumentParser()
    register_offline_commands(parser.add_subparsers(dest="command", required=True))
    for argv in (["inspect", "a"], ["export-dense", "a", "b"],
                 ["compress", "a", "b", "--unshared-r", "1", "--reduce-a", "2", "--reduce-b", "3"]):
        args = parser.parse_args(argv)
        assert callable(args.func)
    assert parser.parse_args(["compress", "a", "b", "--unshared-r", "1", "--reduce-a", "2",
                              "--reduce-b", "3"]).tolerance == 1e-4


@pytest.mark.parametrize("single_file", [False, True])
def test_inspect_counts(capsys, tmp_path, single_file):
    adapter = make_adapter()
    src = tmp_path / ("a.safetensors" if single_file else "a")
    save_adapter(adapter, src, single_file=single_file)
    code, out, _ = run_cli(capsys, "inspect", src)
    report = json.loads(out)
    specs = [w.spec for w in adapter.modules.values()]
    assert code == 0
    assert report["num_params"] == sum(s.num_params for s in specs) == adapter.num_params
    assert report["lora_equivalent_params"] == sum(s.lora_equivalent_params for s in specs)
    assert report["bytes"] == {"stored": 4 * adapter.num_params, "fp32": 4 * adapter.num_params,
                               "bf16": 2 * adapter.num_params}
    assert report["dtypes"] == ["float32"] and report["num_modules"] == 6
    assert report["config"] == adapter.config.to_json_dict()
    groups = {g["modules"]: g for g in report["modules"]}
    assert sum(g["count"] for g in groups.values()) == 6
    k_proj = groups["model.layers.*.self_attn.k_proj"]
    assert (k_proj["r"], k_proj["unshared_r"], k_proj["count"]) == (4, 1, 2)
    assert k_proj["params_per_module"] == adapter.modules["model.layers.0.self_attn.k_proj"].spec.num_params
    assert k_proj["tensor_shapes"]["prolora_A0"] == [3, 14]


def test_export_dense_then_compress_back(capsys, tmp_path):
    adapter = make_adapter()
    save_adapter(adapter, tmp_path / "compact")
    code, out, _ = run_cli(capsys, "export-dense", tmp_path / "compact", tmp_path / "dense")
    assert code == 0 and json.loads(out)["compact_params"] == adapter.num_params
    dense = load_adapter(tmp_path / "dense", SHAPES)
    assert dense.config.peft_type == "LORA"
    assert json.loads(out)["dense_params"] == dense.num_params
    code, out, _ = run_cli(capsys, "compress", tmp_path / "dense", tmp_path / "back.safetensors",
                           "--unshared-r", 1, "--reduce-a", 3, "--reduce-b", 7)
    report = json.loads(out)
    assert code == 0 and report["max_relative_deviation"] < 1e-6
    assert report["compact_params"] == adapter.num_params
    back = load_adapter(tmp_path / "back.safetensors", SHAPES)
    for path, weights in adapter.modules.items():
        assert back.modules[path].spec == weights.spec
        torch.testing.assert_close(delta_weight(back.modules[path]), delta_weight(weights))


def test_compress_refusal_writes_nothing(capsys, tmp_path):
    save_adapter(make_adapter(), tmp_path / "compact")
    run_cli(capsys, "export-dense", tmp_path / "compact", tmp_path / "dense")
    code, out, err = run_cli(capsys, "compress", tmp_path / "dense", tmp_path / "out",
                             "--unshared-r", 1, "--reduce-a", 2, "--reduce-b", 7)
    assert code == 1 and out == ""
    assert err.startswith("error: ") and "lora_A.weight" in err and "PRoLoRA structure" in err
    assert not (tmp_path / "out").exists()


def test_existing_destination_needs_force(capsys, tmp_path):
    save_adapter(make_adapter(), tmp_path / "compact")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "export-dense", tmp_path / "compact", tmp_path / "dst")
    assert code == 1 and "--force" in err
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["keep.txt"]
    code, _, _ = run_cli(capsys, "export-dense", tmp_path / "compact", tmp_path / "dst", "--force")
    assert code == 0 and (tmp_path / "dst" / WEIGHTS_NAME).is_file()
    assert (tmp_path / "dst" / CONFIG_NAME).is_file()


def test_bad_input_is_one_error_line(capsys, tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\x80\x04K\x01.")
    code, out, err = run_cli(capsys, "inspect", tmp_path / "model.bin")
    assert code == 1 and out == "" and "convert to safetensors" in err
    assert err.count("\n") == 1


def test_module_entry_point(tmp_path):
    adapter = make_adapter(unshared_r=0)
    save_adapter(adapter, tmp_path / "a.safetensors", single_file=True)
    result = subprocess.run([sys.executable, "-m", "prolora_serve.adapters.cli", "inspect",
                             str(tmp_path / "a.safetensors")], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["num_params"] == adapter.num_params
