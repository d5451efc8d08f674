"""A compact LLaMA forward over flattened mixed batches with a paged KV cache (gpt-fast style).

Attribute names mirror Hugging Face's ``LlamaForCausalLM`` so its safetensors load by name and
module paths (``model.layers.0.self_attn.q_proj``) are the ones adapters are keyed by.

The forward takes the step's one value, ``StepMetadata``: its attention metadata for the paged
KV cache and its adapter applier. Every projection is ``project(layer, x, step)``: the base layer
(float, NF4 or int8, swapped in by ``quantize.py``) plus each row's adapter delta, unmerged;
projections that share an input (q, k, v; gate, up) go through ``project_shared``, one adapter
call for all of them. A base-only step carries ``NoAdapters``, so the model never branches on
adapters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig

from ...kernels import StepMetadata, paged_attention
from .kv_cache import KVCache
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


def module_paths(layer_idx: int, block: str, names: tuple[str, ...]) -> tuple[str, ...]:
    """Checkpoint paths of a layer's projections: the keys adapters are stored under."""
    return tuple(f"model.layers.{layer_idx}.{block}.{name}" for name in names)


def project(layer: nn.Module, path: str, x: torch.Tensor, step: StepMetadata) -> torch.Tensor:
    """A projection of the step: its base layer, then each row's adapter delta added in place."""
    y = layer(x)
    step.adapters.apply(path, x, y)
    return y


def project_shared(layers: tuple[nn.Module, ...], paths: tuple[str, ...], x: torch.Tensor,
                   step: StepMetadata) -> list[torch.Tensor]:
    """Projections that read the same input (q, k, v; gate, up): their base layers, then all
    their adapter deltas in one call (one kernel launch on the CPU instead of one each)."""
    outputs = [layer(x) for layer in layers]
    step.adapters.apply_many(paths, x, outputs)
    return outputs


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
        self.paths = module_paths(layer_idx, "self_attn", ("q_proj", "k_proj", "v_proj", "o_proj"))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                step: StepMetadata, kv: KVCache) -> torch.Tensor:
        tokens, o_path = x.shape[0], self.paths[3]
        q, k, v = project_shared((self.q_proj, self.k_proj, self.v_proj), self.paths[:3], x, step)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        out = paged_attention(q, k, v, kv.keys[self.layer_idx], kv.values[self.layer_idx],
                              step.attention, self.scale, kv.decode_attention)
        return project(self.o_proj, o_path, out.reshape(tokens, -1), step)


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)
        self.paths = module_paths(layer_idx, "mlp", ("gate_proj", "up_proj", "down_proj"))

    def forward(self, x: torch.Tensor, step: StepMetadata) -> torch.Tensor:
        gate, up = project_shared((self.gate_proj, self.up_proj), self.paths[:2], x, step)
        return project(self.down_proj, self.paths[2], F.silu(gate) * up, step)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                step: StepMetadata, kv: KVCache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, step, kv)
        return x + self.mlp(self.post_attention_layernorm(x), step)


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
    """``model(input_ids (T,), positions (T,), step, kv) -> hidden (T, hidden_size)``."""

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

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, step: StepMetadata,
                kv: KVCache) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        rope = self.model.rotary_emb(positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, rope, step, kv)
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
