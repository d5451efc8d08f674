"""Cursor pagination of ``GET /adapters``, in the shape of OpenAI's list endpoints.

``{"object": "list", "data": [...], "has_more": bool, "first_id": str | null, "last_id": ...}``;
query ``limit`` (default ``DEFAULT_LIMIT``, at most ``MAX_LIMIT``) and ``after`` (an adapter id:
the page starts after it). Adapters are listed in id order (byte order), so ``after`` is a
position: an id that is not registered (for instance deleted while a client pages) is not an
error, the page starts where it would have been; past the last id the page is empty with
``has_more`` false. An ``after`` that is not a valid adapter id is a 400 naming ``after``.
The official ``openai`` client's ``SyncCursorPage`` pages through it unchanged.
"""

from __future__ import annotations

from pydantic import Field

from .schemas import AdapterList

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
AFTER_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"  # adapters/registry.py ADAPTER_ID_PATTERN


class AdapterPage(AdapterList):
    has_more: bool = Field(description="more adapters follow: ask again with after=last_id")
    first_id: str | None = None
    last_id: str | None = None
