"""Offline adapter commands: inspect / export-dense / compress, in-process and as a module."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from prolora_serve.adapters.cli import main, register_offline_commands
from prolora_serve.adapters.config import ProLoRAConfig
from prolora_serve.adapters.dense import delta_weight
from prolora_serve.adapters.factory import random_adapter
from prolora_serve.adapters.format import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from test_adapters_format import recorded_dims, strip_recorded_dims

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


# ---- u = 0 and --base-model ------------------------------------------------------------------
# One SmolLM2-like layer: h = 576, 9 heads of 64, 3 KV heads (k/v out 192), intermediate 100;
# m = 7 and n = 5 divide none of them. Written out by hand, independent of ModelShape.
GQA_CONFIG = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 100,
              "num_hidden_layers": 1, "num_attention_heads": 9, "num_key_value_heads": 3,
              "vocab_size": 16}
GQA_SHAPES = {"model.layers.0.self_attn.q_proj": (576, 576),
              "model.layers.0.self_attn.k_proj": (576, 192),
              "model.layers.0.self_attn.v_proj": (576, 192),
              "model.layers.0.self_attn.o_proj": (576, 576),
              "model.layers.0.mlp.gate_proj": (576, 100),
              "model.layers.0.mlp.up_proj": (576, 100),
              "model.layers.0.mlp.down_proj": (100, 576)}
K_PROJ = "model.layers.0.self_attn.k_proj"


def u0_adapter(unshared_r: int = 0):
    config = ProLoRAConfig(r=4, unshared_r=unshared_r, reduce_lora_A_x=7, reduce_lora_B_x=5,
                           lora_alpha=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj",
                                                         "gate_proj", "up_proj", "down_proj"))
    return random_adapter(config, GQA_SHAPES, seed=3)


def model_dir(tmp_path, name: str = "base", **overrides):
    directory = tmp_path / name
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({**GQA_CONFIG, **overrides}))
    return directory


def saved(tmp_path, adapter, single_file: bool, name: str = "a"):
    src = tmp_path / (f"{name}.safetensors" if single_file else name)
    save_adapter(adapter, src, single_file=single_file)
    return src


def dense_tensors(dst):
    return safetensors.torch.load_file(str(dst if dst.is_file() else dst / WEIGHTS_NAME))


def assert_exact_dense_export(dst, adapter) -> None:
    tensors = dense_tensors(dst)
    for path, (h, o) in GQA_SHAPES.items():
        dense_a = tensors[f"base_model.model.{path}.lora_A.weight"]
        dense_b = tensors[f"base_model.model.{path}.lora_B.weight"]
        assert dense_a.shape == (4, h) and dense_b.shape == (o, 4)
        weights = adapter.modules[path].to(dtype=torch.float64)
        torch.testing.assert_close(weights.spec.scale * dense_b.double() @ dense_a.double(),
                                   delta_weight(weights), rtol=0, atol=1e-12)


def inspected_dims(out: str) -> dict[str, tuple[int, int]]:
    return {group["modules"].replace("*", "0"): (group["in_features"], group["out_features"])
            for group in json.loads(out)["modules"]}


@pytest.mark.parametrize("single_file", [False, True])
def test_u0_export_dense_and_inspect_use_the_recorded_dims(capsys, tmp_path, single_file):
    adapter = u0_adapter()
    src = saved(tmp_path, adapter, single_file)
    code, out, err = run_cli(capsys, "inspect", src)
    assert code == 0, err
    assert inspected_dims(out) == GQA_SHAPES
    dst = tmp_path / ("dense.safetensors" if single_file else "dense")
    code, out, err = run_cli(capsys, "export-dense", src, dst)
    assert code == 0, err
    assert json.loads(out)["dense_params"] == sum(4 * (h + o) for h, o in GQA_SHAPES.values())
    assert_exact_dense_export(dst, adapter)


@pytest.mark.parametrize("single_file", [False, True])
@pytest.mark.parametrize("command", ["inspect", "export-dense"])
def test_u0_without_recorded_dims_is_refused_naming_the_dims(capsys, tmp_path, single_file,
                                                             command):
    src = saved(tmp_path, u0_adapter(), single_file)
    strip_recorded_dims(src)
    dst = tmp_path / "dense"
    code, out, err = run_cli(capsys, command, src, *([dst] if command == "export-dense" else []))
    assert code == 1 and out == "" and err.startswith("error: ") and err.count("\n") == 1
    assert ("'model.layers.0.mlp.down_proj' in_features unknown (ceil(h/7) = 15: h is 99..105), "
            "out_features unknown (ceil(o/5) = 116: o is 576..580)") in err
    assert "dimensions unknown for 7 module(s)" in err and "--base-model" in err
    assert not dst.exists()


@pytest.mark.parametrize("single_file", [False, True])
def test_base_model_supplies_the_dims_a_file_does_not_record(capsys, tmp_path, single_file):
    adapter = u0_adapter()
    src = saved(tmp_path, adapter, single_file)
    strip_recorded_dims(src)
    base = model_dir(tmp_path)
    code, out, err = run_cli(capsys, "inspect", src, "--base-model", base)
    assert code == 0, err
    assert inspected_dims(out) == GQA_SHAPES
    dst = tmp_path / ("dense.safetensors" if single_file else "dense")
    code, _, err = run_cli(capsys, "export-dense", src, dst, "--base-model", base)
    assert code == 0, err
    assert_exact_dense_export(dst, adapter)


def test_mismatching_base_model_is_refused(capsys, tmp_path):
    # u = 0 with recorded dims: intermediate 99 gives the same chunk widths as 100
    # (ceil(./7) = 15, ceil(./5) = 20), so only the recorded dims catch it.
    src = saved(tmp_path, u0_adapter(), single_file=True)
    code, out, err = run_cli(capsys, "export-dense", src, tmp_path / "d1", "--base-model",
                             model_dir(tmp_path, "inter99", intermediate_size=99))
    assert code == 1 and out == "" and not (tmp_path / "d1").exists()
    assert ("module 'model.layers.0.mlp.down_proj': the file records in_features=100, "
            "out_features=576") in err and "base model has in_features=99" in err
    # u > 0 without recorded dims: Au/Bu fix them; a base with head_dim 48 (k/v out 144) disagrees.
    src = saved(tmp_path, u0_adapter(unshared_r=1), single_file=False, name="u1")
    strip_recorded_dims(src)
    code, out, _ = run_cli(capsys, "inspect", src)
    assert code == 0 and inspected_dims(out) == GQA_SHAPES  # no --base-model needed
    code, out, err = run_cli(capsys, "inspect", src, "--base-model",
                             model_dir(tmp_path, "head48", head_dim=48))
    assert code == 1 and out == ""
    assert f"{K_PROJ}.prolora_B0" in err and "out=144" in err and "base model" in err


def test_compress_with_base_model_keeps_the_dims(capsys, tmp_path):
    adapter = u0_adapter()
    save_adapter(adapter, tmp_path / "compact")
    code, _, err = run_cli(capsys, "export-dense", tmp_path / "compact", tmp_path / "dense")
    assert code == 0, err
    base = model_dir(tmp_path)
    code, out, err = run_cli(capsys, "compress", tmp_path / "dense", tmp_path / "back.safetensors",
                             "--unshared-r", 0, "--reduce-a", 7, "--reduce-b", 5,
                             "--base-model", base)
    assert code == 0, err
    assert json.loads(out)["compact_params"] == adapter.num_params
    expected = {path: list(dims) for path, dims in GQA_SHAPES.items()}
    assert recorded_dims(tmp_path / "back.safetensors") == expected
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "back.safetensors")
    assert code == 0 and inspected_dims(out) == GQA_SHAPES
    code, _, err = run_cli(capsys, "compress", tmp_path / "dense", tmp_path / "other",
                           "--unshared-r", 0, "--reduce-a", 7, "--reduce-b", 5,
                           "--base-model", model_dir(tmp_path, "kv2", num_key_value_heads=2))
    assert code == 1 and f"module {K_PROJ!r}" in err  # the dense file records its dims too
    assert "base model has in_features=576, out_features=128" in err


def test_base_model_without_config_is_one_error_line(capsys, tmp_path):
    src = saved(tmp_path, u0_adapter(), single_file=True)
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli(capsys, "inspect", src, "--base-model", tmp_path / "empty")
    assert code == 1 and out == "" and err.count("\n") == 1
    assert "config.json" in err and "cannot read" in err
