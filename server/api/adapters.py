"""Adapter management: ``POST/GET /adapters``, ``GET/DELETE /adapters/{id}``.

Uploads are multipart: ``name`` plus either ``file`` (one .safetensors with the config in its
metadata) or ``config`` + ``weights`` (PEFT-style pair). Validation and disk I/O run in a worker
thread so a large upload never stalls the event loop (and so the step loop keeps streaming).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request

from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from prolora_serve.server.engine.client import EngineClient
from prolora_serve.server.engine.residency import ResidentAdapterInfo
from prolora_serve.server.engine.threads import off_the_step_thread

from . import listing
from .auth import require_admin_key, require_api_key
from .errors import APIError
from .listing import AdapterPage
from .schemas import AdapterDeleted, AdapterInfo

router = APIRouter(tags=["adapters"])
UPLOAD_FIELDS = ("file", "config", "weights")
MULTIPART_OVERHEAD = 64 * 1024  # boundaries, headers and the name field on top of the files


async def _residency(engine: EngineClient | None) -> dict[str, ResidentAdapterInfo]:
    if engine is None:
        return {}
    return {info.adapter_id: info for info in (await engine.snapshot()).resident}


def adapter_info(record: Any, resident: dict[str, Any] | None = None) -> AdapterInfo:
    info = AdapterInfo(id=record.adapter_id, created=int(record.created), config=record.config,
                       num_params=record.num_params, nbytes=record.nbytes,
                       stored_bytes=record.stored_bytes)
    if resident is not None:
        entry = resident.get(record.adapter_id)
        info.resident = entry is not None
        info.resident_bytes = entry.nbytes if entry else 0
        info.in_use = entry.in_use if entry else 0
        info.last_used = entry.last_used if entry else None
    return info


def _check_content_length(request: Request, limit: int) -> None:
    """Refuse an oversized upload before reading it (the registry counts bytes again)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + MULTIPART_OVERHEAD:
        raise APIError(413, f"upload of {declared} bytes exceeds the limit of {limit} bytes",
                       code="upload_too_large")


def _limited(receive: Any, limit: int) -> Any:
    """A receive channel that refuses bodies over ``limit`` bytes (chunked uploads too)."""
    seen = 0

    async def receive_limited() -> dict[str, Any]:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise APIError(413, f"upload exceeds the limit of {limit} bytes", code="upload_too_large")
        return message

    return receive_limited


async def _read_form(request: Request, limit: int) -> FormData:
    limited = Request(request.scope, _limited(request.receive, limit + MULTIPART_OVERHEAD))
    try:
        return await limited.form(max_files=len(UPLOAD_FIELDS), max_fields=8)
    except APIError:
        raise
    except Exception as err:  # noqa: BLE001 - malformed multipart bodies raise several types
        raise APIError(400, f"expected a multipart/form-data body: {err}", code="invalid_form") from None


def _upload_fields(form: FormData) -> tuple[str, dict[str, Any]]:
    name = form.get("name")
    if not isinstance(name, str):
        raise APIError(400, "the form field 'name' (the adapter id) is required", param="name")
    files = {key: form.get(key) for key in UPLOAD_FIELDS if form.get(key) is not None}
    for key, value in files.items():
        if not isinstance(value, UploadFile):
            raise APIError(400, f"form field {key!r} must be a file", param=key)
    return name, {key: value.file for key, value in files.items()}


UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$", "description": "adapter id"},
        "file": {"type": "string", "format": "binary",
                 "description": "single .safetensors, config JSON in metadata key adapter_config"},
        "config": {"type": "string", "format": "binary", "description": "adapter_config.json"},
        "weights": {"type": "string", "format": "binary", "description": "adapter_model.safetensors"},
    }}}}}}


def refuse_base_model_name(request: Request, name: str, param: str, status: int) -> None:
    """An adapter may not take the base model's name (``model=<name>`` must stay the base)."""
    if name == request.app.state.model_name:  # set once at start-up from engine.model
        raise APIError(status, f"{name!r} is the base model's name", param=param,
                       code="adapter_exists")


async def remove_adapter(request: Request, adapter_id: str) -> None:
    """Delete from the registry, then retire it in the engine (running requests finish, then
    its weights are freed): ``DELETE /adapters/{id}`` and ``/v1/unload_lora_adapter``."""
    state = request.app.state
    await run_in_threadpool(state.registry.delete, adapter_id)
    if state.engine is not None:
        await state.engine.forget_adapter(adapter_id)


@router.post("/adapters", status_code=201, response_model=AdapterInfo, openapi_extra=UPLOAD_BODY,
             dependencies=[Depends(require_admin_key)], summary="Upload an adapter")
async def upload_adapter(request: Request) -> AdapterInfo:
    registry = request.app.state.registry
    _check_content_length(request, registry.max_upload_bytes)
    form = await _read_form(request, registry.max_upload_bytes)
    try:
        name, files = _upload_fields(form)
        refuse_base_model_name(request, name, "name", status=409)
        record = await run_in_threadpool(off_the_step_thread(registry.register_upload), name, **files)
    finally:
        await form.close()
    return adapter_info(record, await _residency(request.app.state.engine))


@router.get("/adapters", response_model=AdapterPage, dependencies=[Depends(require_api_key)],
            summary="List registered adapters, one page at a time (id order)")
async def list_adapters(
        request: Request,
        limit: int = Query(listing.DEFAULT_LIMIT, ge=1, le=listing.MAX_LIMIT,
                           description=f"adapters per page, 1 to {listing.MAX_LIMIT}"),
        after: str | None = Query(None, pattern=listing.AFTER_PATTERN,
                                  description="an adapter id: list those after it")) -> AdapterPage:
    page = await run_in_threadpool(request.app.state.registry.page, limit, after)
    resident = await _residency(request.app.state.engine)
    data = [adapter_info(r, resident) for r in page.records]
    return AdapterPage(data=data, has_more=page.has_more, first_id=data[0].id if data else None,
                       last_id=data[-1].id if data else None)


@router.get("/adapters/{adapter_id}", response_model=AdapterInfo,
            dependencies=[Depends(require_api_key)], summary="One adapter, with its residency")
async def get_adapter(adapter_id: str, request: Request) -> AdapterInfo:
    record = request.app.state.registry.get(adapter_id)
    return adapter_info(record, await _residency(request.app.state.engine))


@router.delete("/adapters/{adapter_id}", response_model=AdapterDeleted,
               dependencies=[Depends(require_admin_key)], summary="Delete an adapter")
async def delete_adapter(adapter_id: str, request: Request) -> AdapterDeleted:
    await remove_adapter(request, adapter_id)
    return AdapterDeleted(id=adapter_id)
