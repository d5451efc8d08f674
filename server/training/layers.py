"""The trainable PRoLoRA layer: a frozen base linear plus the compact A0/B0/Au/Bu parameters.

The forward is the compact apply of docs/prolora-math.md written in differentiable torch: it
never builds the dense A (r, h) or B (o, r), so gradients land directly on the compact tensors
and each shared chunk receives the sum of the gradients of every position it is broadcast to.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from prolora_serve.adapters.config import LayerSpec
from prolora_serve.adapters.dense import rotation_index_a, rotation_index_b
from prolora_serve.adapters.weights import CompactLinearWeights


def shared_index_tables(spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather tables for the shared part: A-side (m, R) and the inverse B-side rotation (n, R).

    ``z[k] = sum_i Y[i, index_a[i, k]]`` reads the rotated chunks of A; chunk i of the B output
    is ``B0 @ z[index_b_inv[i]]`` because dense column k of chunk i is B0 column (k + i*sB) mod R.
    """
    index_b = rotation_index_b(spec)  # each row is a permutation of range(R)
    return rotation_index_a(spec), torch.argsort(index_b, dim=1)


def compact_shared_apply(x: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor, spec: LayerSpec,
                         index_a: torch.Tensor, index_b_inv: torch.Tensor) -> torch.Tensor:
    """``B_shared @ (A_shared @ x)`` for rows x (..., h) from the chunks A0 (R, cA), B0 (cB, R)."""
    lead = x.shape[:-1]
    pad = spec.reduce_a * spec.chunk_a - spec.in_features
    chunks = nn.functional.pad(x, (0, pad)).view(*lead, spec.reduce_a, spec.chunk_a)
    per_chunk = chunks @ a0.T  # (..., m, R)
    gather_a = index_a.expand(*lead, -1, -1)
    z = per_chunk.gather(-1, gather_a).sum(dim=-2)  # (..., R)
    rotated = z[..., index_b_inv]  # (..., n, R)
    out = (rotated @ b0.T).reshape(*lead, spec.reduce_b * spec.chunk_b)
    return out[..., : spec.out_features]


def rectified_uniform_(tensor: torch.Tensor, full_in_features: int) -> torch.Tensor:
    """Kaiming uniform (a = sqrt(5)) with the fan-in of the FULL matrix A: U(-1/sqrt(h), 1/sqrt(h))."""
    gain = nn.init.calculate_gain("leaky_relu", math.sqrt(5))
    bound = gain * math.sqrt(3.0 / full_in_features)
    with torch.no_grad():
        return tensor.uniform_(-bound, bound)


class ProLoRALinear(nn.Module):
    """``y = base(x) + (alpha / r) * B (A dropout(x))`` with A, B in compact PRoLoRA form."""

    def __init__(self, base: nn.Module, spec: LayerSpec, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"adapter dropout must be in [0, 1), got {dropout}")
        self.base = base
        self.spec = spec
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = _weight_device(base)
        shapes = spec.tensor_shapes()
        for name, shape in shapes.items():
            setattr(self, name, nn.Parameter(torch.zeros(shape, dtype=dtype, device=device)))
        index_a, index_b_inv = shared_index_tables(spec)
        self.register_buffer("index_a", index_a.to(device), persistent=False)
        self.register_buffer("index_b_inv", index_b_inv.to(device), persistent=False)
        self.reset_adapter_parameters()

    def reset_adapter_parameters(self) -> None:
        """Rectified init: A0 and Au share the bound of the full A; B0 and Bu start at zero."""
        rectified_uniform_(self.prolora_A0, self.spec.in_features)
        rectified_uniform_(self.prolora_Au, self.spec.in_features)
        nn.init.zeros_(self.prolora_B0)
        nn.init.zeros_(self.prolora_Bu)

    def adapter_delta(self, x: torch.Tensor) -> torch.Tensor:
        """``(alpha / r) * B A x`` for rows x (..., h), computed from the compact tensors."""
        spec = self.spec
        x = x.to(self.prolora_A0.dtype)
        parts = []  # r >= 1, so at least one of the two is present
        if spec.shared_r:
            parts.append(compact_shared_apply(x, self.prolora_A0, self.prolora_B0, spec,
                                              self.index_a, self.index_b_inv))
        if spec.unshared_r:
            parts.append((x @ self.prolora_Au.T) @ self.prolora_Bu.T)
        return sum(parts[1:], parts[0]) * spec.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + self.adapter_delta(self.dropout(x)).to(y.dtype)

    def compact_weights(self) -> CompactLinearWeights:
        """A detached copy of the trained tensors, in the shared in-memory adapter type."""
        tensors = (self.prolora_A0, self.prolora_B0, self.prolora_Au, self.prolora_Bu)
        return CompactLinearWeights(self.spec, *(t.detach().cpu().clone() for t in tensors))

    @torch.no_grad()
    def load_compact_weights(self, weights: CompactLinearWeights) -> None:
        if weights.spec.shape_key != self.spec.shape_key:
            raise ValueError(f"adapter shapes {weights.spec.shape_key} do not match the layer's "
                             f"{self.spec.shape_key}")
        self.spec = weights.spec  # alpha may differ
        for name, tensor in zip(("prolora_A0", "prolora_B0", "prolora_Au", "prolora_Bu"),
                                weights.tensors()):
            getattr(self, name).copy_(tensor)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"in={s.in_features}, out={s.out_features}, r={s.r}, u={s.unshared_r}, "
                f"m={s.reduce_a}, n={s.reduce_b}, alpha={s.alpha}")


def _weight_device(base: nn.Module) -> torch.device:
    weight = getattr(base, "weight", None)
    return weight.device if weight is not None else torch.device("cpu")
