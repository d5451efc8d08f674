"""``RayEngineClient``: the ``EngineClient`` of the ingress, reaching N engine replicas through a
Ray Serve handle. The API routes use it exactly as they use ``AsyncLLMEngine``.

- ``generate`` streams (``handle.options(stream=True, multiplexed_model_id=<adapter id>)``);
  base-model requests carry no multiplexed id and go to any replica. The replica's first item
  names it (``ReplicaStarted``); ``ReplicaHeaderMiddleware`` puts that id in the response's
  ``x-prolora-replica`` header. Closing the stream early (a client that disconnected) cancels
  the Ray call, which cancels the replica's generator, which aborts the engine request.
- A replica that dies: a request that has not yielded an output yet is sent again (Ray's router
  skips the dead replica), up to ``retries`` times; one that already streamed fails with
  ``ReplicaUnavailableError``, a 503 (an error event on a stream that already sent its 200).
- ``forget_adapter`` goes to every replica (``handle.broadcast``) and returns when all have
  answered; ``snapshot`` too, merged by ``aggregate.merge_snapshots`` with each replica's own.
- Errors a replica raises come back as ``RayTaskError``; their cause (``AdapterNotFoundError``,
  ``QueueFullError``...) is re-raised, so the API maps them as it does in process.
"""

from __future__ import annotations

import asyncio
import logging
from contextvars import ContextVar
from typing import Any, AsyncIterator

from ray.exceptions import RayActorError, RayTaskError, TaskCancelledError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.exceptions import ReplicaUnavailableError as RayReplicaUnavailableError

from ..engine.client import EngineSnapshot, ModelInfo
from ..engine.errors import EngineStoppedError, QueueFullError
from ..engine.sampling import SamplingParams
from .aggregate import merge_snapshots
from .protocol import ReplicaDescription, ReplicaFailed, ReplicaSnapshot, ReplicaStarted

log = logging.getLogger(__name__)
REPLICA_HEADER = "x-prolora-replica"
CONTROL_TIMEOUT_S = 60.0  # forget_adapter / snapshot on every replica
RETRY_BACKOFF_S = 0.5
# The replicas an HTTP request's engine calls went to (set per request by the middleware).
SERVED_BY: ContextVar[list[str] | None] = ContextVar("prolora_served_by", default=None)
_GONE = (RayActorError, RayReplicaUnavailableError, DeploymentUnavailableError)


class ReplicaUnavailableError(EngineStoppedError):
    """The replica serving a request died after the request had streamed (API: 503)."""


def _cause(err: RayTaskError) -> BaseException:
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


def _note_replica(replica_id: str) -> None:
    served = SERVED_BY.get()
    if served is not None and replica_id not in served:
        served.append(replica_id)


