"""vLLM's dynamic LoRA endpoints: ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``.

They take vLLM's bodies and answer as vLLM does (``vllm/entrypoints/openai/serving_models.py``
and its router): 200 with a plain-text ``Success: ...`` message; 400 when a field is missing,
the name is taken or the adapter is not valid; 404 when the path or (on unload) the name is
unknown. Errors are OpenAI-shaped (``errors.py``), so tools written for vLLM drive this server.

A load registers the adapter exactly as an upload does (``AdapterRegistry.register_path``: full
validation against the base model, then an atomic commit), reading ``lora_path`` only from under
``--adapter-import-dir``: unset, or a path that resolves outside it (``..``, an absolute path
elsewhere, a symlink leading out, for the directory's files too) is a 403 and reads nothing.
An unload is ``DELETE /adapters/{id}`` (``adapters.remove_adapter``). Both need the admin key.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field

from prolora_serve.adapters.format import CONFIG_NAME, WEIGHTS_NAME
from prolora_serve.adapters.registry import (AdapterNotFoundError, AdapterRecord, AdapterRegistry,
                                             DuplicateAdapterError)
from prolora_serve.server.engine.threads import off_the_step_thread

from .adapters import refuse_base_model_name, remove_adapter
from .auth import require_admin_key
from .errors import APIError

router = APIRouter(tags=["adapters"], dependencies=[Depends(require_admin_key)])
PERMISSION = "permission_error"  # OpenAI's word for a 403
SETTING = "--adapter-import-dir (PROLORA_SERVE_ADAPTER_IMPORT_DIR)"


class LoadLoRAAdapterRequest(BaseModel):
    """vLLM's body; ``lora_path`` is a directory or ``.safetensors`` file under the import dir
    (absolute, or relative to it)."""

    lora_name: str = Field(description="the adapter id to register (also the `model` to use)")
    lora_path: str = Field(description="adapter directory or single .safetensors file")
    load_inplace: bool = Field(False, description="vLLM's in-place reload: not supported here "
                               "(unload, then load)")


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str = Field(description="the adapter id to remove")
    lora_int_id: int | None = Field(None, description="vLLM's internal id: accepted, unused")


def _forbidden(message: str) -> APIError:
    return APIError(403, message, type=PERMISSION, param="lora_path", code="adapter_path_forbidden")


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve_import_path(import_dir: Path | None, lora_path: str) -> Path:
    """The real path ``lora_path`` names under ``import_dir``, or the refusal: 403 unless it
    and every file a load reads resolve (symlinks followed) inside it; 404 if it is absent."""
    if import_dir is None:
        raise APIError(403, f"loading adapters by path is disabled: {SETTING} is unset (upload "
                       "them with POST /adapters instead)", type=PERMISSION, param="lora_path",
                       code="adapter_import_disabled")
    given = Path(lora_path)
    if ".." in given.parts:
        raise _forbidden(f"lora_path {lora_path!r} contains '..'")
    try:
        root = Path(os.path.realpath(import_dir))
        real = Path(os.path.realpath(given if given.is_absolute() else root / given))
        if not _inside(real, root):
            raise _forbidden(f"lora_path {lora_path!r} is outside {SETTING}")
        _check_target(real, root, lora_path)
    except (ValueError, OSError) as err:  # a NUL byte, a name too long, a symlink loop
        raise APIError(400, f"invalid lora_path {lora_path!r}: {err}", param="lora_path",
                       code="invalid_value") from None
    return real


def _check_target(real: Path, root: Path, lora_path: str) -> None:
    if not real.exists():
        raise APIError(404, f"no adapter found at lora_path {lora_path!r}", param="lora_path",
                       code="adapter_path_not_found")
    if real.is_dir():
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not _inside(Path(os.path.realpath(real / name)), root):
                raise _forbidden(f"{name} in lora_path {lora_path!r} leads outside {SETTING}")
    elif not real.is_file():
        raise APIError(400, f"lora_path {lora_path!r} is neither a file nor a directory",
                       param="lora_path", code="invalid_value")


def _register(registry: AdapterRegistry, name: str, path: Path) -> AdapterRecord:
    try:
        return registry.register_path(name, path)
    except DuplicateAdapterError as err:  # vLLM answers 400 for a name already loaded
        raise APIError(400, str(err), param="lora_name", code="adapter_exists") from None
    except OSError as err:
        raise APIError(400, f"cannot read the adapter at {path}: {err.strerror or err}",
                       param="lora_path", code="invalid_adapter") from None


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse,
             summary="Register an adapter from the import directory (vLLM's dynamic LoRA)")
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> PlainTextResponse:
    if not body.lora_name or not body.lora_path:
        raise APIError(400, "Both 'lora_name' and 'lora_path' must be provided.",
                       param="lora_name" if not body.lora_name else "lora_path",
                       code="invalid_value")
    if body.load_inplace:
        raise APIError(400, "load_inplace is not supported: unload the adapter, then load it",
                       param="load_inplace", code="unsupported")
    state = request.app.state
    path = resolve_import_path(state.config.adapter_import_dir, body.lora_path)
    refuse_base_model_name(request, body.lora_name, "lora_name", status=400)
    await run_in_threadpool(off_the_step_thread(_register), state.registry, body.lora_name, path)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse,
             summary="Remove an adapter (as DELETE /adapters/{id})")
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest,
                              request: Request) -> PlainTextResponse:
    if not body.lora_name:
        raise APIError(400, "'lora_name' needs to be provided to unload a LoRA adapter.",
                       param="lora_name", code="invalid_value")
    try:
        await remove_adapter(request, body.lora_name)
    except AdapterNotFoundError as err:
        raise APIError(404, str(err), param="lora_name", code="adapter_not_found") from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
