"""Load a frozen LLaMA-architecture base in Hugging Face format for adapter training."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

BASE_DTYPES = ("fp32", "bf16", "nf4")


@dataclass
class TrainingBase:
    model: nn.Module  # a transformers *ForCausalLM, every parameter frozen
    tokenizer: Any
    name: str  # recorded as base_model_name_or_path in the adapter config


def resolve_base_dir(base: str | Path | None) -> Path:
    """``base`` itself, or the converted HF directory of the embedded default model."""
    if base is not None:
        path = Path(base)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
        return path
    from prolora_serve.server.engine.loader import default_model_hf_dir
    return default_model_hf_dir()


def _load_kwargs(base_dtype: str) -> dict[str, Any]:
    if base_dtype == "fp32":
        return {"dtype": torch.float32}
    if base_dtype == "bf16":
        return {"dtype": torch.bfloat16}
    from transformers import BitsAndBytesConfig
    # QLoRA set-up (paper A.2): NF4 storage, higher-precision compute for the adapter path.
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.float32)
    return {"dtype": torch.float32, "quantization_config": quant}


def load_training_base(base: str | Path | None, base_dtype: str = "fp32") -> TrainingBase:
    if base_dtype not in BASE_DTYPES:
        raise ValueError(f"base dtype must be one of {BASE_DTYPES}, got {base_dtype!r}")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = resolve_base_dir(base)
    model = AutoModelForCausalLM.from_pretrained(path, **_load_kwargs(base_dtype))
    model.requires_grad_(False)
    model.config.use_cache = False
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {path} has no EOS token")
    return TrainingBase(model, tokenizer, str(base) if base is not None else _default_name())


def _default_name() -> str:
    from prolora_serve.server.engine.default_model import DEFAULT_MODEL_NAME
    return DEFAULT_MODEL_NAME


def pad_token_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
