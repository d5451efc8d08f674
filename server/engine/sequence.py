"""One request's state inside the engine: tokens, KV progress, blocks, adapter, output text."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any
import torch

from .detokenizer import IncrementalDetokenizer, StopStringText
from .sampling import SamplingParams

_arrival_counter = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top_logprobs: dict[str, float] = field(default_factory=dict)


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter_id: str | None
    generator: torch.Generator
    detokenizer: IncrementalDetokenizer
    text: StopStringText
    arrival: int = field(default_factory=lambda: next(_arrival_counter))
    token_ids: list[int] = field(init=False)  # prompt then output
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    adapter_slot: int | None = None  # held while RUNNING with an adapter
    adapter_looked_up: bool = False  # cache hit/miss is counted on the first lookup only
    finish_reason: str | None = None
    error: BaseException | None = None
    abort_requested: bool = False
    num_preemptions: int = 0
    # Output not yet handed to the caller (deltas).
    pending_token_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_logprobs_sent: bool = False
    grammar: Any = None  # an xgrammar GrammarMatcher when params.grammar is set (grammar.py)
    # Prefix caching (prefix_cache.py): the hash chain of its full blocks, valid across
    # preemptions (the tokens do not change), and how many of its blocks are registered.
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered_blocks: int = 0

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]  # the first prompt token has no context

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt positions still lack logprobs (computed once, never again after preemption)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.pending_token_ids.append(token_id)

