"""PRoLoRA hyper-parameters: the adapter-level config and the per-layer spec derived from it.

Names follow the authors' code (Forence1999/PRoLoRA): ``r``, ``unshared_r`` (u),
``reduce_lora_A_x`` (m), ``reduce_lora_B_x`` (n), ``lora_alpha``. A plain LoRA adapter is
the special case ``unshared_r == r`` (no shared ranks). The math is docs/prolora-math.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

PEFT_TYPE_PROLORA = "PROLORA"
PEFT_TYPE_LORA = "LORA"


class AdapterConfigError(ValueError):
    """An adapter config is inconsistent or names something that does not exist."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise AdapterConfigError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class LayerSpec:
    """Resolved PRoLoRA hyper-parameters and dimensions for one adapted linear layer."""

    in_features: int  # h
    out_features: int  # o
    r: int
    unshared_r: int  # u
    reduce_a: int  # m
    reduce_b: int  # n
    alpha: float

    def __post_init__(self) -> None:
        for name in ("in_features", "out_features", "r", "reduce_a", "reduce_b"):
            _require(_is_int(getattr(self, name)) and getattr(self, name) >= 1,
                     f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        _require(_is_int(self.unshared_r) and 0 <= self.unshared_r <= self.r,
                 f"unshared_r must be an integer in [0, r={self.r}], got {self.unshared_r!r}")
        _require(isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha),
                 f"lora_alpha must be a finite number, got {self.alpha!r}")

    @property
    def shared_r(self) -> int:  # R = r - u
        return self.r - self.unshared_r

    @property
    def chunk_a(self) -> int:  # cA = ceil(h / m)
        return -(-self.in_features // self.reduce_a)

    @property
    def chunk_b(self) -> int:  # cB = ceil(o / n)
        return -(-self.out_features // self.reduce_b)

    @property
    def stride_a(self) -> int:  # sA = max(floor(R / m), 1)
        return max(self.shared_r // self.reduce_a, 1)

    @property
    def stride_b(self) -> int:  # sB = max(floor(R / n), 1)
        return max(self.shared_r // self.reduce_b, 1)

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.r

    @property
    def shape_key(self) -> tuple[int, int, int, int, int, int]:
        """Everything that fixes tensor shapes and rotation tables (not alpha)."""
        return (self.in_features, self.out_features, self.r, self.unshared_r,
                self.reduce_a, self.reduce_b)

    def tensor_shapes(self) -> dict[str, tuple[int, int]]:
        """Shapes of the four compact tensors (some may have a zero dimension)."""
        shared, u = self.shared_r, self.unshared_r
        return {
            "prolora_A0": (shared, self.chunk_a),
            "prolora_B0": (self.chunk_b, shared),
            "prolora_Au": (u, self.in_features),
            "prolora_Bu": (self.out_features, u),
        }

    @property
    def num_params(self) -> int:
        """R*ceil(h/m) + R*ceil(o/n) + u*(h+o)."""
        return sum(a * b for a, b in self.tensor_shapes().values())

    @property
    def lora_equivalent_params(self) -> int:
        """Parameters a plain LoRA of the same total rank would store."""
        return self.r * (self.in_features + self.out_features)


@dataclass(frozen=True)
class ProLoRAConfig:
    """The adapter_config.json of a PRoLoRA (or plain LoRA) adapter."""

    r: int
    unshared_r: int
    reduce_lora_A_x: int
    reduce_lora_B_x: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    peft_type: str = PEFT_TYPE_PROLORA
    base_model_name_or_path: str | None = None
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(self.peft_type in (PEFT_TYPE_PROLORA, PEFT_TYPE_LORA),
                 f"peft_type must be {PEFT_TYPE_PROLORA!r} or {PEFT_TYPE_LORA!r}, got {self.peft_type!r}")
        _require(isinstance(self.target_modules, tuple) and len(self.target_modules) > 0
                 and all(isinstance(t, str) and t for t in self.target_modules),
                 "target_modules must be a non-empty list of module names")
        for key, rank in self.rank_pattern.items():
            _require(_is_int(rank) and rank >= 1, f"rank_pattern[{key!r}] must be an integer >= 1")
        for key, alpha in self.alpha_pattern.items():
            _require(isinstance(alpha, (int, float)), f"alpha_pattern[{key!r}] must be a number")
        # Validate the defaults by building one spec (dimensions are placeholders).
        LayerSpec(1, 1, self.r, self.unshared_r, self.reduce_lora_A_x, self.reduce_lora_B_x,
                  self.lora_alpha)

    @property
    def is_plain_lora(self) -> bool:
        return self.peft_type == PEFT_TYPE_LORA

    def targets(self, module_path: str) -> bool:
        """Whether a module path such as ``model.layers.0.self_attn.q_proj`` is adapted.

        PEFT semantics: an entry matches the path exactly or as a dotted suffix
        (``q_proj``, ``self_attn.q_proj`` or the full path).
        """
        return any(module_path == target or module_path.endswith("." + target)
                   for target in self.target_modules)

    def _pattern_value(self, pattern: Mapping[str, Any], module_path: str) -> Any:
        # PEFT semantics: a key matches the module path exactly or as a dotted suffix.
        for key, value in pattern.items():
            if module_path == key or module_path.endswith("." + key):
                return value
        return None

    def layer_spec(self, module_path: str, in_features: int, out_features: int) -> LayerSpec:
        rank = self._pattern_value(self.rank_pattern, module_path) or self.r
        alpha = self._pattern_value(self.alpha_pattern, module_path)
        unshared = rank if self.is_plain_lora else self.unshared_r
        try:
            return LayerSpec(in_features, out_features, rank, unshared, self.reduce_lora_A_x,
                             self.reduce_lora_B_x, self.lora_alpha if alpha is None else alpha)
        except AdapterConfigError as err:
            raise AdapterConfigError(f"{module_path}: {err}") from None

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "peft_type": self.peft_type,
            "r": self.r,
            "unshared_r": self.unshared_r,
            "reduce_lora_A_x": self.reduce_lora_A_x,
            "reduce_lora_B_x": self.reduce_lora_B_x,
            "lora_alpha": self.lora_alpha,
            "target_modules": list(self.target_modules),
            "base_model_name_or_path": self.base_model_name_or_path,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
        }

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> "ProLoRAConfig":
        """Parse a PRoLoRA or PEFT LoRA config dict; LoRA maps to u = r, m = n = 1."""
        _require(isinstance(data, Mapping), "adapter config must be a JSON object")
        peft_type = str(data.get("peft_type", PEFT_TYPE_PROLORA)).upper()
        _require("r" in data, "adapter config is missing 'r'")
        targets = data.get("target_modules")
        if isinstance(targets, str):
            targets = [targets]
        _require(isinstance(targets, (list, tuple)), "adapter config needs 'target_modules' as a list")
        rank = data["r"]
        lora = peft_type == PEFT_TYPE_LORA
        return cls(
            r=rank,
            unshared_r=rank if lora else data.get("unshared_r", 0),
            reduce_lora_A_x=1 if lora else data.get("reduce_lora_A_x", 1),
            reduce_lora_B_x=1 if lora else data.get("reduce_lora_B_x", 1),
            lora_alpha=data.get("lora_alpha", rank),
            target_modules=tuple(targets),
            peft_type=peft_type,
            base_model_name_or_path=data.get("base_model_name_or_path"),
            rank_pattern=dict(data.get("rank_pattern") or {}),
            alpha_pattern=dict(data.get("alpha_pattern") or {}),
        )
