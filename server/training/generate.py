"""Greedy chat replies from a (possibly adapter-injected) Hugging Face model, for evaluation."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .data import render_chat


@torch.no_grad()
def chat_replies(model: nn.Module, tokenizer: Any, conversations: list[list[dict]],
                 max_new_tokens: int = 48, batch_size: int = 16) -> list[str]:
    """The greedy reply to each conversation (left-padded batches, stops at EOS)."""
    model.eval()
    replies: list[str] = []
    for start in range(0, len(conversations), batch_size):
        prompts = [render_chat(tokenizer, c, add_generation_prompt=True)
                   for c in conversations[start: start + batch_size]]
        replies += _generate(model, tokenizer, prompts, max_new_tokens)
    return replies


def _generate(model: nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int) -> list[str]:
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last column
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
                            use_cache=True)
    new_tokens = output[:, batch["input_ids"].shape[1]:]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
