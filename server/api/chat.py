"""``POST /v1/chat/completions``: the model's chat template, then the same engine path; tool
calls through ``tools.py``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from prolora_serve.server.engine.grammar import GrammarSpec

from .auth import require_api_key
from .common import (ServingState, encode, grammar_spec, new_id, now, resolve_adapter,
                     response_model_name, sampling_params, serving_state, token_budget, usage)
from .errors import APIError
from .generation import ChoiceJob, ChoiceResult, respond
from .logprobs import chat_logprobs
from .schemas import (AssistantMessage, ChatChoice, ChatCompletionRequest, ChatCompletionResponse,
                      ChatLogprobs)
from .tools import ToolPlan, new_call_id, plan_tools, template_renders_tools, tool_calls_from_text

router = APIRouter(tags=["openai"], dependencies=[Depends(require_api_key)])


def chat_prompt_ids(state: ServingState, body: ChatCompletionRequest, plan: ToolPlan) -> list[int]:
    messages = [m.for_template() for m in body.messages]
    tokenizer = state.engine.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, f"the model {state.engine.model.name!r} has no chat template",
                       param="messages", code="invalid_messages")
    try:
        text = tokenizer.apply_chat_template(
            messages, tools=plan.template_tools, tokenize=False,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message, **(body.chat_template_kwargs or {}))
    except Exception as err:  # noqa: BLE001 - templates raise their own errors on odd input
        raise APIError(400, f"the chat template refused the messages: {err}", param="messages",
                       code="invalid_messages") from None
    return encode(state.engine, text, add_special_tokens=False)  # the template adds them


def tool_plan(state: ServingState, body: ChatCompletionRequest) -> ToolPlan:
    return plan_tools(body, template_renders_tools(getattr(state.engine.tokenizer, "chat_template", None)))


def output_grammar(body: ChatCompletionRequest, plan: ToolPlan) -> GrammarSpec | None:
    """The one constraint on the output: the tools' or the request's own (never both)."""
    requested = grammar_spec(body)
    if not plan.constrained:
        return requested
    if requested is not None:
        raise APIError(400, "tools and guided_* cannot both constrain the output", param="tool_choice")
    return plan.grammar


def make_jobs(state: ServingState, body: ChatCompletionRequest, prompt: list[int],
              grammar: GrammarSpec | None) -> list[ChoiceJob]:
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = token_budget(state, body.token_limit, len(prompt), param)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return [ChoiceJob(i, prompt, sampling_params(body, max_tokens, grammar, logprobs=logprobs,
                                                 seed_offset=i))
            for i in range(body.n)]


def finished_message(plan: ToolPlan, text: str, finish_reason: str | None) -> tuple[AssistantMessage, str | None]:
    """The assistant message of a finished choice: tool calls where the plan asks for them and
    the output holds them (a truncated call stays text, with finish_reason "length")."""
    if plan.mode == "none" or finish_reason != "stop":
        return AssistantMessage(content=text), finish_reason
    try:
        calls, content = tool_calls_from_text(plan, text)
    except ValueError:  # JSON that does not parse: not a call
        return AssistantMessage(content=text), finish_reason
    if not calls:
        return AssistantMessage(content=content), finish_reason
    return AssistantMessage(content=content, tool_calls=calls), "tool_calls"


class ChatWriter:
    """Builds the response (whole or as stream chunks). A named tool choice streams its
    arguments as they are generated; "required" and "auto" with tools stream their calls (or
    content) once the choice is finished, since only the whole output says what it is."""

    def __init__(self, state: ServingState, body: ChatCompletionRequest, prompt_len: int,
                 request_id: str, model: str, plan: ToolPlan) -> None:
        self.state, self.body, self.prompt_len, self.plan = state, body, prompt_len, plan
        self.request_id, self.model, self.created = request_id, model, now()
        self.started = [False] * body.n
        self.buffered = [""] * body.n
        self.call_ids = [new_call_id() for _ in range(body.n)]
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

    def _delta(self, index: int, output: Any) -> tuple[dict[str, Any], str | None]:
        reason = output.finish_reason if output.finished else None
        mode = self.plan.mode
        if mode == "named":
            call: dict[str, Any] = {"index": 0, "function": {"arguments": output.text}}
            if not self.started[index]:
                call.update(id=self.call_ids[index], type="function")
                call["function"]["name"] = self.plan.named
            return {"tool_calls": [call]}, "tool_calls" if reason == "stop" else reason
        if mode in ("required", "auto"):
            self.buffered[index] += output.text
            if not output.finished:
                return {}, None
            message, reason = finished_message(self.plan, self.buffered[index], reason)
            delta = message.model_dump(exclude={"role"}, exclude_none=True)
            if message.tool_calls:
                delta["tool_calls"] = [{"index": i, **call.model_dump()}
                                       for i, call in enumerate(message.tool_calls)]
            return delta, reason
        return {"content": output.text}, reason

    def chunks(self, index: int, output: Any) -> list[dict[str, Any]]:
        self.completion_tokens += len(output.token_ids)
        delta, reason = self._delta(index, output)
        if not self.started[index]:
            self.started[index] = True
            delta = {"role": "assistant", **delta}
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
        choices = []
        for r in results:
            message, reason = finished_message(self.plan, r.text, r.finish_reason)
            choices.append(ChatChoice(index=r.index, message=message, finish_reason=reason,
                                      logprobs=ChatLogprobs(content=chat_logprobs(r.logprobs))
                                      if self.body.logprobs else None))
        self.close()
        return ChatCompletionResponse(id=self.request_id, created=self.created, model=self.model,
                                      choices=choices, usage=self.usage())


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses={200: {"content": {"text/event-stream": {}}}})
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Any:
    state = serving_state(request)
    adapter = resolve_adapter(state, body.model, body.adapter)
    plan = tool_plan(state, body)
    grammar = output_grammar(body, plan)
    prompt = chat_prompt_ids(state, body, plan)
    jobs = make_jobs(state, body, prompt, grammar)
    request_id = new_id("chatcmpl")
    writer = ChatWriter(state, body, len(prompt), request_id,
                        response_model_name(state, body.model, adapter.adapter_id), plan)
    return await respond(request, state.engine, request_id, jobs, adapter, writer, body.stream)
