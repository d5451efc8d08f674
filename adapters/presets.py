"""Published shapes of well-known LLaMA-architecture bases, for the capacity calculator.

Plain dicts with the Hugging Face ``config.json`` key names, copied from the models'
published configs (meta-llama/Llama-2-*-hf, HuggingFaceTB/SmolLM2-135M-Instruct).
"""

from __future__ import annotations

from typing import Any

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "llama2-7b": {
        "name_or_path": "meta-llama/Llama-2-7b-hf",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "head_dim": 128,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
    "llama2-13b": {
        "name_or_path": "meta-llama/Llama-2-13b-hf",
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
        "head_dim": 128,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
    "llama2-70b": {
        "name_or_path": "meta-llama/Llama-2-70b-hf",
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,  # grouped-query attention: k/v project to 8*128 = 1024
        "head_dim": 128,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
    "smollm2-135m": {  # the embedded default model (server/engine/default_model.py)
        "name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    },
}

# The paper's Table 1 "LoRA r=2" parameter counts for the larger models. They do not follow
# from the published shapes (all seven projections, same formula as the 7B row, which matches).
PAPER_TABLE1_LORA_R2: dict[str, int] = {
    "llama2-13b": 6_260_000,
    "llama2-70b": 11_270_000,
}


def preset(name: str) -> dict[str, Any]:
    """A copy of one preset; KeyError names the known presets."""
    if name not in MODEL_PRESETS:
        raise KeyError(f"unknown base model preset {name!r}; known: {', '.join(MODEL_PRESETS)}")
    return dict(MODEL_PRESETS[name])
