"""train_adapter and the train CLI end to end on a tiny LLaMA (seconds, no default model)."""

from __future__ import annotations

import json

import pytest
import torch

from prolora_serve.adapters.format import load_adapter
from prolora_serve.server.training.base import load_training_base
from prolora_serve.server.training.cli import main
from prolora_serve.server.training.inject import attach_adapter
from prolora_serve.server.training.trainer import (TrainConfig, parameter_groups, prepare_model,
                                                   train_adapter)

COLORS = {"sky": "blue", "cat": "red", "dog": "green", "mat": "blue", "sea": "green", "ship": "red"}


@pytest.fixture()
def color_data(tmp_path):
    """A memorizable mapping in both record formats, and a held-out copy."""
    records = [{"messages": [{"role": "user", "content": f"what color is the {thing} ?"},
                             {"role": "assistant", "content": f"the {thing} is {color} ."}]}
               for thing, color in COLORS.items()]
    records += [{"prompt": f"the {thing} is", "completion": color} for thing, color in COLORS.items()]
    path = tmp_path / "colors.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def quick_config(tiny_llama_dir, data, **overrides) -> TrainConfig:
    values = dict(data=data, base=str(tiny_llama_dir), r=4, unshared_r=1, reduce_a=4, reduce_b=3,
                  alpha=8.0, dropout=0.0, lr=5e-2, steps=40, batch_size=4, max_length=32,
                  warmup_ratio=0.0, max_grad_norm=1.0, progress=False)
    return TrainConfig(**{**values, **overrides})


def test_training_fits_the_data_and_the_saved_adapter_reproduces_the_model(tiny_llama_dir,
                                                                          color_data, tmp_path):
    config = quick_config(tiny_llama_dir, color_data, output=tmp_path / "colors.safetensors",
                          eval_data=color_data)
    result = train_adapter(config)
    assert result.losses[0] > 3.0 and result.final_loss < 0.3 * result.losses[0]
    assert result.eval_loss is not None and result.eval_loss < 0.3 * result.losses[0]
    assert result.num_examples == 12 and result.num_dropped == 0
    assert result.num_trainable_params == result.adapter.num_params
    loaded = load_adapter(result.output)
    assert loaded.config.peft_type == "PROLORA" and loaded.config.unshared_r == 1
    assert sorted(loaded.modules) == sorted(result.adapter.modules)
    for path, weights in result.adapter.modules.items():
        for saved, trained in zip(loaded.modules[path].tensors(), weights.tensors()):
            assert torch.equal(saved, trained)
    fresh = load_training_base(str(tiny_llama_dir))
    ids = torch.tensor([[2, 5, 28, 29, 23, 12, 22, 8, 3]])
    base_logits = fresh.model(input_ids=ids).logits
    attach_adapter(fresh.model, loaded)
    assert not torch.allclose(fresh.model(input_ids=ids).logits, base_logits, atol=1e-3)


def test_same_seed_same_adapter(tiny_llama_dir, color_data):
    first = train_adapter(quick_config(tiny_llama_dir, color_data, steps=3, dropout=0.1))
    second = train_adapter(quick_config(tiny_llama_dir, color_data, steps=3, dropout=0.1))
    third = train_adapter(quick_config(tiny_llama_dir, color_data, steps=3, dropout=0.1, seed=1))
    path = "model.layers.1.mlp.down_proj"
    assert first.losses == second.losses
    assert torch.equal(first.adapter.modules[path].Au, second.adapter.modules[path].Au)
    assert not torch.equal(first.adapter.modules[path].Au, third.adapter.modules[path].Au)


def test_separate_learning_rates_for_shared_and_unshared(tiny_llama_dir, color_data):
    config = quick_config(tiny_llama_dir, color_data, lr_shared=1e-2, lr_unshared=1e-3)
    base = load_training_base(config.base)
    prepare_model(base, config)
    groups = parameter_groups(base.model, config)
    assert [g["lr"] for g in groups] == [1e-2, 1e-3]
    names = {id(p): n for n, p in base.model.named_parameters()}
    assert all(names[id(p)].endswith(("A0", "B0")) for p in groups[0]["params"])
    assert all(names[id(p)].endswith(("Au", "Bu")) for p in groups[1]["params"])
    assert len(groups[0]["params"]) == len(groups[1]["params"]) == 2 * 14  # 2 tensors, 14 linears
    frozen = train_adapter(quick_config(tiny_llama_dir, color_data, steps=5, lr_shared=1e-30))
    moved = frozen.adapter.modules["model.layers.0.self_attn.q_proj"]
    assert not moved.B0.abs().max() > 1e-20  # B0 starts at zero and barely moves
    assert moved.Bu.abs().max() > 1e-4


def test_lora_method_trains_unshared_rank_only(tiny_llama_dir, color_data, tmp_path):
    result = train_adapter(quick_config(tiny_llama_dir, color_data, method="lora", r=2, steps=5,
                                        output=tmp_path / "lora_dir"))
    config = load_adapter(tmp_path / "lora_dir").config
    assert config.peft_type == "LORA" and config.unshared_r == 2
    q_proj = result.adapter.modules["model.layers.0.self_attn.q_proj"]
    assert q_proj.A0.numel() == 0 and q_proj.Au.shape == (2, 64)
    assert result.num_trainable_params == 2 * 2 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 96))


def test_nf4_base_trains(tiny_llama_dir, color_data):
    pytest.importorskip("bitsandbytes")
    result = train_adapter(quick_config(tiny_llama_dir, color_data, base_dtype="nf4", steps=8))
    assert result.losses[-1] < result.losses[0]


@pytest.mark.parametrize("overrides, message", [
    ({"method": "dora"}, "method"), ({"steps": 0}, "steps"), ({"dropout": 1.0}, "dropout"),
    ({"unshared_r": 9}, "unshared_r"), ({"lr_shared": -1.0}, "lr_shared"),
    ({"base_dtype": "int3"}, "base_dtype"), ({"target_modules": ()}, "target_modules"),
])
def test_bad_config_is_rejected(tiny_llama_dir, color_data, overrides, message):
    with pytest.raises(ValueError, match=message):
        quick_config(tiny_llama_dir, color_data, **overrides)


def test_cli_trains_and_saves(tiny_llama_dir, color_data, tmp_path, capsys):
    output = tmp_path / "cli.safetensors"
    code = main(["train", str(color_data), "-o", str(output), "--base", str(tiny_llama_dir),
                 "-r", "4", "-u", "2", "-m", "2", "-n", "2", "--steps", "3", "--lr", "1e-2",
                 "--target-modules", "q_proj,v_proj", "--no-progress", "--save-dtype", "fp16"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["output"] == str(output) and summary["examples"] == 12
    adapter = load_adapter(output)
    assert adapter.config.target_modules == ("q_proj", "v_proj") and len(adapter.modules) == 4
    assert next(iter(adapter.modules.values())).A0.dtype == torch.float16


def test_cli_reports_bad_input_without_a_traceback(tiny_llama_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n')
    code = main(["train", str(bad), "-o", str(tmp_path / "x.safetensors"),
                 "--base", str(tiny_llama_dir), "--no-progress"])
    assert code == 2
    assert "record 1" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
