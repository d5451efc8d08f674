"""Errors the engine raises to its callers; the API maps each class to one HTTP status.

An unknown adapter is the registry's ``AdapterNotFoundError`` (adapters/registry.py), raised by
the adapter source and checked once, in ``LLMEngine.add_request``."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine reports about a request or itself."""


class QueueFullError(EngineError):
    """The waiting queue holds ``max_queue`` requests already (API: 429)."""


class InvalidPromptError(EngineError, ValueError):
    """The prompt is empty or holds token ids outside the model's embedding (API: 400)."""

    param = "prompt"


class GrammarError(EngineError, ValueError):
    """A grammar that does not compile, or that no token of the vocabulary can continue
    (API: 400, with the compiler's message; ``param`` names the request field)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class InvalidTokenIdError(EngineError, ValueError):
    """A sampling parameter names a token id outside the model's embedding (API: 400)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class AdapterTooLargeError(EngineError, ValueError):
    """The adapter alone is bigger than the whole adapter cache budget (API: 400/413)."""


class PromptTooLongError(EngineError, ValueError):
    """The prompt can never fit the model length or the KV cache (API: 400)."""


class EngineStoppedError(EngineError):
    """The engine is shut down or its step loop is not running (API: 503)."""
