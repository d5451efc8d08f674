"""A compact LLaMA forward over flattened mixed batches with a paged KV cache (gpt-fast style).

Attribute names mirror Hugging Face's ``LlamaForCausalLM`` so its safetensors load by name and
module paths (``model.layers.0.self_attn.q_proj``) are the ones adapters are keyed by. Adapters
enter by module swapping (``install_adapter_layers``), never by branches inside the model.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig

from .attention import paged_attention
from .kv_cache import AttentionMetadata, KVCache
from .rope import RotaryEmbedding, apply_rotary

class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 like the reference, then scale in the model dtype.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight * normed


def head_dim_of(config: LlamaConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads or config.num_attention_heads
        self.head_dim = head_dim_of(config)
        self.scale = self.head_dim ** -0.5
        hidden, bias = config.hidden_size, bool(getattr(config, "attention_bias", False))
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                attn: AttentionMetadata, kv: KVCache) -> torch.Tensor:
        tokens = x.shape[0]
        q = self.q_proj(x).view(tokens, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        out = paged_attention(q, k, v, kv.keys[self.layer_idx], kv.values[self.layer_idx], attn,
                              self.scale)
        return self.o_proj(out.reshape(tokens, -1))


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                attn: AttentionMetadata, kv: KVCache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, attn, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaDecoder(nn.Module):
    """The ``model.`` part of a checkpoint: embeddings, decoder layers, final norm."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class LlamaModel(nn.Module):
    """``model(input_ids (T,), positions (T,), attn, kv) -> hidden (T, hidden_size)``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaDecoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
                kv: KVCache) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        rope = self.model.rotary_emb(positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, rope, attn, kv)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden_size) -> (N, vocab) float32 logits."""
        return self.lm_head(hidden).float()

    def make_kv_cache(self, num_blocks: int, block_size: int,
                      dtype: torch.dtype | None = None) -> KVCache:
        """A paged cache in ``dtype`` (default: the model's compute dtype)."""
        config = self.config
        return KVCache(config.num_hidden_layers, num_blocks, block_size,
                       config.num_key_value_heads or config.num_attention_heads,
                       head_dim_of(config), dtype or self.dtype, self.device)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Module path -> (in_features, out_features) of every adaptable projection."""
        config, head_dim = self.config, head_dim_of(self.config)
        hidden, inner = config.hidden_size, config.intermediate_size
        q_out = config.num_attention_heads * head_dim
        kv_out = (config.num_key_value_heads or config.num_attention_heads) * head_dim
        shapes = {"self_attn.q_proj": (hidden, q_out), "self_attn.k_proj": (hidden, kv_out),
                  "self_attn.v_proj": (hidden, kv_out), "self_attn.o_proj": (q_out, hidden),
                  "mlp.gate_proj": (hidden, inner), "mlp.up_proj": (hidden, inner),
                  "mlp.down_proj": (inner, hidden)}
        return {f"model.layers.{i}.{name}": shape
                for i in range(config.num_hidden_layers) for name, shape in shapes.items()}


class AdapterApplier(Protocol):
    """What AdapterLinear needs from ``prolora_serve.kernels.AdapterContext``."""

    def apply(self, module_path: str, x: torch.Tensor, y: torch.Tensor) -> None: ...


class AdapterLinear(nn.Module):
    """A base projection (float, NF4 or int8) plus each row's adapter delta, unmerged."""

    def __init__(self, base: nn.Module, module_path: str, ctx: AdapterApplier) -> None:
        super().__init__()
        self.base = base
        self.module_path = module_path
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        self.ctx.apply(self.module_path, x, y)
        return y


def install_adapter_layers(model: LlamaModel, ctx: AdapterApplier) -> int:
    """Wrap every q/k/v/o/gate/up/down projection in an AdapterLinear; returns how many.

    Idempotent: an already wrapped projection gets the new context instead of a second wrapper.
    """
    wrapped = 0
    for path in model.linear_shapes():
        parent_path, name = path.rsplit(".", 1)
        parent = model.get_submodule(parent_path)
        current = getattr(parent, name)
        if isinstance(current, AdapterLinear):
            current.ctx = ctx
        else:
            setattr(parent, name, AdapterLinear(current, path, ctx))
        wrapped += 1
    return wrapped
