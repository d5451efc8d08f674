"""``GET /v1/models`` (base model + every adapter, OpenAI's model cards) and ``GET /health``."""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from prolora_serve.adapters.registry import AdapterNotFoundError
from prolora_serve.server.engine.client import EngineClient

from .auth import require_api_key
from .errors import APIError
from .schemas import Health, KernelBackendNames, ModelCard, ModelList

router = APIRouter(tags=["openai"])


def _base_card(request: Request) -> ModelCard:
    state = request.app.state
    return ModelCard(id=state.model_name, created=int(state.started_at), root=state.model_name)


def _adapter_card(record: Any, base: str) -> ModelCard:
    return ModelCard(id=record.adapter_id, created=int(record.created), root=base, parent=base)


@router.get("/v1/models", response_model=ModelList, dependencies=[Depends(require_api_key)])
def list_models(request: Request) -> ModelList:
    # OpenAI's model list has no pagination: every adapter, read from the index in batches.
    base = request.app.state.model_name
    return ModelList(data=[_base_card(request)] + [
        _adapter_card(r, base) for r in request.app.state.registry.iter_records()])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, dependencies=[Depends(require_api_key)])
def get_model(model_id: str, request: Request) -> ModelCard:
    state = request.app.state
    if model_id == state.model_name:
        return _base_card(request)
    if model_id in state.registry:  # one index lookup, not a scan of every adapter
        try:
            return _adapter_card(state.registry.get(model_id), state.model_name)
        except AdapterNotFoundError:  # deleted in between
            pass
    raise APIError(404, f"model {model_id!r} does not exist", param="model", code="model_not_found")


@router.get("/health", response_model=Health, tags=["operations"],
            responses={503: {"model": Health}})
def health(request: Request) -> JSONResponse:
    state = request.app.state
    engine: EngineClient | None = state.engine
    running = engine is not None and engine.is_running and not state.stopping
    backends = (KernelBackendNames(**dataclasses.asdict(engine.model.backends))
                if engine is not None else None)
    body = Health(status="ok" if running else "unavailable", model=state.model_name,
                  adapters=len(state.registry) if state.registry is not None else None,
                  backends=backends)
    return JSONResponse(body.model_dump(), status_code=200 if running else 503)
