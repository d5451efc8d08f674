"""OpenAI-compatible request and response bodies (pydantic), plus our ``adapter`` extension."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_N = 16
MAX_STOP = 16
MAX_LEGACY_LOGPROBS = 5
MAX_TOP_LOGPROBS = 20

Prompt = Union[str, list[str], list[int], list[list[int]]]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    # Unknown fields are ignored, as OpenAI's own server does; unsupported known ones are refused.
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="base model name, or an adapter id")
    adapter: str | None = Field(None, description="adapter id (extension); null = base model")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, description="extension: keep the k most likely tokens; 0 or -1 = off")
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    user: str | None = None
    stop_token_ids: list[int] | None = Field(None, description="extension: extra stop token ids")
    ignore_eos: bool = Field(False, description="extension: keep generating after EOS")
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP or not all(stops):
            raise ValueError(f"stop takes at most {MAX_STOP} non-empty strings")
        return stops

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> "_Request":
        unsupported = [name for name, default in (("presence_penalty", 0.0),
                                                  ("frequency_penalty", 0.0), ("logit_bias", None))
                       if getattr(self, name) not in (default, {})]
        if unsupported:
            raise ValueError(f"{unsupported[0]} is not supported by this server")
        return self


class CompletionRequest(_Request):
    prompt: Prompt = Field(..., description="text, list of texts, token ids, or lists of token ids")
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LEGACY_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: Prompt) -> Prompt:
        if isinstance(value, list) and (not value or any(isinstance(p, list) and not p for p in value)):
            raise ValueError("prompt must not be an empty list")
        return value

    @model_validator(mode="after")
    def _refuse_unsupported_completion(self) -> "CompletionRequest":
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        if self.best_of not in (None, self.n):
            raise ValueError("best_of is not supported by this server")
        return self


class TextContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
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
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None


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

