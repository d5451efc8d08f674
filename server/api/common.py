"""What completions and chat share: adapter resolution, prompt tokenization, sampling params.

Request facts have one owner each: the engine checks the prompt (empty, token ids, length), the
adapter's existence and request ids in ``LLMEngine.add_request``; this module only resolves which
request field names the adapter, so a 404 can name that field.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Request

from prolora_serve.adapters.registry import AdapterNotFoundError
from prolora_serve.server.engine.client import EngineClient
from prolora_serve.server.engine.grammar import GrammarSpec
from prolora_serve.server.engine.sampling import SamplingParams

from .errors import APIError
from .schemas import Usage, _Request

if TYPE_CHECKING:
    from prolora_serve.adapters.registry import AdapterRegistry

    from .metrics import ServerMetrics


@dataclass
class ServingState:
    """The objects every generation route needs, from ``request.app.state``."""

    engine: EngineClient
    registry: "AdapterRegistry"
    metrics: "ServerMetrics"

    @property
    def max_model_len(self) -> int:
        return self.engine.model.max_model_len


def serving_state(request: Request) -> ServingState:
    state = request.app.state
    if state.engine is None:
        raise APIError(503, "the engine is not running", code="engine_stopped")
    return ServingState(state.engine, state.registry, state.metrics)


@dataclass(frozen=True)
class AdapterChoice:
    """The adapter a request runs with (None: the base model) and the field that named it."""

    adapter_id: str | None
    param: str | None  # "model" | "adapter"; None for the base model

    def not_found(self, err: AdapterNotFoundError, base: str) -> APIError:
        """The 404 for this request when the engine reports the adapter unknown."""
        if self.param == "model":
            return APIError(404, f"model {self.adapter_id!r} does not exist (use {base!r} or an "
                            "adapter id)", param="model", code="model_not_found")
        return APIError(404, str(err), param="adapter", code="adapter_not_found")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def resolve_adapter(state: ServingState, model: str | None, adapter: str | None) -> AdapterChoice:
    """Which adapter a request names. ``model`` may name the base model or an adapter;
    ``adapter`` names an adapter. Whether it exists is the engine's check (a 404 naming the
    field, never a silent base run)."""
    base = state.engine.model.name
    if model is None or model == base:
        return AdapterChoice(adapter, "adapter" if adapter is not None else None)
    if adapter is not None and adapter != model:
        raise APIError(400, f"model names adapter {model!r} but adapter is {adapter!r}",
                       param="adapter", code="conflicting_adapter")
    return AdapterChoice(model, "model")


def response_model_name(state: ServingState, model: str | None, adapter_id: str | None) -> str:
    return model or adapter_id or state.engine.model.name


def encode(engine: EngineClient, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of a text prompt (the engine refuses an empty one)."""
    return list(engine.tokenizer.encode(text, add_special_tokens=add_special_tokens))


def token_budget(state: ServingState, requested: int | None, prompt_len: int,
                 param: str = "max_tokens") -> int:
    """``max_tokens``; when absent, whatever room the context has left. A request for more than
    that room is refused, as OpenAI and vLLM do (never clamped to a shorter answer)."""
    limit = state.max_model_len
    if requested is None:
        return max(limit - prompt_len, 1)  # the engine refuses prompts that cannot fit
    if prompt_len < limit and prompt_len + requested > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you "
                       f"requested {prompt_len + requested} tokens ({prompt_len} in the prompt, "
                       f"{requested} in the completion). Please reduce the length of the prompt "
                       f"or completion.", param=param, code="context_length_exceeded")
    return requested


def grammar_spec(req: _Request) -> GrammarSpec | None:
    """The request's output constraint (the schema checks allow at most one)."""
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        return GrammarSpec("json_object", param="response_format")
    if fmt is not None and fmt.type == "json_schema":
        schema = fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else {}
        return GrammarSpec.json_schema(schema, bool(fmt.json_schema.strict), "response_format")
    if req.guided_json is not None:
        try:
            return GrammarSpec.json_schema(req.guided_json, True, "guided_json")
        except ValueError as err:  # a string that is not JSON
            raise APIError(400, f"guided_json is not a JSON schema: {err}", param="guided_json",
                           code="invalid_grammar") from None
    if req.guided_regex is not None:
        return GrammarSpec("regex", req.guided_regex, param="guided_regex")
    if req.guided_choice is not None:
        return GrammarSpec.choice(req.guided_choice, "guided_choice")
    if req.guided_grammar is not None:
        return GrammarSpec("ebnf", req.guided_grammar, param="guided_grammar")
    return None


def sampling_params(req: _Request, max_tokens: int, grammar: GrammarSpec | None, *,
                    logprobs: int | None = None, prompt_logprobs: int | None = None,
                    seed_offset: int = 0) -> SamplingParams:
    """Engine params for one choice; seeded requests get ``seed + choice`` so n>1 choices
    differ yet reproduce."""
    seed = None if req.seed is None else req.seed + seed_offset
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
            top_k=max(req.top_k, 0), seed=seed, stop=list(req.stop or []),
            stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs, min_p=req.min_p,
            min_tokens=req.min_tokens, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty,
            logit_bias=req.logit_bias_ids, grammar=grammar)
    except ValueError as err:
        raise APIError(400, str(err), code="invalid_value") from None


def usage(prompt_lengths: list[int], completion_tokens: int) -> Usage:
    prompt_tokens = sum(prompt_lengths)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)
