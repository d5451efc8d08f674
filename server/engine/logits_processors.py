"""Per-row logits processing before sampling, in vLLM's order: logit bias, the min-tokens mask,
then the repetition, frequency and presence penalties.

Semantics, for row i with parameters p, prompt ids P and output ids O so far (logits (N, V)):
    logits[i, t] += p.logit_bias[t]                                   for t in p.logit_bias
    logits[i, t] = -inf          for t in EOS ids and p.stop_token_ids while len(O) < p.min_tokens
    for t in set(P) | set(O):    logits[i, t] = logits[i, t] / r  if logits[i, t] > 0 else * r
    logits[i, t] -= p.frequency_penalty * count(O, t) + p.presence_penalty * (count(O, t) > 0)
A row with none of these set is left as it is, and a step where no row sets any costs nothing.
``reference_process_logits`` is the same, one row and one token at a time, in float64.
"""

from __future__ import annotations

from typing import Collection, Sequence as Seq

import torch

from .sampling import SamplingParams
from .sequence import Sequence


def needs_processing(params: SamplingParams) -> bool:
    return bool(params.logit_bias or params.min_tokens or params.repetition_penalty != 1.0
                or params.frequency_penalty or params.presence_penalty)


def process_logits(logits: torch.Tensor, seqs: Seq[Sequence],
                   eos_token_ids: Collection[int]) -> torch.Tensor:
    """``logits`` (N, V), one row per sequence in ``seqs``; returns processed logits (a new
    tensor where any row changes, else ``logits`` itself)."""
    rows = [i for i, seq in enumerate(seqs) if needs_processing(seq.params)]
    if not rows:
        return logits
    out = logits.clone()
    for i in rows:
        seq, row = seqs[i], out[i]
        params = seq.params
        if params.logit_bias:
            ids = torch.tensor(list(params.logit_bias), dtype=torch.int64)
            row.index_add_(0, ids, torch.tensor(list(params.logit_bias.values()), dtype=row.dtype))
        if seq.num_output_tokens < params.min_tokens:
            blocked = sorted(set(eos_token_ids) | set(params.stop_token_ids))
            row[torch.tensor(blocked, dtype=torch.int64)] = float("-inf")
        _penalize(row, seq, params)
    return out


def _penalize(row: torch.Tensor, seq: Sequence, params: SamplingParams) -> None:
    vocab = row.shape[0]
    output = torch.tensor(seq.token_ids[seq.num_prompt_tokens:], dtype=torch.int64)
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(vocab, dtype=torch.bool)
        seen[torch.tensor(seq.token_ids, dtype=torch.int64)] = True
        penalty = params.repetition_penalty
        row.copy_(torch.where(seen, torch.where(row > 0, row / penalty, row * penalty), row))
    if (params.frequency_penalty or params.presence_penalty) and output.numel():
        counts = torch.bincount(output, minlength=vocab).to(row.dtype)
        row -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(row.dtype)


def reference_process_logits(logits: torch.Tensor, seqs: Seq[Sequence],
                             eos_token_ids: Collection[int]) -> torch.Tensor:
    """The semantics above, literally: float64, one token at a time (tests only)."""
    out = logits.double().clone()
    for i, seq in enumerate(seqs):
        params = seq.params
        output = seq.token_ids[seq.num_prompt_tokens:]
        for token, bias in params.logit_bias.items():
            out[i, token] += bias
        if len(output) < params.min_tokens:
            for token in set(eos_token_ids) | set(params.stop_token_ids):
                out[i, token] = float("-inf")
        for token in set(seq.token_ids):
            value = out[i, token]
            if params.repetition_penalty != 1.0:
                out[i, token] = (value / params.repetition_penalty if value > 0
                                 else value * params.repetition_penalty)
        for token in set(output):
            count = output.count(token)
            out[i, token] -= params.frequency_penalty * count + params.presence_penalty
    return out
