"""Compact mixed-batch PRoLoRA kernels: batch metadata, the resident-weight pool, backends."""

# Python started from the repo root can import this folder as a top-level `kernels`, the name of
# the Hugging Face package that transformers and bitsandbytes probe for. Imported under that
# name it defines nothing (no version, no symbols), so they treat that package as absent.
if __name__ != "kernels":
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
