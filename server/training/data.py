"""JSONL training data: chat conversations or prompt/completion pairs -> token ids + loss labels.

Loss is taken only on what the adapter should learn to produce: the assistant turns of a
conversation (located through the tokenizer's own chat template) or the completion of a pair
(followed by EOS so the model learns to stop).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


class DatasetError(ValueError):
    """A training file or record is malformed; the message names the line and the problem."""


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken

    @property
    def num_loss_tokens(self) -> int:
        """Labelled positions a previous token predicts (the first token has no predictor)."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every non-blank line of ``path`` as a JSON object, with line-numbered errors."""
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise DatasetError(f"{path}:{number}: each line must be a JSON object")
        records.append(record)
    if not records:
        raise DatasetError(f"{path}: no records")
    return records


def validate_record(record: dict[str, Any]) -> None:
    if "messages" in record:
        _validate_messages(record["messages"])
    elif "prompt" in record and "completion" in record:
        if not isinstance(record["prompt"], str) or not isinstance(record["completion"], str):
            raise DatasetError("'prompt' and 'completion' must be strings")
        if not record["completion"]:
            raise DatasetError("'completion' is empty: nothing to learn")
    else:
        raise DatasetError("a record needs 'messages' or both 'prompt' and 'completion'")


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise DatasetError("'messages' must be a non-empty list")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise DatasetError(f"messages[{index}] needs a role in {ROLES}")
        if not isinstance(message.get("content"), str):
            raise DatasetError(f"messages[{index}].content must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise DatasetError("a conversation needs at least one assistant message to learn from")


def tokenize_record(record: dict[str, Any], tokenizer: Any, max_length: int) -> TokenizedExample:
    validate_record(record)
    if "messages" in record:
        example = tokenize_chat(record["messages"], tokenizer)
    else:
        example = tokenize_pair(record["prompt"], record["completion"], tokenizer)
    return TokenizedExample(example.input_ids[:max_length], example.labels[:max_length])


def tokenize_pair(prompt: str, completion: str, tokenizer: Any) -> TokenizedExample:
    """Prompt tokenized as a completion request would be; completion + EOS carries the loss."""
    prompt_ids = tokenizer(prompt).input_ids
    completion_ids = tokenizer(completion, add_special_tokens=False).input_ids
    completion_ids = completion_ids + [tokenizer.eos_token_id]
    return TokenizedExample(prompt_ids + completion_ids,
                            [IGNORE_INDEX] * len(prompt_ids) + completion_ids)


def render_chat(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def assistant_spans(messages: list[dict], tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn in it.

    A span runs from the end of the generation prompt before the turn to the end of the turn,
    so it covers the reply and the template's end-of-turn marker (the model learns to stop).
    """
    text = render_chat(tokenizer, messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_chat(tokenizer, messages[:index], add_generation_prompt=True)
        upto = render_chat(tokenizer, messages[: index + 1])
        if not (text.startswith(upto) and upto.startswith(prompt)):
            raise DatasetError("the chat template does not render conversations prefix by prefix; "
                               "use prompt/completion records for this model")
        spans.append((len(prompt), len(upto)))
    return text, spans


def tokenize_chat(messages: list[dict], tokenizer: Any) -> TokenizedExample:
    text, spans = assistant_spans(messages, tokenizer)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [token if any(lo <= begin < hi for lo, hi in spans) else IGNORE_INDEX
              for token, (begin, _) in zip(encoded.input_ids, encoded.offset_mapping)]
    return TokenizedExample(list(encoded.input_ids), labels)


def tokenize_dataset(records: Sequence[dict], tokenizer: Any,
                     max_length: int) -> tuple[list[TokenizedExample], int]:
    """Tokenized examples that keep at least one loss token, and how many were dropped."""
    examples, dropped = [], 0
    for number, record in enumerate(records, 1):
        try:
            example = tokenize_record(record, tokenizer, max_length)
        except DatasetError as err:
            raise DatasetError(f"record {number}: {err}") from None
        if example.num_loss_tokens:
            examples.append(example)
        else:
            dropped += 1
    if not examples:
        raise DatasetError(f"no example keeps a loss token within max_length={max_length}")
    return examples, dropped


def collate(examples: Sequence[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask and labels, each (B, T)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        labels[row, :length] = torch.tensor(example.labels)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batch_stream(examples: Sequence[TokenizedExample], batch_size: int, seed: int,
                 pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches: a fresh seeded shuffle every epoch, the last short batch kept."""
    order = list(range(len(examples)))
    rng = random.Random(seed)
    while True:
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            yield collate([examples[i] for i in order[start: start + batch_size]], pad_id)


def fixed_batches(examples: Sequence[TokenizedExample], batch_size: int,
                  pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Deterministic batches in file order, for evaluation."""
    return [collate(examples[i: i + batch_size], pad_id) for i in range(0, len(examples), batch_size)]
