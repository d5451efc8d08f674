"""Random adapters for a given base model: test fixtures and benchmark load."""

from __future__ import annotations

import math

import torch

from .config import AdapterConfigError, LayerSpec, ProLoRAConfig
from .state_dict import LinearShapes
from .weights import CompactAdapter, CompactLinearWeights


def random_adapter(config: ProLoRAConfig, linear_shapes: LinearShapes, seed: int = 0,
                   dtype: torch.dtype = torch.float32, b_std: float = 0.02) -> CompactAdapter:
    """Random compact weights for every base linear the config targets.

    A0/Au follow the paper's rectified init, U(-1/sqrt(h), 1/sqrt(h)); B0/Bu are
    N(0, b_std) instead of zero, so the adapter visibly changes the output. Reproducible
    per ``seed``; modules are drawn in sorted path order.
    """
    generator = torch.Generator().manual_seed(seed)
    paths = sorted(p for p in linear_shapes if config.targets(p))
    if not paths:
        raise AdapterConfigError(f"target_modules {list(config.target_modules)} match no linear "
                                 "layer of the base model")
    modules = {path: _random_module(config.layer_spec(path, *linear_shapes[path]), generator,
                                    dtype, b_std) for path in paths}
    return CompactAdapter(config, modules)


def _random_module(spec: LayerSpec, generator: torch.Generator, dtype: torch.dtype,
                   b_std: float) -> CompactLinearWeights:
    shapes = spec.tensor_shapes()
    bound = 1.0 / math.sqrt(spec.in_features)

    def uniform(name: str) -> torch.Tensor:
        return (torch.rand(shapes[name], generator=generator, dtype=torch.float64) * 2 - 1) * bound

    def normal(name: str) -> torch.Tensor:
        return torch.randn(shapes[name], generator=generator, dtype=torch.float64) * b_std

    tensors = (uniform("prolora_A0"), normal("prolora_B0"), uniform("prolora_Au"), normal("prolora_Bu"))
    return CompactLinearWeights(spec, *(t.to(dtype) for t in tensors))
