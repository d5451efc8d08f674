"""A small typed client for a prolora-serve server (sync and async, on httpx).

    with ProloraClient("http://127.0.0.1:8000") as client:
        client.upload_adapter("my-adapter", "path/to/adapter_dir_or.safetensors")
        print(client.completion("Hello", adapter="my-adapter", max_tokens=8).text)

Errors come back as ``ProloraAPIError`` with the server's status, type, param and code.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 600.0
ADAPTER_PAGE = 1000  # adapters per GET /adapters request (the server's maximum page)
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


class ProloraAPIError(Exception):
    def __init__(self, status: int, message: str, type: str | None = None,
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(f"{status} {type or 'error'}: {message}")
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


@dataclass
class AdapterInfo:
    id: str
    created: int
    config: dict[str, Any]
    num_params: int
    nbytes: int
    stored_bytes: int
    resident: bool | None = None
    resident_bytes: int | None = None
    in_use: int | None = None
    last_used: float | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "AdapterInfo":
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class Choice:
    index: int
    text: str
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None


@dataclass
class Completion:
    id: str
    model: str
    choices: list[Choice]
    usage: dict[str, int] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.choices[0].text

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Completion":
        choices = [Choice(c["index"], _choice_text(c), c.get("finish_reason"), c.get("logprobs"))
                   for c in data["choices"]]
        return cls(data["id"], data["model"], choices, data.get("usage") or {})


@dataclass
class Chunk:
    """One streamed delta (``usage`` is set on the final usage-only chunk)."""

    index: int | None
    text: str
    finish_reason: str | None
    usage: dict[str, int] | None = None


def _choice_text(choice: dict[str, Any]) -> str:
    if "text" in choice:
        return choice["text"]
    holder = choice.get("message") or choice.get("delta") or {}
    return holder.get("content") or ""


def _raise_for_error(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        raise ProloraAPIError(response.status_code, response.text[:500]) from None
    raise ProloraAPIError(response.status_code, error.get("message", ""), error.get("type"),
                          error.get("param"), error.get("code"))


def _chunks_of(line: str) -> list[Chunk] | None:
    """Parse one SSE line: chunks, ``[]`` for noise, ``None`` at ``[DONE]``."""
    if not line.startswith("data:"):
        return []
    payload = line[len("data:"):].strip()
    if payload == "[DONE]":
        return None
    data = json.loads(payload)
    if "error" in data:
        error = data["error"]
        raise ProloraAPIError(200, error.get("message", ""), error.get("type"), error.get("param"),
                              error.get("code"))
    if not data.get("choices"):
        return [Chunk(None, "", None, data.get("usage"))]
    return [Chunk(c["index"], _choice_text(c), c.get("finish_reason")) for c in data["choices"]]


def _completion_body(prompt: Any, adapter: str | None, model: str | None, stream: bool,
                     params: dict[str, Any]) -> dict[str, Any]:
    body = {"prompt": prompt, "stream": stream, **params}
    if adapter is not None:
        body["adapter"] = adapter
    if model is not None:
        body["model"] = model
    if stream:
        body.setdefault("stream_options", {"include_usage": True})
    return body


def _upload_parts(name: str, path: Path, stack: ExitStack) -> tuple[dict[str, str], dict[str, Any]]:
    """Multipart fields for a directory (config + weights) or a single .safetensors file."""
    def part(file: Path) -> tuple[str, Any, str]:
        return file.name, stack.enter_context(open(file, "rb")), "application/octet-stream"

    if path.is_dir():
        return {"name": name}, {"config": part(path / CONFIG_NAME), "weights": part(path / WEIGHTS_NAME)}
    return {"name": name}, {"file": part(path)}


class _Common:
    def __init__(self, base_url: str, api_key: str | None, admin_key: str | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key, self.admin_key = api_key, admin_key

    def _headers(self, admin: bool = False) -> dict[str, str]:
        key = (self.admin_key or self.api_key) if admin else (self.api_key or self.admin_key)
        return {"Authorization": f"Bearer {key}"} if key else {}


class ProloraClient(_Common):
    """Synchronous client."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None,
                 admin_key: str | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        super().__init__(base_url, api_key, admin_key)
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout)

    def __enter__(self) -> "ProloraClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _request(self, method: str, path: str, admin: bool = False, **kwargs: Any) -> Any:
        response = self.http.request(method, path, headers=self._headers(admin), **kwargs)
        _raise_for_error(response)
        return response.json() if "json" in response.headers.get("content-type", "") else response.text

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/health")

    def models(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/models")["data"]

    def metrics(self) -> str:
        return self._request("GET", "/metrics")

    def capacity(self, **query: Any) -> dict[str, Any]:
        return self._request("GET", "/v1/capacity", params=query)

    def list_adapters(self) -> list[AdapterInfo]:
        """Every adapter: follows the server's pages (``has_more``, ``after``)."""
        adapters: list[AdapterInfo] = []
        params: dict[str, Any] = {"limit": ADAPTER_PAGE}
        while True:
            page = self._request("GET", "/adapters", params=params)
            adapters += [AdapterInfo.from_json(a) for a in page["data"]]
            if not page.get("has_more") or not page["data"]:
                return adapters
            params["after"] = page["data"][-1]["id"]

    def get_adapter(self, adapter_id: str) -> AdapterInfo:
        return AdapterInfo.from_json(self._request("GET", f"/adapters/{adapter_id}"))

    def upload_adapter(self, name: str, path: str | Path) -> AdapterInfo:
        with ExitStack() as stack:
            data, files = _upload_parts(name, Path(path), stack)
            return AdapterInfo.from_json(self._request("POST", "/adapters", admin=True, data=data,
                                                       files=files))

    def delete_adapter(self, adapter_id: str) -> dict[str, Any]:
        return self._request("DELETE", f"/adapters/{adapter_id}", admin=True)

    def completion(self, prompt: Any, adapter: str | None = None, model: str | None = None,
                   **params: Any) -> Completion:
        body = _completion_body(prompt, adapter, model, False, params)
        return Completion.from_json(self._request("POST", "/v1/completions", json=body))

    def chat(self, messages: list[dict[str, Any]], adapter: str | None = None,
             model: str | None = None, **params: Any) -> Completion:
        body = {"messages": messages, **params, **({"adapter": adapter} if adapter else {}),
                **({"model": model} if model else {})}
        return Completion.from_json(self._request("POST", "/v1/chat/completions", json=body))

    def stream_completion(self, prompt: Any, adapter: str | None = None, model: str | None = None,
                          **params: Any) -> Iterator[Chunk]:
        body = _completion_body(prompt, adapter, model, True, params)
        with self.http.stream("POST", "/v1/completions", json=body, headers=self._headers()) as response:
            if not response.is_success:
                response.read()
                _raise_for_error(response)
            for line in response.iter_lines():
                chunks = _chunks_of(line)
                if chunks is None:
                    return
                yield from chunks


class AsyncProloraClient(_Common):
    """Asynchronous client (same methods, awaitable; streaming is an async iterator)."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None,
                 admin_key: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 max_connections: int = 100) -> None:
        super().__init__(base_url, api_key, admin_key)
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self.http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, limits=limits)

    async def __aenter__(self) -> "AsyncProloraClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def _request(self, method: str, path: str, admin: bool = False, **kwargs: Any) -> Any:
        response = await self.http.request(method, path, headers=self._headers(admin), **kwargs)
        _raise_for_error(response)
        return response.json() if "json" in response.headers.get("content-type", "") else response.text

    async def health(self) -> dict[str, Any]:
        return await self._request("GET", "/health")

    async def models(self) -> list[dict[str, Any]]:
        return (await self._request("GET", "/v1/models"))["data"]

    async def capacity(self, **query: Any) -> dict[str, Any]:
        return await self._request("GET", "/v1/capacity", params=query)

    async def list_adapters(self) -> list[AdapterInfo]:
        """Every adapter: follows the server's pages (``has_more``, ``after``)."""
        adapters: list[AdapterInfo] = []
        params: dict[str, Any] = {"limit": ADAPTER_PAGE}
        while True:
            page = await self._request("GET", "/adapters", params=params)
            adapters += [AdapterInfo.from_json(a) for a in page["data"]]
            if not page.get("has_more") or not page["data"]:
                return adapters
            params["after"] = page["data"][-1]["id"]

    async def get_adapter(self, adapter_id: str) -> AdapterInfo:
        return AdapterInfo.from_json(await self._request("GET", f"/adapters/{adapter_id}"))

    async def upload_adapter(self, name: str, path: str | Path) -> AdapterInfo:
        with ExitStack() as stack:
            data, files = _upload_parts(name, Path(path), stack)
            return AdapterInfo.from_json(await self._request("POST", "/adapters", admin=True,
                                                             data=data, files=files))

    async def delete_adapter(self, adapter_id: str) -> dict[str, Any]:
        return await self._request("DELETE", f"/adapters/{adapter_id}", admin=True)

    async def completion(self, prompt: Any, adapter: str | None = None, model: str | None = None,
                         **params: Any) -> Completion:
        body = _completion_body(prompt, adapter, model, False, params)
        return Completion.from_json(await self._request("POST", "/v1/completions", json=body))

    async def stream_completion(self, prompt: Any, adapter: str | None = None,
                                model: str | None = None, **params: Any) -> AsyncIterator[Chunk]:
        body = _completion_body(prompt, adapter, model, True, params)
        async with self.http.stream("POST", "/v1/completions", json=body,
                                    headers=self._headers()) as response:
            if not response.is_success:
                await response.aread()
                _raise_for_error(response)
            async for line in response.aiter_lines():
                chunks = _chunks_of(line)
                if chunks is None:
                    return
                for chunk in chunks:
                    yield chunk
