"""Rotary position embeddings from a LlamaConfig: default, linear, llama3 and yarn scaling.

Frequencies come from ``transformers``' own init functions for the scaled types, so a checkpoint's
``rope_parameters`` (``rope_scaling`` in older configs) mean exactly what they mean there. Types
whose frequencies change with the sequence length (dynamic, longrope) are refused.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_type_of(config: LlamaConfig) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default"))


def rope_frequencies(config: LlamaConfig) -> tuple[torch.Tensor, float]:
    """(inverse frequencies (head_dim / 2,), cos/sin scaling factor)."""
    rope_type = rope_type_of(config)
    if rope_type not in STATIC_ROPE_TYPES:
        raise ValueError(f"unsupported rope type {rope_type!r}; supported: {STATIC_ROPE_TYPES}")
    with torch.device("cpu"):  # real values even while the model is built on the meta device
        return _frequencies(config, rope_type)


def _frequencies(config: LlamaConfig, rope_type: str) -> tuple[torch.Tensor, float]:
    if rope_type != "default":
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
        return inv_freq.float(), float(scaling)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (theta ** exponents), 1.0


class RotaryEmbedding(nn.Module):
    """positions (T,) -> (cos, sin), each (T, 1, head_dim), computed per row like the reference."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        inv_freq, self.scaling = rope_frequencies(config)
        # Not a buffer: model.to(bfloat16) must not round the frequencies. One copy per device.
        self._inv_freq = {inv_freq.device: inv_freq}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            self._inv_freq[device] = next(iter(self._inv_freq.values())).to(device)
        return self._inv_freq[device]

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float().unsqueeze(1) * self.inv_freq(positions.device).unsqueeze(0)
        angles = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
        return ((angles.cos() * self.scaling).to(dtype), (angles.sin() * self.scaling).to(dtype))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, heads, head_dim) rotated by the half-split convention of Hugging Face LLaMA."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
