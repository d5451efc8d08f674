"""The seam between the API and an engine: ``EngineClient``.

The routes know an engine only through this protocol. ``AsyncLLMEngine`` (one engine in this
process) implements it; a deployment that spreads requests over several engine processes
implements it again, so the routes stay one set of code. Calls that may cross a process are
``async``; what is fixed at start-up (the model, the tokenizer) is plain data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Protocol, runtime_checkable

from .residency import ResidentAdapterInfo
from .sampling import SamplingParams
from .scheduler import AdapterTraffic

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

    from .engine import EngineStats, RequestOutput


@dataclass(frozen=True)
class KernelBackends:
    """Which implementation runs each kernel, chosen once at start-up (a fallback shows here)."""

    adapter: str  # kernels.get_backend: cpu | torch | triton | reference
    decode_attention: str  # kernels.get_decode_attention: cpu | sdpa | ...


@dataclass(frozen=True)
class ModelInfo:
    """What the API needs to know about the served base model."""

    name: str
    max_model_len: int  # tokens one sequence may hold: model positions, setting and KV cache
    hf_config: "PretrainedConfig"
    base_model_bytes: int
    linear_shapes: dict[str, tuple[int, int]]  # module path -> (in, out): adapters must match
    backends: KernelBackends


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's counters and what is resident, read together."""

    stats: "EngineStats"
    resident: list[ResidentAdapterInfo]
    # Per adapter id (None: the base model): request/token counters and running/waiting now.
    adapters: dict[str | None, AdapterTraffic] = field(default_factory=dict)
    # A deployment over several engines (server/scaleout): each replica's own snapshot by
    # replica id, the fields above being their sums. Empty for one engine in process.
    replicas: dict[str, "EngineSnapshot"] = field(default_factory=dict)


@runtime_checkable
class EngineClient(Protocol):
    """Generation, aborts, adapter residency and stats of one engine (or a set of replicas)."""

    @property
    def model(self) -> ModelInfo: ...

    @property
    def tokenizer(self) -> "PreTrainedTokenizerBase": ...

    @property
    def is_running(self) -> bool: ...

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 adapter_id: str | None = None) -> AsyncIterator["RequestOutput"]:
        """Output deltas, the last with ``finished=True``; raises the request's error
        (``AdapterNotFoundError``, ``EngineError`` subclasses). Closing it aborts the request."""
        ...

    async def abort(self, request_id: str) -> None: ...

    async def forget_adapter(self, adapter_id: str) -> None:
        """The adapter was deleted or replaced: running requests finish, then it is unloaded;
        returns once no new request can get the old weights."""
        ...

    async def snapshot(self) -> EngineSnapshot: ...

    def start(self) -> None: ...

    def shutdown(self) -> None: ...

