"""Dense PEFT LoRA checkpoints <-> compact PRoLoRA adapters.

Import: the PRoLoRA authors' training code saves ordinary dense ``lora_A``/``lora_B``
(a PEFT LoRA directory) whose rows and columns repeat the rotated shared chunks.
``compress_dense_adapter`` recovers A0/B0/Au/Bu for given (u, m, n) and checks that the
structure really holds, refusing weights that only look like it.

Export: ``export_dense`` writes the materialized A/B as a PEFT LoRA adapter that
``peft.PeftModel.from_pretrained`` loads, with the same alpha / r scaling per module.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from .config import PEFT_TYPE_PROLORA, ProLoRAConfig
from .dense import compress, materialize
from .errors import AdapterFormatError
from .format import load_adapter, write_adapter_files
from .peft_config import peft_lora_config_dict
from .state_dict import LinearShapes, tensor_key
from .weights import CompactAdapter, CompactLinearWeights


def compress_dense_adapter(src: str | Path | CompactAdapter, unshared_r: int, reduce_a: int,
                           reduce_b: int, tolerance: float = 1e-4,
                           linear_shapes: LinearShapes | None = None
                           ) -> tuple[CompactAdapter, float]:
    """Compact PRoLoRA form of a dense adapter trained with PRoLoRA structure.

    Returns the adapter and the worst relative deviation ``max|W - rebuilt| / max|W|``
    over every module's A and B. Raises ``AdapterFormatError`` naming the worst tensor when
    that exceeds ``tolerance``: the weights do not have the structure for (u, m, n).
    """
    source = src if isinstance(src, CompactAdapter) else load_adapter(src, linear_shapes)
    config = _prolora_config(source.config, unshared_r, reduce_a, reduce_b)
    modules, worst, worst_key = {}, 0.0, ""
    for path, weights in sorted(source.modules.items()):
        compact, deviations = _compress_module(config, path, weights)
        modules[path] = compact
        for name, deviation in deviations.items():
            if deviation > worst:
                worst, worst_key = deviation, tensor_key(path, name, lora=True)
    if worst > tolerance:
        raise AdapterFormatError(
            f"tensor {worst_key!r} does not have the PRoLoRA structure for unshared_r="
            f"{unshared_r}, reduce_lora_A_x={reduce_a}, reduce_lora_B_x={reduce_b}: relative "
            f"deviation {worst:.3g} exceeds tolerance {tolerance:.3g} (the worst module)")
    return CompactAdapter(config, modules), worst


def export_dense(adapter: CompactAdapter, dst: str | Path, single_file: bool = False) -> None:
    """Write a PEFT LoRA adapter (dense A/B); a directory unless ``single_file``."""
    write_adapter_files(dst, dense_state_dict(adapter), peft_lora_config_dict(adapter.config),
                        adapter.linear_shapes(), single_file)


def dense_state_dict(adapter: CompactAdapter) -> dict[str, torch.Tensor]:
    """PEFT LoRA keys -> materialized dense A (r, h) and B (o, r) of every module."""
    if not adapter.modules:
        raise AdapterFormatError("adapter has no modules: nothing to export")
    tensors = {}
    for path, weights in sorted(adapter.modules.items()):
        dense_a, dense_b = materialize(weights)
        tensors[tensor_key(path, "prolora_Au", lora=True)] = dense_a.contiguous().clone()
        tensors[tensor_key(path, "prolora_Bu", lora=True)] = dense_b.contiguous().clone()
    return tensors


def _prolora_config(config: ProLoRAConfig, unshared_r: int, reduce_a: int,
                    reduce_b: int) -> ProLoRAConfig:
    return replace(config, peft_type=PEFT_TYPE_PROLORA, unshared_r=unshared_r,
                   reduce_lora_A_x=reduce_a, reduce_lora_B_x=reduce_b)


def _compress_module(config: ProLoRAConfig, path: str, weights: CompactLinearWeights
                     ) -> tuple[CompactLinearWeights, dict[str, float]]:
    spec = config.layer_spec(path, weights.spec.in_features, weights.spec.out_features)
    dense_a, dense_b = materialize(weights)
    compact = compress(dense_a, dense_b, spec).weights
    rebuilt_a, rebuilt_b = materialize(compact.to(dtype=torch.float64))
    deviations = {"prolora_Au": _relative_deviation(dense_a, rebuilt_a),
                  "prolora_Bu": _relative_deviation(dense_b, rebuilt_b)}
    return compact, deviations


def _relative_deviation(original: torch.Tensor, rebuilt: torch.Tensor) -> float:
    original = original.to(torch.float64)
    deviation = (original - rebuilt).abs().max().item()
    magnitude = original.abs().max().item()
    return deviation / magnitude if magnitude > 0 else deviation
