"""``GET /v1/models`` (base model + every adapter, OpenAI's model cards) and ``GET /health``."""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from prolora_serve.server.engine.client import EngineClient

from .auth import require_api_key
from .errors import APIError
from .schemas import Health, KernelBackendNames, ModelCard, ModelList

router = APIRouter(tags=["openai"])


def _cards(request: Request) -> list[ModelCard]:
    state = request.app.state
    base = state.model_name
    cards = [ModelCard(id=base, created=int(state.started_at), root=base)]
    cards += [ModelCard(id=r.adapter_id, created=int(r.created), root=base, parent=base)
              for r in state.registry.list()]
    return cards


@router.get("/v1/models", response_model=ModelList, dependencies=[Depends(require_api_key)])
def list_models(request: Request) -> ModelList:
    return ModelList(data=_cards(request))


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, dependencies=[Depends(require_api_key)])
def get_model(model_id: str, request: Request) -> ModelCard:
    for card in _cards(request):
        if card.id == model_id:
            return card
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
