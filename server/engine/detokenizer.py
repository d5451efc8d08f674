"""Incremental detokenization and stop-string handling for streamed output text.

Byte-level BPE and sentencepiece tokenizers split one character over several tokens, and the
text of a token depends on its left neighbours (leading spaces). So each step decodes a short
window of recent tokens twice, with and without the new token, and emits the difference only
once it no longer ends in an incomplete character (vLLM's ``detokenize_incrementally`` idea).
"""

from __future__ import annotations

from typing import Any, Sequence

INCOMPLETE_CHAR = "\ufffd"
PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded alongside the output for correct spacing


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas of complete characters only."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.window = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0  # window[prefix:read] was decoded already, as context
        self.read_offset = len(self.window)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Append one token; return the newly completed text (possibly empty)."""
        self.window.append(token_id)
        prefix_text = self._decode(self.window[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.window[self.prefix_offset:])
        if len(full_text) <= len(prefix_text) or full_text.endswith(INCOMPLETE_CHAR):
            return ""
        self.window = self.window[self.read_offset:]
        self.prefix_offset, self.read_offset = 0, len(self.window)
        return full_text[len(prefix_text):]


class StopStringText:
    """The output text so far, cut before the first stop string, streamed without ever
    emitting the beginning of a stop string (the last ``longest - 1`` chars are held back)."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = list(stop)
        self.hold_back = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.emitted = 0

    def append(self, delta: str) -> bool:
        """Add decoded text; return True if a stop string now appears (text is cut before it)."""
        start = len(self.text)
        self.text += delta
        hits = [self.text.find(s, max(start - len(s) + 1, 0)) for s in self.stop]
        hits = [h for h in hits if h >= 0]
        if not hits:
            return False
        self.text = self.text[:min(hits)]
        return True

    def take_delta(self, finished: bool) -> str:
        """Text not yet emitted; while running, all but the held-back tail."""
        end = len(self.text) if finished else max(len(self.text) - self.hold_back, self.emitted)
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta


class TokenTextCache:
    """Display text of single tokens (for logprobs), decoded once per id."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            self._texts[token_id] = text
        return text
