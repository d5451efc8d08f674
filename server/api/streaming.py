"""Server-sent events in OpenAI's format: ``data: {chunk}`` lines, then ``data: [DONE]``."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Protocol

from .errors import as_api_error, error_body


class ChunkWriter(Protocol):
    """Turns engine deltas into response chunks; one per streamed request."""

    def chunks(self, index: int, output: Any) -> list[dict[str, Any]]: ...

    def tail(self) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


def sse(payload: str) -> bytes:
    return f"data: {payload}\n\n".encode()


SSE_DONE = sse("[DONE]")


async def sse_events(outputs: AsyncIterator[tuple[int, Any]], writer: ChunkWriter) -> AsyncIterator[bytes]:
    """The event stream; an error after the 200 went out becomes an error event."""
    try:
        async for index, output in outputs:
            for chunk in writer.chunks(index, output):
                yield sse(json.dumps(chunk))
        for chunk in writer.tail():
            yield sse(json.dumps(chunk))
    except Exception as exc:  # noqa: BLE001 - the status line is gone; report in-band
        err = as_api_error(exc)
        yield sse(json.dumps(error_body(err.message, err.type, err.param, err.code)))
    finally:
        writer.close()
    yield SSE_DONE
