"""The demo scripts (train_demos, evaluate_demo, param_efficiency) end to end on a tiny LLaMA."""

from __future__ import annotations

import json

import pytest

from prolora_serve.adapters.format import load_adapter
from prolora_serve.server.training import evaluate_demo, param_efficiency, train_demos
from prolora_serve.server.training.demo_tasks import DEMO_TASKS

QUESTIONS = ["what color is the sky ?", "what color is the cat ?", "say hello", "the dog ?"]


@pytest.fixture()
def tiny_demo_dir(tmp_path):
    """A demo/ layout whose pirate data uses only the tiny tokenizer's words."""
    datasets = tmp_path / "datasets"
    datasets.mkdir()
    records = [{"messages": [{"role": "user", "content": q},
                             {"role": "assistant", "content": "arr matey ! the sea is blue ."}]}
               for q in QUESTIONS]
    for split in ("train", "heldout"):
        (datasets / f"pirate_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path


def last_json(text: str) -> dict:
    return json.loads(next(line for line in text.splitlines() if line.startswith("{")))


def test_train_then_evaluate_demo(tiny_llama_dir, tiny_demo_dir, capsys, monkeypatch):
    monkeypatch.setitem(train_demos.RECIPE, "steps", 30)
    monkeypatch.setitem(train_demos.RECIPE, "lr", 5e-2)
    monkeypatch.setitem(train_demos.RECIPE, "r", 4)
    args = ["--tasks", "pirate", "--base", str(tiny_llama_dir), "--demo-dir", str(tiny_demo_dir)]
    assert train_demos.main(args) == 0
    trained = json.loads(capsys.readouterr().out.strip())
    adapter = load_adapter(DEMO_TASKS["pirate"].adapter_path(tiny_demo_dir))
    assert trained["params"] == adapter.num_params and trained["heldout_loss"] < 1.0
    assert evaluate_demo.main(args + ["--prompts", "4", "--max-tokens", "8"]) == 0
    out = capsys.readouterr().out
    score = last_json(out)["tasks"][0]
    assert score["task"] == "pirate" and score["prompts"] == 4
    assert score["adapter_score"] == 1.0 and score["base_score"] < 1.0
    assert "pirate" in out.splitlines()[-1]


def test_param_efficiency_reports_both_arms_per_seed(tiny_llama_dir, tiny_demo_dir, capsys):
    args = ["--task", "pirate", "--seeds", "0,1", "--steps", "2", "--batch-size", "2",
            "--arms", "lora,prolora,prolora-lr", "--shared-lr-factor", "2",
            "--prompts", "2", "--max-tokens", "2", "--base", str(tiny_llama_dir),
            "--demo-dir", str(tiny_demo_dir)]
    assert param_efficiency.main(args) == 0
    report = last_json(capsys.readouterr().out)
    arms = ["LoRA r=2", "PRoLoRA r=8 u=1 m=n=7", "PRoLoRA, shared lr x2"]
    assert [row["arm"] for row in report["summary"]] == arms
    assert [(run["arm"], run["seed"]) for run in report["runs"]] == [
        (arm, seed) for seed in (0, 1) for arm in arms]
    lora, prolora, prolora_lr = (row["trainable_params"] for row in report["summary"])
    assert prolora == prolora_lr
    assert lora == 2 * 2 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 96))  # r=2, 2 layers
    assert prolora < 2 * lora  # r=8 for far less than LoRA r=8's 4x
    assert all(row["heldout_loss_mean"] > 0 for row in report["summary"])
    losses = {run["arm"]: run["heldout_loss"] for run in report["runs"] if run["seed"] == 0}
    assert losses[arms[1]] != losses[arms[2]]  # the shared learning rate made a difference
    with pytest.raises(ValueError, match="unknown arm"):
        param_efficiency.arm_settings("dora", 1e-3, 2.0)
