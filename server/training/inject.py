"""Module swap: put ProLoRALinear layers into a Hugging Face causal LM and take adapters out."""

from __future__ import annotations

import torch
from torch import nn

from prolora_serve.adapters.config import AdapterConfigError, ProLoRAConfig
from prolora_serve.adapters.weights import CompactAdapter

from .layers import ProLoRALinear


def _targeted_linears(model: nn.Module, config: ProLoRAConfig) -> list[tuple[str, nn.Linear]]:
    # bitsandbytes Linear4bit / Linear8bitLt subclass nn.Linear, so quantized bases match too.
    found = [(path, module) for path, module in model.named_modules()
             if isinstance(module, nn.Linear) and config.targets(path)]
    if not found:
        raise AdapterConfigError(f"no linear layer of the model matches target_modules "
                                 f"{list(config.target_modules)}")
    return found


def inject_prolora(model: nn.Module, config: ProLoRAConfig, dropout: float = 0.0,
                   dtype: torch.dtype = torch.float32) -> dict[str, ProLoRALinear]:
    """Freeze every base parameter, then swap each targeted linear for a freshly initialized
    ProLoRALinear. Returns the new layers keyed by their Hugging Face module path."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    layers: dict[str, ProLoRALinear] = {}
    for path, base in _targeted_linears(model, config):
        spec = config.layer_spec(path, base.in_features, base.out_features)
        layers[path] = ProLoRALinear(base, spec, dropout, dtype)
        model.set_submodule(path, layers[path])
    return layers


def prolora_layers(model: nn.Module) -> dict[str, ProLoRALinear]:
    return {path: m for path, m in model.named_modules() if isinstance(m, ProLoRALinear)}


def extract_adapter(model: nn.Module, config: ProLoRAConfig) -> CompactAdapter:
    """The trained compact weights of every injected layer, as a CPU CompactAdapter."""
    modules = {path: layer.compact_weights() for path, layer in prolora_layers(model).items()}
    if not modules:
        raise ValueError("the model has no ProLoRALinear layers")
    return CompactAdapter(config, modules)


def attach_adapter(model: nn.Module, adapter: CompactAdapter,
                   dtype: torch.dtype = torch.float32) -> dict[str, ProLoRALinear]:
    """Inject layers for ``adapter.config`` and load its weights (for evaluation)."""
    layers = inject_prolora(model, adapter.config, 0.0, dtype)
    missing = sorted(set(layers) - set(adapter.modules))
    extra = sorted(set(adapter.modules) - set(layers))
    if missing or extra:
        raise AdapterConfigError(f"adapter modules do not match the model: missing {missing[:3]}, "
                                 f"unknown {extra[:3]}")
    for path, layer in layers.items():
        layer.load_compact_weights(adapter.modules[path])
    return layers


def detach_adapters(model: nn.Module) -> None:
    """Undo the swap: put every ProLoRALinear's base layer back in its place."""
    for path, layer in prolora_layers(model).items():
        model.set_submodule(path, layer.base)
