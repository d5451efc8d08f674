"""Engine ``TokenLogprob`` lists in OpenAI's two formats: legacy completions and chat."""

from __future__ import annotations

from typing import Any, Sequence

from .schemas import ChatTokenLogprob, LegacyLogprobs, TopLogprob


class LegacyLogprobsBuilder:
    """Accumulates tokens/token_logprobs/top_logprobs/text_offset; offsets count characters
    of the returned text (so they start after the prompt only when it is echoed)."""

    def __init__(self) -> None:
        self.offset = 0
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def _append(self, token: str, logprob: float | None, top: dict[str, float] | None) -> None:
        self.tokens.append(token)
        self.token_logprobs.append(logprob)
        self.top_logprobs.append(top)
        self.text_offset.append(self.offset)
        self.offset += len(token)

    def add_prompt(self, prompt_logprobs: Sequence[Any | None], prompt_ids: Sequence[int],
                   tokenizer: Any) -> None:
        """Echoed prompt tokens; the first has no context, so no logprob (``None``)."""
        for token_id, entry in zip(prompt_ids, prompt_logprobs):
            if entry is None:
                self._append(tokenizer.decode([token_id]), None, None)
            else:
                self._append(entry.token, entry.logprob, dict(entry.top_logprobs))

    def add(self, logprobs: Sequence[Any]) -> None:
        for entry in logprobs:
            self._append(entry.token, entry.logprob, dict(entry.top_logprobs))

    def take(self) -> LegacyLogprobs:
        """What was added since the last ``take`` (streaming sends deltas)."""
        delta = LegacyLogprobs(tokens=self.tokens, token_logprobs=self.token_logprobs,
                               top_logprobs=self.top_logprobs, text_offset=self.text_offset)
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []
        return delta


def _utf8(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def chat_logprobs(logprobs: Sequence[Any]) -> list[ChatTokenLogprob]:
    """``choices[].logprobs.content`` entries: token, logprob, bytes, top_logprobs."""
    return [ChatTokenLogprob(
        token=entry.token, logprob=entry.logprob, bytes=_utf8(entry.token),
        top_logprobs=[TopLogprob(token=t, logprob=v, bytes=_utf8(t))
                      for t, v in entry.top_logprobs.items()])
        for entry in logprobs]
