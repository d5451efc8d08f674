"""Tolerances for comparing a backend against the float64 reference: one helper per dtype."""

from __future__ import annotations

import torch

# (rtol, atol) relative to the magnitude of the reference output.
_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (4e-3, 4e-3),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return _TOLERANCES[dtype]


def assert_close_for_dtype(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Compare with tolerances scaled by the reference's largest magnitude (sums of many terms)."""
    rtol, atol = tolerance(dtype)
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64),
                               rtol=rtol, atol=atol * scale)
