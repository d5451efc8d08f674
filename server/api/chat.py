"""``POST /v1/chat/completions``: the model's chat template, then the same engine path."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from .auth import require_api_key
from .common import (ServingState, encode, new_id, now, resolve_adapter, response_model_name,
                     sampling_params, serving_state, token_budget, usage)
from .errors import APIError
from .generation import ChoiceJob, ChoiceResult, respond
from .logprobs import chat_logprobs
from .schemas import (AssistantMessage, ChatChoice, ChatCompletionRequest, ChatCompletionResponse,
                      ChatLogprobs)

router = APIRouter(tags=["openai"], dependencies=[Depends(require_api_key)])


def chat_prompt_ids(state: ServingState, body: ChatCompletionRequest) -> list[int]:
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    tokenizer = state.engine.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, f"the model {state.engine.model.name!r} has no chat template",
                       param="messages", code="invalid_messages")
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message, **(body.chat_template_kwargs or {}))
    except Exception as err:  # noqa: BLE001 - templates raise their own errors on odd input
        raise APIError(400, f"the chat template refused the messages: {err}", param="messages",
                       code="invalid_messages") from None
    return encode(state.engine, text, add_special_tokens=False)  # the template adds them


def make_jobs(state: ServingState, body: ChatCompletionRequest, prompt: list[int]) -> list[ChoiceJob]:
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = token_budget(state, body.token_limit, len(prompt), param)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return [ChoiceJob(i, prompt, sampling_params(body, max_tokens, logprobs=logprobs, seed_offset=i))
            for i in range(body.n)]


class ChatWriter:
    def __init__(self, state: ServingState, body: ChatCompletionRequest, prompt_len: int,
                 request_id: str, model: str) -> None:
        self.state, self.body, self.prompt_len = state, body, prompt_len
        self.request_id, self.model, self.created = request_id, model, now()
        self.started = [False] * body.n
        self.completion_tokens = 0
        self.recorded = False

    def _chunk(self, choices: list[dict[str, Any]], usage_: Any = None) -> dict[str, Any]:
        chunk = {"id": self.request_id, "object": "chat.completion.chunk", "created": self.created,
                 "model": self.model, "choices": choices}
        if usage_ is not None:
            chunk["usage"] = usage_.model_dump()
        return chunk

    def _logprobs(self, output: Any) -> dict[str, Any] | None:
        if not self.body.logprobs:
            return None
        return ChatLogprobs(content=chat_logprobs(output.logprobs or [])).model_dump()

    def chunks(self, index: int, output: Any) -> list[dict[str, Any]]:
        self.completion_tokens += len(output.token_ids)
        delta: dict[str, Any] = {"content": output.text}
        if not self.started[index]:
            self.started[index] = True
            delta["role"] = "assistant"
        reason = output.finish_reason if output.finished else None
        choice = {"index": index, "delta": delta, "logprobs": self._logprobs(output),
                  "finish_reason": reason}
        return [self._chunk([choice])]

    def usage(self) -> Any:
        return usage([self.prompt_len], self.completion_tokens)

    def tail(self) -> list[dict[str, Any]]:
        options = self.body.stream_options
        if options is None or not options.include_usage:
            return []
        return [self._chunk([], self.usage())]

    def close(self) -> None:
        if not self.recorded:
            self.recorded = True
            self.state.metrics.record_tokens(self.prompt_len, self.completion_tokens)

    def response(self, results: list[ChoiceResult]) -> ChatCompletionResponse:
        self.completion_tokens = sum(len(r.token_ids) for r in results)
        choices = [ChatChoice(index=r.index, message=AssistantMessage(content=r.text),
                              logprobs=ChatLogprobs(content=chat_logprobs(r.logprobs))
                              if self.body.logprobs else None,
                              finish_reason=r.finish_reason) for r in results]
        self.close()
        return ChatCompletionResponse(id=self.request_id, created=self.created, model=self.model,
                                      choices=choices, usage=self.usage())


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses={200: {"content": {"text/event-stream": {}}}})
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Any:
    state = serving_state(request)
    adapter = resolve_adapter(state, body.model, body.adapter)
    prompt = chat_prompt_ids(state, body)
    jobs = make_jobs(state, body, prompt)
    request_id = new_id("chatcmpl")
    writer = ChatWriter(state, body, len(prompt), request_id,
                        response_model_name(state, body.model, adapter.adapter_id))
    return await respond(request, state.engine, request_id, jobs, adapter, writer, body.stream)
