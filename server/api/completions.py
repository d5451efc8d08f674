"""``POST /v1/completions``: OpenAI's legacy completions, with our ``adapter`` field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request

from .auth import require_api_key
from prolora_serve.server.engine.client import EngineClient

from .common import (ServingState, encode, grammar_spec, new_id, now, resolve_adapter,
                     response_model_name, sampling_params, serving_state, token_budget, usage)
from .errors import APIError
from .generation import ChoiceJob, ChoiceResult, respond
from .logprobs import LegacyLogprobsBuilder
from .schemas import CompletionChoice, CompletionRequest, CompletionResponse

router = APIRouter(tags=["openai"], dependencies=[Depends(require_api_key)])
MAX_CHOICES = 128  # prompts x n in one request


@dataclass
class PromptInput:
    token_ids: list[int]
    text: str | None  # what ``echo`` returns; None: decoded from the ids when echoed


def prompt_inputs(engine: EngineClient, prompt: str | list[Any],
                  add_special_tokens: bool = True) -> list[PromptInput]:
    """Normalize the four prompt forms to one list of (token ids, text); the engine checks
    the ids when the request is added."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    return [PromptInput(encode(engine, item, add_special_tokens), item) if isinstance(item, str)
            else PromptInput(list(item), None) for item in prompt]


def make_jobs(state: ServingState, body: CompletionRequest,
              prompts: list[PromptInput]) -> list[ChoiceJob]:
    """Choice ``p * n + i`` is the i-th sample for prompt p (OpenAI's order)."""
    if len(prompts) * body.n > MAX_CHOICES:
        raise APIError(400, f"{len(prompts)} prompts x n={body.n} exceeds {MAX_CHOICES} choices "
                       "per request", param="prompt", code="too_many_choices")
    prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
    grammar = grammar_spec(body)
    return [ChoiceJob(p * body.n + i, prompt.token_ids,
                      sampling_params(body, token_budget(state, body.max_tokens,
                                                         len(prompt.token_ids)), grammar,
                                      logprobs=body.logprobs,
                                      prompt_logprobs=prompt_logprobs, seed_offset=i))
            for p, prompt in enumerate(prompts) for i in range(body.n)]


class CompletionWriter:
    """Builds the response (whole or as stream chunks) for one completion request."""

    def __init__(self, state: ServingState, body: CompletionRequest, prompts: list[PromptInput],
                 request_id: str, model: str) -> None:
        self.state, self.body, self.prompts = state, body, prompts
        self.request_id, self.model, self.created = request_id, model, now()
        count = len(prompts) * body.n
        self.logprobs = [LegacyLogprobsBuilder() for _ in range(count)]
        self.started = [False] * count
        self.completion_tokens = 0
        self.recorded = False

    def _prompt_of(self, index: int) -> PromptInput:
        return self.prompts[index // self.body.n]

    def _text_and_logprobs(self, index: int, output: Any) -> tuple[str, Any]:
        """The delta text and logprobs of one engine output (with the echo on the first)."""
        text, builder = output.text, self.logprobs[index]
        first = not self.started[index]
        self.started[index] = True
        if first and self.body.echo:
            prompt = self._prompt_of(index)
            if prompt.text is None:  # token-id prompts: decoded once the engine accepted them
                prompt.text = self.state.engine.tokenizer.decode(prompt.token_ids)
            text = prompt.text + text
            if self.body.logprobs is not None and output.prompt_logprobs is not None:
                builder.add_prompt(output.prompt_logprobs, prompt.token_ids,
                                   self.state.engine.tokenizer)
            builder.offset = len(prompt.text)
        if self.body.logprobs is None:
            return text, None
        builder.add(output.logprobs or [])
        return text, builder.take()

    def choice(self, index: int, output: Any) -> CompletionChoice:
        self.completion_tokens += len(output.token_ids)
        text, logprobs = self._text_and_logprobs(index, output)
        reason = output.finish_reason if output.finished else None
        return CompletionChoice(text=text, index=index, logprobs=logprobs, finish_reason=reason)

    def chunks(self, index: int, output: Any) -> list[dict[str, Any]]:
        chunk = CompletionResponse(id=self.request_id, created=self.created, model=self.model,
                                   choices=[self.choice(index, output)])
        return [chunk.model_dump(exclude={"usage"})]

    def usage(self) -> Any:
        return usage([len(p.token_ids) for p in self.prompts], self.completion_tokens)

    def tail(self) -> list[dict[str, Any]]:
        options = self.body.stream_options
        if options is None or not options.include_usage:
            return []
        return [CompletionResponse(id=self.request_id, created=self.created, model=self.model,
                                   choices=[], usage=self.usage()).model_dump()]

    def close(self) -> None:
        if not self.recorded:
            self.recorded = True
            self.state.metrics.record_tokens(sum(len(p.token_ids) for p in self.prompts),
                                             self.completion_tokens)

    def response(self, results: list[ChoiceResult]) -> CompletionResponse:
        choices = [self.choice(r.index, _as_output(r)) for r in results]
        self.close()
        return CompletionResponse(id=self.request_id, created=self.created, model=self.model,
                                  choices=choices, usage=self.usage())


@dataclass
class _Whole:
    """A finished ``ChoiceResult`` seen as one big engine delta."""

    text: str
    token_ids: list[int]
    logprobs: list[Any]
    prompt_logprobs: list[Any] | None
    finished: bool
    finish_reason: str | None


def _as_output(result: ChoiceResult) -> _Whole:
    return _Whole(result.text, result.token_ids, result.logprobs, result.prompt_logprobs, True,
                  result.finish_reason)


@router.post("/v1/completions", response_model=CompletionResponse,
             responses={200: {"content": {"text/event-stream": {}}}})
async def create_completion(body: CompletionRequest, request: Request) -> Any:
    state = serving_state(request)
    adapter = resolve_adapter(state, body.model, body.adapter)
    prompts = prompt_inputs(state.engine, body.prompt, body.add_special_tokens)
    jobs = make_jobs(state, body, prompts)
    request_id = new_id("cmpl")
    writer = CompletionWriter(state, body, prompts, request_id,
                              response_model_name(state, body.model, adapter.adapter_id))
    return await respond(request, state.engine, request_id, jobs, adapter, writer, body.stream)
