"""Bearer-key checks: the API key guards /v1/* and reads, the admin key guards uploads/deletes.

With no admin key set, adapter writes need the API key (if one is set); with neither, the
server is open (it binds 127.0.0.1 by default).
"""

from __future__ import annotations

import hmac

from fastapi import Request

from .errors import AUTHENTICATION, APIError


def _presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key") or None


def _matches(presented: str | None, *keys: str | None) -> bool:
    return presented is not None and any(
        key is not None and hmac.compare_digest(presented.encode(), key.encode()) for key in keys)


def _refuse(what: str) -> APIError:
    return APIError(401, f"missing or invalid {what} (send 'Authorization: Bearer <key>')",
                    type=AUTHENTICATION, code="invalid_api_key")


def has_api_key(request: Request) -> bool:
    """Whether the request may read what the API key guards (always, with no API key set)."""
    config = request.app.state.config
    return config.api_key is None or _matches(_presented_key(request), config.api_key,
                                              config.admin_key)


def require_api_key(request: Request) -> None:
    """Dependency: any configured key (API or admin) opens the read and inference routes."""
    if not has_api_key(request):
        raise _refuse("API key")


def require_admin_key(request: Request) -> None:
    """Dependency for adapter uploads and deletes."""
    config = request.app.state.config
    if config.admin_key is None:
        require_api_key(request)
    elif not _matches(_presented_key(request), config.admin_key):
        raise _refuse("admin key")
