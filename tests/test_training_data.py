"""Training data: which tokens carry the loss, truncation, batching and clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_tiny_tokenizer
from prolora_serve.server.training.data import (IGNORE_INDEX, DatasetError, batch_stream, collate,
                                                read_jsonl, tokenize_dataset, tokenize_record)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def labelled_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": text} for role, text in turns]}


def test_chat_loss_covers_only_assistant_turns(tokenizer):
    record = chat(("system", "say yes"), ("user", "what color is the sky ?"),
                  ("assistant", "the sky is blue ."), ("user", "the cat ?"),
                  ("assistant", "the cat is red ."))
    example = tokenize_record(record, tokenizer, max_length=200)
    assert labelled_text(tokenizer, example) == "the sky is blue . <|im_end|> the cat is red . <|im_end|>"
    assert len(example.labels) == len(example.input_ids)
    masked = [t for t, label in zip(example.input_ids, example.labels) if label == IGNORE_INDEX]
    assert tokenizer.decode(masked).count("<|im_start|>") == 5  # every header stays unlabelled


def test_prompt_completion_loss_covers_completion_and_eos(tokenizer):
    example = tokenize_record({"prompt": "what color is the sky ?", "completion": "blue"},
                              tokenizer, max_length=50)
    assert example.labels[-2:] == [tokenizer.convert_tokens_to_ids("blue"), tokenizer.eos_token_id]
    assert example.labels[:-2] == [IGNORE_INDEX] * (len(example.labels) - 2)


def test_truncation_keeps_the_start_and_drops_examples_without_loss(tokenizer):
    long_answer = chat(("user", "one two three four five"), ("assistant", "yes"))
    examples, dropped = tokenize_dataset([long_answer, chat(("user", "a"), ("assistant", "no"))],
                                         tokenizer, max_length=9)
    assert dropped == 1 and len(examples) == 1
    assert all(len(e.input_ids) <= 9 for e in examples)


@pytest.mark.parametrize("record, message", [
    ({"text": "hello"}, "needs 'messages' or both"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "at least one assistant"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
    ({"messages": [{"role": "assistant", "content": 3}]}, "content must be a string"),
    ({"prompt": "a", "completion": ""}, "empty"),
    ({"prompt": 1, "completion": "a"}, "must be strings"),
])
def test_malformed_records_are_named(tokenizer, record, message):
    with pytest.raises(DatasetError, match=message):
        tokenize_dataset([chat(("user", "a"), ("assistant", "b")), record], tokenizer, 50)
    with pytest.raises(DatasetError, match="record 2"):
        tokenize_dataset([chat(("user", "a"), ("assistant", "b")), record], tokenizer, 50)


def test_read_jsonl_reports_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n\n{broken\n")
    with pytest.raises(DatasetError, match=r"data.jsonl:3: not valid JSON"):
        read_jsonl(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(DatasetError, match=r":1: each line must be a JSON object"):
        read_jsonl(path)
    path.write_text("\n")
    with pytest.raises(DatasetError, match="no records"):
        read_jsonl(path)


def test_collate_right_pads(tokenizer):
    examples, _ = tokenize_dataset([{"prompt": "a", "completion": "b"},
                                    {"prompt": "the red cat sat", "completion": "yes"}], tokenizer, 50)
    batch = collate(examples, pad_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, 6)
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0]
    assert batch["input_ids"][0, 3:].eq(tokenizer.pad_token_id).all()
    assert batch["labels"][0, 3:].eq(IGNORE_INDEX).all()


def test_batch_stream_visits_every_example_each_epoch(tokenizer):
    records = [{"prompt": w, "completion": "yes"} for w in "one two three four five".split()]
    examples, _ = tokenize_dataset(records, tokenizer, 10)
    stream = batch_stream(examples, batch_size=2, seed=0, pad_id=tokenizer.pad_token_id)
    for _ in range(2):
        seen = torch.cat([next(stream)["input_ids"][:, 0] for _ in range(3)])
        assert sorted(seen.tolist()) == sorted(e.input_ids[0] for e in examples)


@pytest.mark.slow
def test_default_model_chat_labels_are_the_assistant_reply(default_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    record = chat(("user", "What is the capital of France?"),
                  ("assistant", "La capitale de la France est Paris."))
    example = tokenize_record(record, tokenizer, max_length=256)
    assert labelled_text(tokenizer, example) == "La capitale de la France est Paris.<|im_end|>\n"
    assert tokenizer.decode(example.input_ids).startswith("<|im_start|>system")
