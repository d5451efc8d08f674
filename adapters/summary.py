"""A JSON-ready description of an adapter: config, per-module specs, parameters and bytes."""

from __future__ import annotations

import re
from typing import Any

import torch

from .config import LayerSpec
from .weights import CompactAdapter


def summarize_adapter(adapter: CompactAdapter) -> dict[str, Any]:
    """What ``prolora-serve adapters inspect`` prints (layer indices folded into ``*``)."""
    num_params = adapter.num_params
    lora_params = sum(w.spec.lora_equivalent_params for w in adapter.modules.values())
    return {
        "config": adapter.config.to_json_dict(),
        "num_modules": len(adapter.modules),
        "modules": _module_groups(adapter),
        "num_params": num_params,
        "lora_equivalent_params": lora_params,
        "params_vs_lora": num_params / lora_params if lora_params else None,
        "dtypes": sorted({_dtype_name(t.dtype) for w in adapter.modules.values() for t in w.tensors()}),
        "bytes": {"stored": adapter.nbytes, "fp32": 4 * num_params, "bf16": 2 * num_params},
    }


def _module_groups(adapter: CompactAdapter) -> list[dict[str, Any]]:
    groups: dict[tuple[str, LayerSpec], int] = {}
    for path, weights in sorted(adapter.modules.items()):
        key = (re.sub(r"\.\d+(?=\.|$)", ".*", path), weights.spec)
        groups[key] = groups.get(key, 0) + 1
    return [_spec_summary(pattern, spec, count) for (pattern, spec), count in groups.items()]


def _spec_summary(pattern: str, spec: LayerSpec, count: int) -> dict[str, Any]:
    return {
        "modules": pattern,
        "count": count,
        "in_features": spec.in_features,
        "out_features": spec.out_features,
        "r": spec.r,
        "unshared_r": spec.unshared_r,
        "reduce_lora_A_x": spec.reduce_a,
        "reduce_lora_B_x": spec.reduce_b,
        "lora_alpha": spec.alpha,
        "scale": spec.scale,
        "tensor_shapes": {name: list(shape) for name, shape in spec.tensor_shapes().items()},
        "params_per_module": spec.num_params,
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
