"""The engine for asyncio callers (the in-process ``EngineClient``): the step loop runs in a
background thread.

The forward releases the GIL, so the event loop keeps serving HTTP while a step runs. Each
request has an asyncio queue; the step thread feeds it with ``loop.call_soon_threadsafe``.
The thread sleeps on an Event while there is nothing to do and wakes when a request arrives.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, AsyncIterator, Sequence as Seq

from .client import EngineSnapshot, ModelInfo
from .engine import EngineConfig, EngineStats, LLMEngine, RequestOutput
from .errors import EngineStoppedError
from .residency import AdapterCache, AdapterSource
from .sampling import SamplingParams
from .threads import run_on_passing_thread

logger = logging.getLogger(__name__)

_Stream = tuple[asyncio.AbstractEventLoop, asyncio.Queue]


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._streams: dict[str, _Stream] = {}
        self._streams_lock = threading.Lock()
        self._wake = threading.Event()
        if engine.adapter_cache is not None:
            engine.adapter_cache.on_loaded = self._wake.set
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._model = ModelInfo(
            name=engine.model_name, max_model_len=engine.max_len, hf_config=engine.hf_config,
            base_model_bytes=engine.loaded.nbytes,
            linear_shapes=engine.loaded.model.linear_shapes(), backends=engine.runner.backends)

    @classmethod
    def from_config(cls, config: EngineConfig, adapter_source: AdapterSource | None = None) -> "AsyncLLMEngine":
        # loaded on a passing thread: the step thread is to be the only one with an OpenMP team
        return cls(run_on_passing_thread(LLMEngine.from_config, config, adapter_source))

    # --- EngineClient: what the API reads --------------------------------------------------
    @property
    def model(self) -> ModelInfo:
        return self._model

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def hf_config(self) -> Any:
        return self.engine.hf_config

    @property
    def loaded(self) -> Any:
        return self.engine.loaded

    @property
    def adapter_cache(self) -> AdapterCache | None:
        return self.engine.adapter_cache

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def snapshot(self) -> EngineSnapshot:
        cache = self.engine.adapter_cache
        return EngineSnapshot(self.engine.stats(), cache.resident() if cache is not None else [],
                              self.engine.scheduler.adapter_traffic())

    async def forget_adapter(self, adapter_id: str) -> None:
        """New requests cannot get the old weights once this returns (the registry no longer
        has them, and the cache retires its entry now)."""
        self.engine.forget_adapter(adapter_id)
        self.engine.scheduler.forget_traffic(adapter_id)
        self._wake.set()

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the engine was started already")
        self._thread = threading.Thread(target=self._loop, name="engine-step-loop", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop the step loop, fail the requests still open, release the loader thread."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        self._dispatch(self.engine.fail_all(EngineStoppedError("the engine is shutting down")))
        if self.engine.adapter_cache is not None:
            self.engine.adapter_cache.close()

    def _loop(self) -> None:
        while not self._stopping:
            if not self.engine.has_work():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as err:  # noqa: BLE001 - a bug outside the forward: fail, go on
                logger.exception("engine step loop error; failing all live requests")
                outputs = self.engine.fail_all(err)
            self._dispatch(outputs)
            if not self.engine.last_step_ran and not outputs:
                self._idle_until_woken()

    def _idle_until_woken(self) -> None:
        """Everything left waits (on an adapter read): sleep until a read ends or a request
        arrives instead of spinning; the timeout is only a safety net."""
        self._wake.wait(timeout=0.05)
        self._wake.clear()

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            with self._streams_lock:
                stream = self._streams.get(output.request_id)
                if output.finished:
                    self._streams.pop(output.request_id, None)
            if stream is not None:
                loop, queue = stream
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, output)
                except RuntimeError:  # the caller's event loop is closed: nobody listens
                    pass

    # --- requests -----------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt: str | Seq[int], params: SamplingParams,
                       adapter_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream output deltas; the last has ``finished=True``. Raises the request's error
        (unknown adapter, too large, bad prompt, engine stopped) instead of yielding it.
        Stopping iteration early or cancelling the consumer aborts the request."""
        if not self.is_running:
            raise EngineStoppedError("the engine is not running")
        if adapter_id is not None:  # read it (off the step thread) before queueing
            await asyncio.wrap_future(self.engine.prepare_adapter(adapter_id))
        if params.grammar is not None:  # compile off the event loop; add_request hits the cache
            await asyncio.to_thread(self.engine.grammars.compile, params.grammar)
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        # The engine's add_request owns every request check (ids included); holding the streams
        # lock across it means the step thread cannot dispatch an output before the stream exists.
        with self._streams_lock:
            self.engine.add_request(request_id, prompt, params, adapter_id)
            self._streams[request_id] = (asyncio.get_running_loop(), queue)
        self._wake.set()
        finished = False
        try:
            while not finished:
                output = await queue.get()
                finished = output.finished
                if output.error is not None:
                    raise output.error
                yield output
        finally:
            with self._streams_lock:
                self._streams.pop(request_id, None)
            if not finished:
                self._abort_now(request_id)

    async def abort(self, request_id: str) -> None:
        self._abort_now(request_id)

    def _abort_now(self, request_id: str) -> None:
        """Takes effect at the next step (callable from any thread)."""
        self.engine.abort(request_id)
        self._wake.set()
