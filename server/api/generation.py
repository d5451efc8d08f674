"""Running the engine requests behind one API call: n choices x prompts, merged as they stream.

Each choice is one engine request. Their output deltas are pumped into one queue so a stream
interleaves choices as they progress. Cancelling the consumer (client gone) cancels every pump,
which aborts the engine requests and frees their slots.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from prolora_serve.adapters.registry import AdapterNotFoundError
from prolora_serve.server.engine.client import EngineClient
from prolora_serve.server.engine.errors import EngineError
from prolora_serve.server.engine.sampling import SamplingParams

from .common import AdapterChoice
from .errors import APIError
from .streaming import sse_events

T = TypeVar("T")
DISCONNECT_POLL_S = 0.25


@dataclass
class ChoiceJob:
    """One engine request: the ``index`` of its choice in the response."""

    index: int
    prompt: list[int]
    params: SamplingParams


@dataclass
class ChoiceResult:
    """A finished choice, accumulated from its deltas."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)  # engine TokenLogprob
    finish_reason: str | None = None
    prompt_token_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[Any] | None = None

    def add(self, output: Any) -> None:
        if not self.prompt_token_ids:
            self.prompt_token_ids = list(output.prompt_token_ids)
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = list(output.prompt_logprobs)
        self.text += output.text
        self.token_ids += output.token_ids
        self.logprobs += output.logprobs or []
        if output.finished:
            self.finish_reason = output.finish_reason


_DONE = object()


async def _pump(engine: EngineClient, request_id: str, job: ChoiceJob, adapter: AdapterChoice,
                queue: asyncio.Queue) -> None:
    try:
        async for output in engine.generate(f"{request_id}-{job.index}", job.prompt, job.params,
                                            adapter.adapter_id):
            await queue.put((job.index, output))
    except AdapterNotFoundError as err:
        await queue.put((job.index, adapter.not_found(err, engine.model.name)))
    except EngineError as err:
        await queue.put((job.index, err))
    except ValueError as err:  # the engine's own checks on the prompt/params: bad input
        await queue.put((job.index, APIError(400, str(err), code="invalid_value")))
    except Exception as err:  # noqa: BLE001 - re-raised by the consumer
        await queue.put((job.index, err))
    finally:
        await queue.put((job.index, _DONE))


async def merged_outputs(engine: EngineClient, request_id: str, jobs: list[ChoiceJob],
                         adapter: AdapterChoice) -> AsyncIterator[tuple[int, Any]]:
    """``(choice index, RequestOutput delta)`` from all jobs as they arrive; the first
    error of any job is raised (the other jobs are aborted)."""
    queue: asyncio.Queue = asyncio.Queue()
    tasks = [asyncio.create_task(_pump(engine, request_id, job, adapter, queue)) for job in jobs]
    running = len(tasks)
    try:
        while running:
            index, item = await queue.get()
            if item is _DONE:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def first_and_rest(stream: AsyncIterator[T]) -> tuple[T | None, AsyncIterator[T]]:
    """Await the first item (so errors surface before a 200 is sent), then the whole stream."""
    try:
        first = await stream.__anext__()
    except StopAsyncIteration:
        return None, stream

    async def chained() -> AsyncIterator[T]:
        yield first
        async for item in stream:
            yield item

    return first, chained()


async def collect(stream: AsyncIterator[tuple[int, Any]], count: int) -> list[ChoiceResult]:
    results = [ChoiceResult(index) for index in range(count)]
    async for index, output in stream:
        results[index].add(output)
    return results


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run ``work``; if the client goes away first, cancel it (aborting its engine requests)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise APIError(499, "client closed the request", code="client_closed")
    finally:
        task.cancel()


async def respond(request: Request, engine: EngineClient, request_id: str, jobs: list[ChoiceJob],
                  adapter: AdapterChoice, writer: Any, stream: bool) -> Any:
    """Run an API call's choices: an SSE stream through ``writer``, or one gathered response."""
    outputs = merged_outputs(engine, request_id, jobs, adapter)
    if stream:
        _, outputs = await until_disconnected(request, first_and_rest(outputs))
        return StreamingResponse(sse_events(outputs, writer), media_type="text/event-stream")
    results = await until_disconnected(request, collect(outputs, len(jobs)))
    return writer.response(results)
