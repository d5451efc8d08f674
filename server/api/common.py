"""What completions and chat share: adapter resolution, prompt tokenization, sampling params."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from prolora_serve.server.engine.sampling import SamplingParams

from .errors import APIError
from .schemas import Usage, _Request


@dataclass
class ServingState:
    """The objects every route needs, from ``request.app.state``."""

    engine: Any  # AsyncLLMEngine
    registry: Any  # AdapterRegistry
    metrics: Any  # ServerMetrics
    max_model_len: int


def serving_state(request: Request) -> ServingState:
    state = request.app.state
    if getattr(state, "engine", None) is None:
        raise APIError(503, "the engine is not running", code="engine_stopped")
    return ServingState(state.engine, state.registry, state.metrics, state.max_model_len)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def resolve_adapter(state: ServingState, model: str | None, adapter: str | None) -> str | None:
    """The adapter id a request runs with (None = base). ``model`` may name the base model or
    an adapter; ``adapter`` names an adapter. Unknown names are 404, never a silent base run."""
    base = state.engine.model_name
    if adapter is not None and adapter not in state.registry:
        raise APIError(404, f"adapter {adapter!r} does not exist", param="adapter",
                       code="adapter_not_found")
    if model is None or model == base:
        return adapter
    if model not in state.registry:
        raise APIError(404, f"model {model!r} does not exist (use {base!r} or an adapter id)",
                       param="model", code="model_not_found")
    if adapter is not None and adapter != model:
        raise APIError(400, f"model names adapter {model!r} but adapter is {adapter!r}",
                       param="adapter", code="conflicting_adapter")
    return model


def response_model_name(state: ServingState, model: str | None, adapter_id: str | None) -> str:
    return model or adapter_id or state.engine.model_name


def vocab_size(engine: Any) -> int:
    return max(int(engine.hf_config.vocab_size), len(engine.tokenizer))


def check_token_ids(engine: Any, ids: list[int]) -> list[int]:
    limit = vocab_size(engine)
    bad = [t for t in ids if not 0 <= t < limit]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {limit})",
                       param="prompt", code="invalid_token_id")
    return ids


def encode(engine: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    ids = list(engine.tokenizer.encode(text, add_special_tokens=add_special_tokens))
    if not ids:
        raise APIError(400, "the prompt is empty (it encodes to zero tokens)", param="prompt",
                       code="empty_prompt")
    return ids


def token_budget(state: ServingState, requested: int | None, prompt_len: int) -> int:
    """``max_tokens``; when absent, whatever room the context has left (the engine also stops
    every sequence at its length limit with finish_reason "length")."""
    if requested is not None:
        return requested
    return max(state.max_model_len - prompt_len, 1)  # the engine refuses prompts that cannot fit


def sampling_params(req: _Request, max_tokens: int, *, logprobs: int | None = None,
                    prompt_logprobs: int | None = None, seed_offset: int = 0) -> SamplingParams:
    """Engine params for one choice; seeded requests get ``seed + choice`` so n>1 choices
    differ yet reproduce."""
    seed = None if req.seed is None else req.seed + seed_offset
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
            top_k=max(req.top_k, 0), seed=seed, stop=list(req.stop or []),
            stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs)
    except ValueError as err:
        raise APIError(400, str(err), code="invalid_value") from None


def usage(prompt_lengths: list[int], completion_tokens: int) -> Usage:
    prompt_tokens = sum(prompt_lengths)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)
