"""Compact mixed-batch PRoLoRA kernels: batch metadata, the resident-weight pool, backends."""

from .interface import AdapterBackend, AdapterContext, get_backend
from .metadata import NO_ADAPTER, AdapterBatch, build_adapter_batch
from .pool import AdapterWeightPool

__all__ = [
    "NO_ADAPTER",
    "AdapterBackend",
    "AdapterBatch",
    "AdapterContext",
    "AdapterWeightPool",
    "build_adapter_batch",
    "get_backend",
]
