"""Every error leaves the server in OpenAI's shape: ``{"error": {message, type, param, code}}``.

Engine and registry exceptions map to one status each; FastAPI's validation errors become 400
``invalid_request_error`` with ``param`` naming the offending field.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from prolora_serve.adapters import registry as reg
from prolora_serve.server.engine import errors as engine_errors

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"
RATE_LIMIT = "rate_limit_error"
SERVER_ERROR = "server_error"
UNAVAILABLE = "service_unavailable"

_TYPE_BY_STATUS = {400: INVALID_REQUEST, 401: AUTHENTICATION, 404: NOT_FOUND, 405: INVALID_REQUEST,
                   409: INVALID_REQUEST, 413: INVALID_REQUEST, 422: INVALID_REQUEST,
                   429: RATE_LIMIT, 503: UNAVAILABLE}


class APIError(Exception):
    """An error the API reports as-is: status, message and OpenAI's type/param/code."""

    def __init__(self, status: int, message: str, *, type: str | None = None,
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPE_BY_STATUS.get(status, SERVER_ERROR)
        self.param = param
        self.code = code


def error_body(message: str, type: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(err: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    body = error_body(err.message, err.type, err.param, err.code)
    return JSONResponse(body, status_code=err.status, headers=headers)


# (exception class, status, code, param) — most specific first.
_MAPPED: list[tuple[type[Exception], int, str, str | None]] = [
    (engine_errors.QueueFullError, 429, "queue_full", None),
    (engine_errors.AdapterTooLargeError, 413, "adapter_too_large", None),
    (engine_errors.PromptTooLongError, 400, "context_length_exceeded", None),
    (engine_errors.InvalidPromptError, 400, "invalid_prompt", None),
    (engine_errors.InvalidTokenIdError, 400, "invalid_token_id", None),
    (engine_errors.GrammarError, 400, "invalid_grammar", None),
    (engine_errors.EngineStoppedError, 503, "engine_stopped", None),
    (reg.AdapterNotFoundError, 404, "adapter_not_found", None),
    (reg.DuplicateAdapterError, 409, "adapter_exists", None),
    (reg.UploadTooLargeError, 413, "upload_too_large", None),
    (reg.InvalidAdapterIdError, 400, "invalid_adapter_id", None),
    (reg.InvalidAdapterError, 400, "invalid_adapter", None),
]


def as_api_error(err: Exception) -> APIError:
    """The ``APIError`` for a known engine/registry exception (500 for anything else)."""
    if isinstance(err, APIError):
        return err
    for cls, status, code, param in _MAPPED:
        if isinstance(err, cls):
            return APIError(status, str(err), param=getattr(err, "param", param), code=code)
    log.exception("unexpected error", exc_info=err)
    return APIError(500, "internal server error", code="internal_error")


def _param_of(loc: tuple[Any, ...]) -> str | None:
    fields = [str(part) for part in loc[1:]] if loc and loc[0] in ("body", "query", "path",
                                                                     "header", "form") else []
    return ".".join(fields) or None


def _validation_message(error: dict[str, Any]) -> str:
    param = _param_of(tuple(error.get("loc", ())))
    message = str(error.get("msg", "invalid value"))
    return f"{param}: {message}" if param else message


def _common_loc(errors: list[dict[str, Any]]) -> tuple[Any, ...]:
    """The first error's location, cut to what its sibling errors share: a union field
    (``prompt`` takes four forms) reports one error per form, tagged by the form's type."""
    first = tuple(errors[0].get("loc", ())) if errors else ()
    siblings = [tuple(e.get("loc", ())) for e in errors if tuple(e.get("loc", ()))[:2] == first[:2]]
    common = first
    for loc in siblings:
        size = 0
        while size < min(len(common), len(loc)) and common[size] == loc[size]:
            size += 1
        common = common[:size]
    return common


async def _on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    message = "; ".join(_validation_message(e) for e in errors[:5]) or "invalid request"
    return error_response(APIError(400, message, param=_param_of(_common_loc(errors)),
                                   code="invalid_value"))


async def _on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    err = APIError(exc.status_code, str(exc.detail), code=code)
    return error_response(err, headers=getattr(exc, "headers", None))


async def _on_known(_: Request, exc: Exception) -> JSONResponse:
    return error_response(as_api_error(exc))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(APIError, _on_known)
    for cls in (engine_errors.EngineError, reg.RegistryError, Exception):
        app.add_exception_handler(cls, _on_known)
