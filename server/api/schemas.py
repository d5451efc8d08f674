"""OpenAI-compatible request and response bodies (pydantic), plus our ``adapter`` extension."""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_N = 16
MAX_STOP = 16
MAX_LEGACY_LOGPROBS = 5
MAX_TOP_LOGPROBS = 20

Prompt = Union[str, list[str], list[int], list[list[int]]]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage in every chunk (refused below if set)


# Fields OpenAI or vLLM define that this server does not implement: a request that sets one to
# anything but its neutral value gets a 400 naming it (never a silently different answer).
# name -> the values that mean "off".
_REFUSED_COMMON: dict[str, tuple[Any, ...]] = {
    "use_beam_search": (None, False), "length_penalty": (None, 1.0), "bad_words": (None, []),
    "allowed_token_ids": (None,), "truncate_prompt_tokens": (None,), "prompt_logprobs": (None,),
    "include_stop_str_in_output": (None, False), "skip_special_tokens": (None, True),
    "spaces_between_special_tokens": (None, True), "logits_processors": (None, []),
    "priority": (None, 0), "return_tokens_as_token_ids": (None, False), "cache_salt": (None,),
    "kv_transfer_params": (None,), "vllm_xargs": (None,), "guided_decoding_backend": (None,),
    "guided_whitespace_pattern": (None,), "structural_tag": (None,), "store": (None, False),
    "metadata": (None,), "service_tier": (None, "auto", "default"), "request_id": (None,),
}


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: plain text, any JSON object, or a JSON schema."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with (and only with) type json_schema")
        return self


class _Request(BaseModel):
    # Every field OpenAI or vLLM define is declared: implemented, or refused by name when set;
    # anything else is a 400 naming it ("extra_forbidden"), never silently dropped.
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="base model name, or an adapter id")
    adapter: str | None = Field(None, description="adapter id (extension); null = base model")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, description="vLLM: keep the k most likely tokens; 0 or -1 = off")
    min_p: float = Field(0.0, ge=0, le=1, description="vLLM: drop tokens below min_p x the top probability")
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop_token_ids: list[int] | None = Field(None, description="vLLM: extra stop token ids")
    ignore_eos: bool = Field(False, description="vLLM: keep generating after EOS")
    min_tokens: int = Field(0, ge=0, description="vLLM: no EOS or stop token before this many tokens")
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=10, description="vLLM/HF: over prompt and output")
    logit_bias: dict[str, float] | None = Field(None, description="token id (as a string) -> bias in [-100, 100]")
    # Identifiers for the caller's bookkeeping: by definition they do not change the output.
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # Declared so that setting them is refused by name (see _REFUSED_COMMON).
    use_beam_search: bool | None = None
    length_penalty: float | None = None
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    logits_processors: list[Any] | None = None
    priority: int | None = None
    return_tokens_as_token_ids: bool | None = None
    cache_salt: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    vllm_xargs: dict[str, Any] | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    structural_tag: Any = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    request_id: str | None = None
    # Structured outputs (server/engine/grammar.py): at most one of these per request.
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = Field(None, description="vLLM: a JSON schema")
    guided_regex: str | None = Field(None, description="vLLM: a regular expression")
    guided_choice: list[str] | None = Field(None, description="vLLM: one of these strings")
    guided_grammar: str | None = Field(None, description="vLLM: an EBNF grammar (root rule: root)")

    _refused: ClassVar[dict[str, tuple[Any, ...]]] = _REFUSED_COMMON

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP or not all(stops):
            raise ValueError(f"stop takes at most {MAX_STOP} non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.isdigit() or not -100 <= bias <= 100:
                raise ValueError("logit_bias maps token ids (strings of digits) to biases in "
                                 f"[-100, 100], got {key!r}: {bias!r}")
        return value

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> "_Request":
        for name, neutral in self._refused.items():
            value = getattr(self, name)
            if not any(value == off for off in neutral):
                raise ValueError(f"{name}={value!r} is not supported by this server")
        guides = [name for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
                  if getattr(self, name) is not None]
        if self.response_format is not None and self.response_format.type != "text":
            guides.append("response_format")
        if len(guides) > 1:
            raise ValueError(f"set at most one of response_format and guided_*, got {', '.join(guides)}")
        if self.stream_options is not None:
            if not self.stream:
                raise ValueError("stream_options is only allowed when stream is true")
            if self.stream_options.continuous_usage_stats:
                raise ValueError("stream_options.continuous_usage_stats is not supported by this server")
        return self

    @property
    def logit_bias_ids(self) -> dict[int, float]:
        return {int(key): bias for key, bias in (self.logit_bias or {}).items()}


class CompletionRequest(_Request):
    prompt: Prompt = Field(..., description="text, list of texts, token ids, or lists of token ids")
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LEGACY_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool = Field(True, description="vLLM: add the tokenizer's BOS to text prompts")

    _refused: ClassVar[dict[str, tuple[Any, ...]]] = {**_REFUSED_COMMON, "suffix": (None, "")}

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: Prompt) -> Prompt:
        if isinstance(value, list) and (not value or any(isinstance(p, list) and not p for p in value)):
            raise ValueError("prompt must not be an empty list")
        return value

    @model_validator(mode="after")
    def _refuse_unsupported_completion(self) -> "CompletionRequest":
        if self.best_of not in (None, self.n):
            raise ValueError("best_of > n is not supported by this server")
        return self


class TextContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers
    refusal: str | None = None

    @model_validator(mode="after")
    def _tool_fields_by_role(self) -> "ChatMessage":
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it (tool call arguments as objects)."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": call.id, "type": "function",
                 "function": {"name": call.function.name, "arguments": _json_or_text(call.function.arguments)}}
                for call in self.tool_calls]
        return message


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; absent: no arguments
    strict: bool | None = None

    @property
    def parameters_schema(self) -> dict[str, Any]:
        return self.parameters if self.parameters is not None else {"type": "object", "properties": {}}


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: bool = Field(True, description="vLLM: end the template with the assistant turn")
    continue_final_message: bool = Field(False, description="vLLM: extend the last (assistant) message")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="vLLM: extra template variables")
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: Any = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    echo: bool | None = None
    chat_template: str | None = None
    documents: list[dict[str, Any]] | None = None

    _refused: ClassVar[dict[str, tuple[Any, ...]]] = {
        **_REFUSED_COMMON, "functions": (None, []), "function_call": (None, "none"), "audio": (None,),
        "modalities": (None, ["text"]), "prediction": (None,), "reasoning_effort": (None,),
        "verbosity": (None,), "web_search_options": (None,), "echo": (None, False),
        "chat_template": (None,), "documents": (None,)}

    @model_validator(mode="after")
    def _check_chat_fields(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree: set one")
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message requires add_generation_prompt to be false")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ValueError("continue_final_message needs a final assistant message")
        uses_tools = self.tools and self.tool_choice not in (None, "none")
        if uses_tools and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("tools and response_format cannot both constrain the output")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# ---- responses ----------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class LegacyLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: LegacyLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort", "tool_calls"] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "prolora-serve"
    root: str
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AdapterInfo(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    created: int
    config: dict[str, Any]
    num_params: int
    nbytes: int = Field(description="compact weight bytes at the stored dtype")
    stored_bytes: int = Field(description="size of the stored file")
    resident: bool | None = Field(None, description="loaded in the device cache now")
    resident_bytes: int | None = None
    in_use: int | None = Field(None, description="running requests holding the adapter")
    last_used: float | None = None


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterInfo]


class AdapterDeleted(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    deleted: bool = True


class KernelBackendNames(BaseModel):
    adapter: str  # cpu | torch | triton | reference
    decode_attention: str  # cpu | sdpa


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    model: str | None = None
    adapters: int | None = None
    backends: KernelBackendNames | None = None  # which kernels run: a slow fallback shows here

