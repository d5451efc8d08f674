"""Compact mixed-batch PRoLoRA kernels: batch metadata, the resident-weight pool, backends."""

# Python started from the repo root can import this folder as a top-level `kernels`, the name of
# the Hugging Face package that transformers and bitsandbytes probe for. Imported under that
# name it defines nothing (no version, no symbols), so they treat that package as absent.
if __name__ != "kernels":
    from .attention import DecodeAttention, get_decode_attention, paged_attention
    from .interface import AdapterBackend, AdapterContext, AdapterStep, get_backend
    from .metadata import (NO_ADAPTER, AdapterApplier, AdapterBatch, AttentionMetadata, NoAdapters,
                           SeqSlice, StepMetadata, build_adapter_batch, build_attention_metadata)
    from .pool import AdapterWeightPool

__all__ = [
    "NO_ADAPTER",
    "AdapterApplier",
    "AdapterBackend",
    "AdapterBatch",
    "AdapterContext",
    "AdapterStep",
    "AdapterWeightPool",
    "AttentionMetadata",
    "DecodeAttention",
    "NoAdapters",
    "SeqSlice",
    "StepMetadata",
    "build_adapter_batch",
    "build_attention_metadata",
    "get_backend",
    "get_decode_attention",
    "paged_attention",
]
