"""Keyset paging shared by the list endpoints: an opaque cursor naming the last item of a page,
and the errors that mean PostgreSQL, not the request, failed."""

from __future__ import annotations

import base64
import json
from typing import Annotated

import asyncpg
from fastapi import Query

from api.errors import ApiError

LimitQuery = Annotated[int, Query(ge=1, le=200, description="items per page")]
CursorQuery = Annotated[str | None, Query(max_length=200, description="next_cursor of a page")]

# PostgreSQL unreachable: a 503 to retry, not a 500.
DATABASE_ERRORS = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, TimeoutError)


def encode_cursor(*parts: str) -> str:
    return base64.urlsafe_b64encode(json.dumps(parts).encode()).decode()


def decode_cursor(cursor: str, arity: int) -> list[str]:
    try:
        parts = json.loads(base64.urlsafe_b64decode(cursor.encode()))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "cursor: not a cursor returned by this API") from exc
    if not isinstance(parts, list) or len(parts) != arity:
        raise ApiError(400, "cursor: not a cursor returned by this API")
    return [str(part) for part in parts]
