"""Float32 linears on the CPU through oneDNN with the weight reordered once (a module swap).

torch's float32 ``F.linear`` on the CPU calls MKL's sgemm. oneDNN with the weight packed once
into its blocked layout ran the shapes of a decode step 1.3-2.7x faster on the development
machine (AMD EPYC with AVX-512; SmolLM2's 49152 x 576 output layer at 32 rows: 28.2 -> 10.5 ms;
``python -m prolora_serve.server.engine.bench_model``). The arithmetic is the same float32,
summed in another order. The packed copy replaces the linear's weight; a tied output layer keeps
the embedding's dense matrix for lookups, so packing it costs one more copy of that matrix.

The two ops are the ones torch's own CPU compiler (inductor) emits for packed linears.
"""

from __future__ import annotations

import torch
from torch import nn


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """``y = x W^T + b`` with W (out, in) float32 held in oneDNN's layout (opaque, CPU only)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach()
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            raise TypeError(f"PackedLinear packs float32 CPU weights, not {weight.dtype} on {weight.device}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # A plain attribute, not a buffer: module-wide moves and casts must not touch it.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)
        self.bias = linear.bias

    @property
    def nbytes(self) -> int:
        return self.in_features * self.out_features * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous()
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-packed"


def pack_float32_linears(model: nn.Module, paths: list[str]) -> int:
    """Swap the float32 CPU ``nn.Linear`` modules at ``paths`` for PackedLinear; returns how many
    (none where oneDNN is unavailable: the plain modules compute the same)."""
    if not packing_available():
        return 0
    swapped = 0
    for path in paths:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        module = getattr(parent, name)
        if (type(module) is nn.Linear and module.weight.dtype == torch.float32
                and module.weight.device.type == "cpu"):
            setattr(parent, name, PackedLinear(module))
            swapped += 1
    return swapped
