"""What the ingress and the engine replicas pass each other (plain data, no Ray import)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..engine.client import EngineSnapshot, ModelInfo


@dataclass(frozen=True)
class ReplicaStarted:
    """The first item of every replica stream: which replica took the request."""

    replica_id: str


@dataclass(frozen=True)
class ReplicaDescription:
    """What the ingress needs of the model (every replica serves the same one)."""

    model: ModelInfo
    tokenizer: Any


@dataclass(frozen=True)
class ReplicaIdentity:
    replica_id: str
    pid: int
    max_adapters: int  # Ray Serve's max_num_models_per_replica for this replica
    routing_evictions: int  # ids Ray's multiplexed LRU dropped here (it frees no weights)
    routing_ids: list[str] = field(default_factory=list)  # ids Ray routes here (its LRU)


@dataclass(frozen=True)
class ReplicaSnapshot:
    replica_id: str
    snapshot: EngineSnapshot


@dataclass(frozen=True)
class ReplicaFailed:
    """A request's error, sent as data instead of raised through Ray: the ingress rebuilds the
    same exception (class, message and attributes such as ``param``) and the API maps it as
    it would in process. Pickling the exception itself would lose what its ``__init__``
    takes beyond the message (``GrammarError.param``) or fail to rebuild it at all."""

    error_type: type
    args: tuple
    attributes: dict[str, Any]

    @classmethod
    def of(cls, error: BaseException) -> "ReplicaFailed":
        return cls(type(error), tuple(error.args), dict(vars(error)))

    def rebuild(self) -> BaseException:
        error = self.error_type.__new__(self.error_type)
        BaseException.__init__(error, *self.args)
        vars(error).update(self.attributes)
        return error
