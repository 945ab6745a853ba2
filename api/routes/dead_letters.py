"""The tenant's dead letters: its records the workers set aside, why, and whether they were
replayed (admin keys only). Operators see every letter with `flexoraa dead-letters list`."""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from api.deps import AdminDep, ServicesDep
from api.errors import DATABASE_ERRORS, ApiError
from api.paging import (
    CursorQuery,
    LimitQuery,
    cursor_time,
    decode_cursor,
    encode_cursor,
)
from schemas.events import EventTime

router = APIRouter(tags=["admin"])


class DeadLetterView(BaseModel):
    letter: str = Field(description="the letter's place on the dead-letter topic: partition:offset")
    dead_lettered_at: datetime
    source: str = Field(description="the topic the record was read from, e.g. lead-events")
    kind: str | None = Field(
        description="invalid_event, processing_failed, sink_rejected, wrong_key, …"
    )
    reason: str
    key: str | None = Field(description="the record's key: its lead, or its tenant")
    record: Any = Field(description="the record, when it is JSON (null otherwise)")
    record_base64: str = Field(description="the record's bytes")
    replayed_at: datetime | None = Field(description="the last time it was put back")
    times_replayed: int


class DeadLetterPage(BaseModel):
    items: list[DeadLetterView]
    next_cursor: str | None


SourceQuery = Annotated[str | None, Query(max_length=200, description="e.g. inbound-messages")]

_LETTERS = """
SELECT d.letter_partition, d.letter_offset, d.dead_lettered_at, d.source_topic, d.kind,
       d.reason, d.record_key, d.record, r.replayed_at, r.times
FROM dead_letters d
LEFT JOIN LATERAL (
    SELECT max(p.replayed_at) AS replayed_at, count(*) AS times FROM dead_letter_replays p
    WHERE p.letter_partition = d.letter_partition AND p.letter_offset = d.letter_offset
      AND p.dead_lettered_at = d.dead_lettered_at
) r ON true
WHERE d.tenant_id = $1
  AND ($2::text IS NULL OR d.kind = $2)
  AND ($3::text IS NULL OR d.source_topic = $3)
  AND ($4::timestamptz IS NULL OR d.dead_lettered_at >= $4)
  AND ($5::timestamptz IS NULL
       OR (d.dead_lettered_at, d.letter_partition, d.letter_offset) < ($5, $6::int, $7::bigint))
ORDER BY d.dead_lettered_at DESC, d.letter_partition DESC, d.letter_offset DESC
LIMIT $8
"""


def _as_json(record: bytes) -> Any:
    try:
        return orjson.loads(record)
    except orjson.JSONDecodeError:
        return None


@router.get(
    "/api/dead-letters", response_model=DeadLetterPage, responses={400: {}, 403: {}, 503: {}}
)
async def dead_letters(
    principal: AdminDep,
    services: ServicesDep,
    limit: LimitQuery = 50,
    cursor: CursorQuery = None,
    kind: Annotated[str | None, Query(max_length=64)] = None,
    source: SourceQuery = None,
    since: EventTime | None = None,
) -> DeadLetterPage:
    """The tenant's records that were set aside (a record naming no tenant is nobody's but the
    operators'), newest first."""
    after: tuple[datetime, int, int] | None = None
    if cursor is not None:
        at, partition, offset = decode_cursor(cursor, 3)
        try:
            after = (cursor_time(at), int(partition), int(offset))
        except ValueError as exc:
            raise ApiError(400, "cursor: not a cursor returned by this API") from exc
        # Past what the columns hold, PostgreSQL would refuse the query (a 500).
        if not (0 <= after[1] < 2**31 and 0 <= after[2] < 2**63):
            raise ApiError(400, "cursor: not a cursor returned by this API")
    prefix = f"{services.topics.prefix}."
    try:
        rows = await services.pool.fetch(
            _LETTERS,
            principal.tenant_id,
            kind,
            prefix + source if source is not None else None,
            since,
            *(after or (None, None, None)),
            limit + 1,
        )
    except DATABASE_ERRORS as exc:
        raise ApiError(503, "dead letters are unavailable: database unreachable") from exc
    items = [
        DeadLetterView(
            letter=f"{row['letter_partition']}:{row['letter_offset']}",
            dead_lettered_at=row["dead_lettered_at"],
            source=row["source_topic"].removeprefix(prefix),
            kind=row["kind"],
            reason=row["reason"],
            key=row["record_key"].decode(errors="replace") if row["record_key"] else None,
            record=_as_json(row["record"]),
            record_base64=base64.b64encode(row["record"]).decode(),
            replayed_at=row["replayed_at"],
            times_replayed=row["times"],
        )
        for row in rows[:limit]
    ]
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1]
        next_cursor = encode_cursor(
            last["dead_lettered_at"].isoformat(),
            str(last["letter_partition"]),
            str(last["letter_offset"]),
        )
    return DeadLetterPage(items=items, next_cursor=next_cursor)
