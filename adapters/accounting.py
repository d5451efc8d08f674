"""Parameters and bytes of compact adapters (and of the base they sit next to), from a model config.

Counts come from ``LayerSpec.num_params`` for every adapted linear of a LLaMA-architecture
model, so they are exactly what this server keeps resident per adapter: the compact
A0/B0/Au/Bu tensors, no materialized A/B and no per-adapter padding (residency overhead 0).

Memory units: the calculator speaks GiB (2**30 bytes). GPU "80 GB" cards carry 80 GiB and
the paper's Table 1 sizes are MiB (LoRA r=16 on LLaMA2-7B: 153 MiB at fp32).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .config import PEFT_TYPE_LORA, PEFT_TYPE_PROLORA, LayerSpec, ProLoRAConfig

GIB = 1 << 30
MIB = 1 << 20

# The seven projections of a LLaMA decoder layer and the submodule that holds each.
PROJECTIONS: dict[str, str] = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}
ALL_TARGETS: tuple[str, ...] = tuple(PROJECTIONS)

ADAPTER_DTYPE_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2}
WEIGHT_DTYPES: tuple[str, ...] = ("nf4", "int8", "bf16", "fp16", "fp32")
NF4_BLOCK = 64  # bitsandbytes Params4bit default blocksize: one float32 absmax per block


class AccountingError(ValueError):
    """A model config or an accounting request is unusable."""


def _field(config: Mapping[str, Any] | object, key: str) -> Any:
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None)


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a LLaMA-architecture model that fix its linear shapes."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int = 0  # 0 = unknown: base bytes then leave out the embeddings
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise AccountingError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.vocab_size, int) or self.vocab_size < 0:
            raise AccountingError(f"vocab_size must be an integer >= 0, got {self.vocab_size!r}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | object) -> "ModelShape":
        """From a ``LlamaConfig``-like object or a config.json dict (head_dim, kv heads optional)."""
        hidden, heads = _field(config, "hidden_size"), _field(config, "num_attention_heads")
        if not isinstance(hidden, int) or not isinstance(heads, int) or heads < 1:
            raise AccountingError("model config needs integer hidden_size and num_attention_heads")
        return cls(
            hidden_size=hidden,
            intermediate_size=_field(config, "intermediate_size"),
            num_hidden_layers=_field(config, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=_field(config, "num_key_value_heads") or heads,
            head_dim=_field(config, "head_dim") or hidden // heads,
            vocab_size=_field(config, "vocab_size") or 0,
            tie_word_embeddings=bool(_field(config, "tie_word_embeddings")),
        )

    @classmethod
    def from_model_dir(cls, directory: str | Path) -> "ModelShape":
        """From the ``config.json`` of a Hugging Face model directory (no weights are read)."""
        path = Path(directory) / "config.json"
        try:
            config = json.loads(path.read_text())
        except OSError as err:
            raise AccountingError(f"{path}: cannot read the model config "
                                  f"({err.strerror or err})") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise AccountingError(f"{path}: invalid JSON ({err})") from None
        if not isinstance(config, dict):
            raise AccountingError(f"{path}: the model config must be a JSON object")
        try:
            return cls.from_config(config)
        except AccountingError as err:
            raise AccountingError(f"{path}: {err}") from None

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each projection of one layer; k/v follow GQA."""
        h, inter = self.hidden_size, self.intermediate_size
        q_out, kv_out = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        return {
            "q_proj": (h, q_out), "k_proj": (h, kv_out), "v_proj": (h, kv_out), "o_proj": (q_out, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h),
        }

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Every decoder linear by its Hugging Face module path."""
        per_layer = self.projection_shapes()
        return {f"model.layers.{layer}.{PROJECTIONS[name]}.{name}": shape
                for layer in range(self.num_hidden_layers) for name, shape in per_layer.items()}


@dataclass(frozen=True)
class AdapterVariant:
    """The shape-fixing hyper-parameters of an adapter: LoRA when ``unshared_r == r``."""

    r: int
    unshared_r: int
    reduce_a: int = 1
    reduce_b: int = 1

    def __post_init__(self) -> None:
        LayerSpec(1, 1, self.r, self.unshared_r, self.reduce_a, self.reduce_b, 1.0)

    @property
    def is_lora(self) -> bool:
        return self.unshared_r == self.r  # no shared ranks: m and n change nothing

    @property
    def kind(self) -> str:
        return "lora" if self.is_lora else "prolora"

    @property
    def id(self) -> str:
        if self.is_lora:
            return f"lora-r{self.r}"
        return f"prolora-r{self.r}-u{self.unshared_r}-m{self.reduce_a}-n{self.reduce_b}"

    @property
    def label(self) -> str:
        if self.is_lora:
            return f"LoRA r={self.r}"
        sharing = (f"m=n={self.reduce_a}" if self.reduce_a == self.reduce_b
                   else f"m={self.reduce_a} n={self.reduce_b}")
        return f"PRoLoRA r={self.r} u={self.unshared_r} {sharing}"

    def config(self, target_modules: tuple[str, ...] = ALL_TARGETS) -> ProLoRAConfig:
        if self.is_lora:
            return ProLoRAConfig(self.r, self.r, 1, 1, float(self.r), target_modules, PEFT_TYPE_LORA)
        return ProLoRAConfig(self.r, self.unshared_r, self.reduce_a, self.reduce_b, float(self.r),
                             target_modules, PEFT_TYPE_PROLORA)


def lora(r: int) -> AdapterVariant:
    return AdapterVariant(r, r)


# The rows of the paper's Table 1, and its Table 2 equal-quality pairing on LLaMA2-7B:
# PRoLoRA (r=32, u=4, m=n=7, about 20M params) matches or beats LoRA r=16 (39.98M).
PAPER_VARIANTS: tuple[AdapterVariant, ...] = (
    lora(2), lora(8), lora(16), lora(64), AdapterVariant(8, 1, 7, 7), AdapterVariant(32, 4, 7, 7),
)
EQUAL_QUALITY_PAIR: tuple[AdapterVariant, AdapterVariant] = (AdapterVariant(32, 4, 7, 7), lora(16))


def adapter_num_params(shape: ModelShape, config: ProLoRAConfig) -> int:
    """Compact parameters of ``config`` on every targeted linear of ``shape``."""
    return sum(config.layer_spec(path, h, o).num_params
               for path, (h, o) in shape.linear_shapes().items() if config.targets(path))


def dtype_bytes(dtype: str) -> int:
    if dtype not in ADAPTER_DTYPE_BYTES:
        raise AccountingError(f"adapter dtype must be one of {', '.join(ADAPTER_DTYPE_BYTES)}, got {dtype!r}")
    return ADAPTER_DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class AdapterFootprint:
    """What one resident adapter of ``variant`` costs on a model, in a storage dtype."""

    variant: AdapterVariant
    num_params: int
    nbytes: int
    dtype: str


def footprint(shape: ModelShape, variant: AdapterVariant, dtype: str = "fp32",
              target_modules: tuple[str, ...] = ALL_TARGETS) -> AdapterFootprint:
    params = adapter_num_params(shape, variant.config(target_modules))
    return AdapterFootprint(variant, params, params * dtype_bytes(dtype), dtype)


def adapters_that_fit(memory_bytes: int, per_adapter_bytes: int) -> int:
    """floor(memory / per-adapter bytes); no memory (or less than none) fits none."""
    if per_adapter_bytes <= 0:
        raise AccountingError("an adapter must occupy at least one byte")
    return max(int(memory_bytes), 0) // per_adapter_bytes


def linear_weight_bytes(num_weights: int, out_features: int, weight_dtype: str) -> int:
    if weight_dtype == "nf4":  # two 4-bit codes per byte + a float32 absmax per block
        return -(-num_weights // 2) + 4 * -(-num_weights // NF4_BLOCK)
    if weight_dtype == "int8":  # LLM.int8: int8 codes + a float32 scale per output row
        return num_weights + 4 * out_features
    if weight_dtype in ("bf16", "fp16"):
        return 2 * num_weights
    if weight_dtype == "fp32":
        return 4 * num_weights
    raise AccountingError(f"weight dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {weight_dtype!r}")


def _unquantized_params(shape: ModelShape) -> int:
    """Embeddings, untied lm_head and RMSNorm weights: never quantized."""
    embeddings = shape.vocab_size * shape.hidden_size * (1 if shape.tie_word_embeddings else 2)
    norms = (2 * shape.num_hidden_layers + 1) * shape.hidden_size
    return embeddings + norms


def base_model_num_params(shape: ModelShape) -> int:
    linear = sum(h * o for h, o in shape.linear_shapes().values())
    return linear + _unquantized_params(shape)


def base_model_nbytes(shape: ModelShape, weight_dtype: str = "nf4") -> int:
    """Weight bytes of the base: linears in ``weight_dtype`` (nf4 = blocksize 64, float32
    absmax, no double quantization), the rest in 16 bits (32 for fp32)."""
    per_layer = sum(linear_weight_bytes(h * o, o, weight_dtype)
                    for h, o in shape.projection_shapes().values())
    rest_bytes = 4 if weight_dtype == "fp32" else 2
    return per_layer * shape.num_hidden_layers + rest_bytes * _unquantized_params(shape)


def kv_cache_bytes_per_token(shape: ModelShape, element_bytes: int = 2) -> int:
    """Keys and values of one token over all layers."""
    return 2 * shape.num_hidden_layers * shape.num_key_value_heads * shape.head_dim * element_bytes


def gib_to_bytes(gib: float) -> int:
    if not math.isfinite(gib) or gib < 0:
        raise AccountingError(f"memory must be a finite number >= 0 GiB, got {gib!r}")
    return int(gib * GIB)
