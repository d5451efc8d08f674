"""The one interface the model calls: a backend chosen once, applied per adapted linear layer."""

from __future__ import annotations

import logging
from typing import Protocol, Sequence

import torch

from .metadata import AdapterBatch
from .pool import AdapterWeightPool

BACKEND_NAMES = ("auto", "cpu", "torch", "triton", "reference")
CPU_KERNEL_ACTIVATIONS = (torch.float32, torch.bfloat16, torch.float16)  # cpu_backend.py
log = logging.getLogger(__name__)


class AdapterBackend(Protocol):
    name: str

    def apply(self, y: torch.Tensor, x: torch.Tensor, pool: AdapterWeightPool, module_path: str,
              batch: AdapterBatch) -> None:
        """y[t] += scale_a * delta_a(x[t]) in place for every row t whose slot a targets the module."""

    def apply_many(self, ys: Sequence[torch.Tensor], x: torch.Tensor, pool: AdapterWeightPool,
                   module_paths: Sequence[str], batch: AdapterBatch) -> None:
        """``apply`` for several modules that read the same ``x`` (q, k, v; gate, up)."""


class OneModuleAtATime:
    """``apply_many`` as one ``apply`` per module: for backends without a fused form."""

    def apply_many(self, ys: Sequence[torch.Tensor], x: torch.Tensor, pool: AdapterWeightPool,
                   module_paths: Sequence[str], batch: AdapterBatch) -> None:
        for y, path in zip(ys, module_paths, strict=True):
            self.apply(y, x, pool, path, batch)  # type: ignore[attr-defined]


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def get_backend(name: str = "auto", device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> AdapterBackend:
    """Pick the backend once: Triton on CUDA devices, the fused C++ path on the CPU for float32,
    bfloat16 and float16 activations (the torch path for other dtypes, or where no compiler is
    available)."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown adapter backend {name!r}; choose one of {BACKEND_NAMES}")
    if name == "auto" and torch.device(device).type == "cuda":
        name = "triton" if triton_available() else "torch"
    if name == "auto" and dtype not in CPU_KERNEL_ACTIVATIONS:
        name = "torch"
    if name == "auto":
        try:
            return _make_backend("cpu")
        except Exception as err:  # no compiler / headers: the torch path computes the same
            log.warning("fused CPU adapter kernel unavailable (%s); using the torch backend", err)
            name = "torch"
    return _make_backend(name)


def _make_backend(name: str) -> AdapterBackend:
    if name == "cpu":
        from .cpu_backend import CpuBackend
        return CpuBackend()
    if name == "triton":
        from .triton_backend import TritonBackend
        return TritonBackend()
    if name == "reference":
        from .reference import ReferenceBackend
        return ReferenceBackend()
    from .torch_backend import TorchBackend
    return TorchBackend()


class AdapterContext:
    """What every adapted projection of a model shares: the pool and the backend, chosen once."""

    def __init__(self, pool: AdapterWeightPool, backend: AdapterBackend) -> None:
        self.pool = pool
        self.backend = backend

    def for_step(self, batch: AdapterBatch) -> "AdapterStep":
        return AdapterStep(self, batch)


class AdapterStep:
    """One step's adapter application: the shared pool and backend with this step's batch
    (an ``AdapterApplier``, carried down the forward in ``StepMetadata.adapters``)."""

    __slots__ = ("backend", "pool", "batch")

    def __init__(self, ctx: AdapterContext, batch: AdapterBatch) -> None:
        self.backend, self.pool, self.batch = ctx.backend, ctx.pool, batch

    def apply(self, module_path: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add each row's adapter delta to the base output ``y`` (same leading dims as ``x``)."""
        self.apply_many((module_path,), x, (y,))

    def apply_many(self, module_paths: Sequence[str], x: torch.Tensor,
                   ys: Sequence[torch.Tensor]) -> None:
        """``apply`` for projections that read the same ``x``, in one backend call."""
        batch = self.batch
        if not batch.has_adapters:
            return
        if x.dim() != 2:  # the engine's rows are already flat; reshaping costs a microsecond
            x, ys = x.reshape(-1, x.shape[-1]), [y.view(-1, y.shape[-1]) for y in ys]
        if x.shape[0] != batch.num_rows:
            raise ValueError(f"{module_paths[0]}: {x.shape[0]} rows but the step has {batch.num_rows}")
        self.backend.apply_many(ys, x, self.pool, module_paths, batch)
