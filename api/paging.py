"""Keyset paging shared by the list endpoints: an opaque cursor naming the last item of a page,
and the errors that mean PostgreSQL, not the request, failed."""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Annotated

from fastapi import Query

from api.errors import ApiError
from schemas.events import is_supported_time

LimitQuery = Annotated[int, Query(ge=1, le=200, description="items per page")]
CursorQuery = Annotated[str | None, Query(max_length=200, description="next_cursor of a page")]


def encode_cursor(*parts: str) -> str:
    return base64.urlsafe_b64encode(json.dumps(parts).encode()).decode()


def decode_cursor(cursor: str, arity: int) -> list[str]:
    try:
        parts = json.loads(base64.urlsafe_b64decode(cursor.encode()))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "cursor: not a cursor returned by this API") from exc
    texts = [str(part) for part in parts] if isinstance(parts, list) else []
    # No NUL: PostgreSQL's text refuses it (a 500).
    if len(texts) != arity or any("\x00" in text for text in texts):
        raise ApiError(400, "cursor: not a cursor returned by this API")
    return texts


def cursor_time(text: str) -> datetime:
    """A time a cursor carries, within what PostgreSQL and Python both hold (a crafted cursor
    at year 9999 in another zone overflowed converting to UTC: a 500)."""
    try:
        at = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ApiError(400, "cursor: not a cursor returned by this API") from exc
    if at.tzinfo is None or not is_supported_time(at):
        raise ApiError(400, "cursor: not a cursor returned by this API")
    return at
