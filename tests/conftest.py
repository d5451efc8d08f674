"""Shared pytest fixtures (edit additively)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# `python -m pytest` prepends the working directory (the repo root) to sys.path, where our
# kernels/ folder would shadow the Hugging Face `kernels` package that transformers and
# bitsandbytes probe for at import time (and fail on its relative imports).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO_ROOT]


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded default model (SmolLM2-135M-Instruct) converted once to an HF directory."""
    from prolora_serve.server.engine.loader import default_model_hf_dir

    return default_model_hf_dir()
