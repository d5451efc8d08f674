"""Per-request sampling parameters and the batched sampler over one step's logits rows.

Order of the logits processing (as in vLLM): logit bias, min-tokens and penalties
(``logits_processors.py``), then temperature, top-k, top-p and min-p, then a draw from each
row's own ``torch.Generator`` so that a seeded request gives the same tokens whatever else
shares its batch. Reported logprobs are those of the model's raw distribution (``log_softmax``
of the unprocessed logits), as OpenAI and vLLM report them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .grammar import GrammarSpec

MAX_LOGPROBS = 20


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_logprobs(name: str, value: int | None) -> None:
    _check(value is None or (_is_int(value) and 0 <= value <= MAX_LOGPROBS),
           f"{name} must be null or an integer in [0, {MAX_LOGPROBS}], got {value!r}")


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None = off; k = chosen token plus k alternatives
    prompt_logprobs: int | None = None  # for echo: logprobs of every prompt token
    min_p: float = 0.0  # 0 = off; else drop tokens below min_p x the most likely one's probability
    min_tokens: int = 0  # EOS and stop token ids are masked until this many tokens are out
    presence_penalty: float = 0.0  # OpenAI: subtracted once from every token already in the output
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # vLLM/HF: 1 = off; divides (> 0) or multiplies logits of seen tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    grammar: GrammarSpec | None = None  # structured output: a token bitmask each step (grammar.py)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1,
               f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        _check(isinstance(self.temperature, (int, float)) and not isinstance(self.temperature, bool)
               and math.isfinite(self.temperature) and self.temperature >= 0,
               f"temperature must be a finite number >= 0, got {self.temperature!r}")
        _check(isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1,
               f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(_is_int(self.top_k) and self.top_k >= 0,
               f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        _check(self.seed is None or _is_int(self.seed),
               f"seed must be null or an integer, got {self.seed!r}")
        _check(all(isinstance(s, str) and s for s in self.stop),
               "stop must be a list of non-empty strings")
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids must be a list of integers >= 0")
        _check_logprobs("logprobs", self.logprobs)
        _check_logprobs("prompt_logprobs", self.prompt_logprobs)
        _check(isinstance(self.min_p, (int, float)) and 0 <= self.min_p <= 1,
               f"min_p must be in [0, 1], got {self.min_p!r}")
        _check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
               f"min_tokens must be an integer in [0, max_tokens], got {self.min_tokens!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and -2 <= value <= 2,
                   f"{name} must be in [-2, 2], got {value!r}")
        _check(isinstance(self.repetition_penalty, (int, float)) and self.repetition_penalty > 0
               and math.isfinite(self.repetition_penalty),
               f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        _check(self.grammar is None or isinstance(self.grammar, GrammarSpec),
               f"grammar must be null or a GrammarSpec, got {type(self.grammar).__name__}")
        self.logit_bias = dict(self.logit_bias)
        _check(all(_is_int(t) and t >= 0 and isinstance(b, (int, float)) and -100 <= b <= 100
                   for t, b in self.logit_bias.items()),
               "logit_bias must map token ids >= 0 to biases in [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def make_generator(seed: int | None) -> torch.Generator:
    """A request's own CPU generator; unseeded requests get a fresh random seed."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed % (1 << 64))
    return generator


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (-inf) what top-k (per row, 0 = off) and then top-p (per row) exclude.

    ``logits`` (n, V) already divided by the temperature; ``top_k`` (n,) int; ``top_p`` (n,) float.
    Top-p keeps the smallest set of highest-probability tokens whose mass reaches ``p``.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device)
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
    sorted_logits = sorted_logits.masked_fill(ranks.unsqueeze(0) >= k.unsqueeze(1), float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # exclusive cumulative mass
    cut = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1).unsqueeze(1)  # p = 1 is off
    cut[:, 0] = False  # the most likely token always stays (a tiny p can round to 0 in float32)
    sorted_logits = sorted_logits.masked_fill(cut, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sampling_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Probabilities the random (non-greedy) rows draw from: temperature, top-k, top-p, min-p."""
    temperature = torch.tensor([p.temperature for p in params], dtype=logits.dtype)
    scaled = logits / temperature.unsqueeze(1)
    if any(p.top_k > 0 or p.top_p < 1 for p in params):
        top_k = torch.tensor([p.top_k for p in params])
        top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype)
        scaled = apply_top_k_top_p(scaled, top_k, top_p)
    probs = scaled.softmax(dim=-1)
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], dtype=probs.dtype).unsqueeze(1)
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float] | None  # of each chosen token, when any row asked for logprobs
    top_ids: list[list[int]] | None  # per row, its own ``logprobs`` alternatives
    top_logprobs: list[list[float]] | None


def _draw(probs: torch.Tensor, rows: list[int], generators: Sequence[torch.Generator]) -> list[int]:
    return [int(torch.multinomial(probs[j], 1, generator=generators[i]))
            for j, i in enumerate(rows)]


def sample_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                  generators: Sequence[torch.Generator]) -> list[int]:
    """One token per row: argmax for greedy rows, a draw from the processed distribution else."""
    token_ids = logits.argmax(dim=-1).tolist()
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if random_rows:
        probs = sampling_probs(logits[random_rows], [params[i] for i in random_rows])
        for i, token in zip(random_rows, _draw(probs, random_rows, generators)):
            token_ids[i] = token
    return token_ids


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator],
           raw_logits: torch.Tensor | None = None) -> SampleResult:
    """Sample every row of ``logits`` (N, V) with its own parameters and generator; logprobs
    are reported from ``raw_logits`` (the model's, before bias and penalties) when given."""
    logits = logits.float()
    token_ids = sample_tokens(logits, params, generators)
    if all(p.logprobs is None for p in params):
        return SampleResult(token_ids, None, None, None)
    logprobs = (logits if raw_logits is None else raw_logits.float()).log_softmax(dim=-1)
    chosen = logprobs.gather(1, torch.tensor(token_ids).unsqueeze(1)).squeeze(1).tolist()
    top_ids, top_values = top_alternatives(logprobs, [p.logprobs or 0 for p in params])
    return SampleResult(token_ids, chosen, top_ids, top_values)


def top_alternatives(logprobs: torch.Tensor, counts: Sequence[int]) -> tuple[list[list[int]], list[list[float]]]:
    """The ``counts[i]`` most likely tokens of row i and their logprobs."""
    most = max(counts, default=0)
    if most == 0:
        return [[] for _ in counts], [[] for _ in counts]
    values, ids = logprobs.topk(most, dim=-1)
    ids_list, values_list = ids.tolist(), values.tolist()
    return ([row[:k] for row, k in zip(ids_list, counts)],
            [row[:k] for row, k in zip(values_list, counts)])