class RayEngineClient:
    """``EngineClient`` over the engine replica deployment's handle."""

    def __init__(self, replicas: Any, description: ReplicaDescription, *, affinity: bool = True,
                 retries: int = 2) -> None:
        self._replicas = replicas
        self._streaming = replicas.options(stream=True)
        self._model = description.model
        self._tokenizer = description.tokenizer
        self.affinity = affinity  # False: plain routing, no multiplexed id (the benchmark's baseline)
        self.retries = retries
        self._running = False
        self._streams: dict[str, Any] = {}

    # --- EngineClient: fixed at start-up ------------------------------------------------------
    @property
    def model(self) -> ModelInfo:
        return self._model

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def is_running(self) -> bool:
        return self._running

    def start(self) -> None:
        self._running = True

    def shutdown(self) -> None:
        """The replicas belong to Ray Serve (``serve.shutdown`` stops them); open streams end."""
        self._running = False
        for stream in list(self._streams.values()):
            stream.cancel()

    # --- requests -----------------------------------------------------------------------------
    def _handle(self, adapter_id: str | None) -> Any:
        if adapter_id is None or not self.affinity:
            return self._streaming
        return self._streaming.options(multiplexed_model_id=adapter_id)

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       adapter_id: str | None = None) -> AsyncIterator[Any]:
        if not self._running:
            raise EngineStoppedError("the engine replicas are not running")
        handle = self._handle(adapter_id)
        attempt = 0
        while True:
            stream = handle.generate.remote(request_id, prompt_ids, params, adapter_id)
            self._streams[request_id] = stream
            replica, streamed, finished = None, False, False
            try:
                async for item in stream:
                    if isinstance(item, ReplicaStarted):
                        replica = item.replica_id
                        _note_replica(replica)
                        continue
                    if isinstance(item, ReplicaFailed):
                        finished = True
                        raise item.rebuild()
                    streamed, finished = True, item.finished
                    yield item
                return
            except RayTaskError as err:
                cause = _cause(err)
                if isinstance(cause, _GONE):
                    err = cause
                else:
                    raise cause from None
                if streamed or attempt >= self.retries:
                    raise self._gone(request_id, replica, err) from None
            except _GONE as err:
                if streamed or attempt >= self.retries:
                    raise self._gone(request_id, replica, err) from None
            except BackPressureError as err:
                raise QueueFullError(f"every engine replica's queue is full ({err})") from None
            except TaskCancelledError:
                raise EngineStoppedError(f"request {request_id} was cancelled on its replica") from None
            finally:
                self._streams.pop(request_id, None)
                if not finished:
                    stream.cancel()
            attempt += 1
            log.warning("request %s: replica %s is gone before it streamed; sending it again "
                        "(attempt %d)", request_id, replica or "?", attempt + 1)
            await asyncio.sleep(RETRY_BACKOFF_S * attempt)

    @staticmethod
    def _gone(request_id: str, replica: str | None, err: BaseException) -> ReplicaUnavailableError:
        where = f"replica {replica}" if replica else "its replica"
        return ReplicaUnavailableError(
            f"request {request_id}: {where} stopped while serving it ({type(err).__name__}); "
            "Ray Serve restarts it, retry the request")

    async def abort(self, request_id: str) -> None:
        """Cancel the request's Ray call: the replica's stream is cancelled, which aborts it."""
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.cancel()

    # --- every replica ------------------------------------------------------------------------
    async def _broadcast(self, method: str, *args: Any) -> list[Any]:
        """Call ``method`` on every running replica; replicas that die meanwhile are left out
        (one restarting starts empty and reads the store afresh)."""
        results = await self._replicas.broadcast(method, *args).results_async(
            timeout_s=CONTROL_TIMEOUT_S, return_exceptions=True)
        answered = []
        for result in results:
            if isinstance(result, RayTaskError) and not isinstance(_cause(result), _GONE):
                raise _cause(result)
            if isinstance(result, (RayTaskError, *_GONE)):
                log.warning("%s: a replica did not answer (%s)", method, type(result).__name__)
                continue
            if isinstance(result, BaseException):
                raise result
            answered.append(result)
        return answered

    async def forget_adapter(self, adapter_id: str) -> None:
        """Every replica retires the adapter before this returns (deletes, re-uploads)."""
        await self._broadcast("forget_adapter", adapter_id)

    async def snapshot(self) -> EngineSnapshot:
        parts: list[ReplicaSnapshot] = await self._broadcast("snapshot")
        if not parts:
            raise EngineStoppedError("no engine replica answered")
        return merge_snapshots({part.replica_id: part.snapshot for part in sorted(
            parts, key=lambda p: p.replica_id)})

    async def identities(self) -> list[Any]:
        """Each running replica's id, pid and routing capacity (tests, the benchmark)."""
        return await self._broadcast("identify")


class ReplicaHeaderMiddleware:
    """Names the replicas that served a request in ``x-prolora-replica`` (comma-separated when
    an API call's choices went to several); responses that reached no replica have none."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        served: list[str] = []
        token = SERVED_BY.set(served)

        async def send_with_header(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and served:
                message = {**message, "headers": [*message.get("headers", []),
                                                  (REPLICA_HEADER.encode(), ",".join(served).encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_header)
        finally:
            SERVED_BY.reset(token)
