"""Leakage statistics for the caller's tenant."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel

from api.deps import PrincipalDep, ServicesDep
from api.errors import ApiError
from schemas.events import EventTime

router = APIRouter(tags=["monitoring"])


class LeakageStats(BaseModel):
    since: datetime
    until: datetime
    leaks: int
    by_temperature: dict[str, int]
    by_action: dict[str, int]
    first_replies: int
    median_time_to_first_reply_s: float | None
    reassignments_per_sdr: dict[str, int]


@router.get("/api/monitoring/leakage/stats", response_model=LeakageStats, responses={400: {}})
async def leakage_stats(
    principal: PrincipalDep,
    services: ServicesDep,
    since: Annotated[EventTime | None, Query(alias="from")] = None,
    until: Annotated[EventTime | None, Query(alias="to")] = None,
) -> LeakageStats:
    """Leaks by temperature and action, median time to first reply, reassignments per SDR."""
    until = until or datetime.now(UTC)
    since = since or until - timedelta(days=7)
    if since >= until:
        raise ApiError(400, "from must be before to")
    tenant = principal.tenant_id
    leaks = await services.pool.fetch(
        """SELECT temperature, action, count(*) AS n FROM lead_leakage_events
           WHERE tenant_id = $1 AND detected_at >= $2 AND detected_at < $3
           GROUP BY temperature, action""",
        tenant, since, until,
    )  # fmt: skip
    replies = await services.pool.fetchrow(
        """SELECT count(*) AS n,
                  percentile_cont(0.5) WITHIN GROUP (ORDER BY (data->>'waited_ms')::bigint)
                      AS median_ms
           FROM lead_events WHERE tenant_id = $1 AND type = 'first_reply'
             AND occurred_at >= $2 AND occurred_at < $3""",
        tenant, since, until,
    )  # fmt: skip
    moved = await services.pool.fetch(
        """SELECT to_sdr_id, count(*) AS n FROM lead_reassignment_log
           WHERE tenant_id = $1 AND occurred_at >= $2 AND occurred_at < $3
           GROUP BY to_sdr_id""",
        tenant, since, until,
    )  # fmt: skip
    by_temperature: dict[str, int] = {}
    by_action: dict[str, int] = {}
    for row in leaks:
        by_temperature[row["temperature"]] = by_temperature.get(row["temperature"], 0) + row["n"]
        by_action[row["action"]] = by_action.get(row["action"], 0) + row["n"]
    assert replies is not None
    median = replies["median_ms"]
    return LeakageStats(
        since=since,
        until=until,
        leaks=sum(by_temperature.values()),
        by_temperature=by_temperature,
        by_action=by_action,
        first_replies=replies["n"],
        median_time_to_first_reply_s=None if median is None else round(median / 1000, 3),
        reassignments_per_sdr={str(row["to_sdr_id"]): row["n"] for row in moved},
    )


class RecoveryStep(BaseModel):
    step: int
    strategy: str
    attempts: int
    replies: int
    success_rate: float


class RecoveryStats(BaseModel):
    since: datetime
    until: datetime
    attempts: int
    replies: int
    success_rate: float
    median_time_to_reply_s: float | None
    steps: list[RecoveryStep]


@router.get("/api/monitoring/recovery/stats", response_model=RecoveryStats, responses={400: {}})
async def recovery_stats(
    principal: PrincipalDep,
    services: ServicesDep,
    since: Annotated[EventTime | None, Query(alias="from")] = None,
    until: Annotated[EventTime | None, Query(alias="to")] = None,
) -> RecoveryStats:
    """Cold-recovery attempts, replies and success rate per step."""
    until = until or datetime.now(UTC)
    since = since or until - timedelta(days=30)
    if since >= until:
        raise ApiError(400, "from must be before to")
    rows = await services.pool.fetch(
        """SELECT step, strategy, count(*) AS attempts, count(replied_at) AS replies
           FROM lead_recovery_log
           WHERE tenant_id = $1 AND occurred_at >= $2 AND occurred_at < $3
           GROUP BY step, strategy ORDER BY step""",
        principal.tenant_id, since, until,
    )  # fmt: skip
    steps = [
        RecoveryStep(
            step=row["step"],
            strategy=row["strategy"],
            attempts=row["attempts"],
            replies=row["replies"],
            success_rate=round(row["replies"] / row["attempts"], 4) if row["attempts"] else 0.0,
        )
        for row in rows
    ]
    attempts = sum(s.attempts for s in steps)
    replies = sum(s.replies for s in steps)
    median = await services.pool.fetchval(
        """SELECT percentile_cont(0.5) WITHIN GROUP (
                      ORDER BY extract(epoch FROM replied_at - sent_at))
           FROM lead_recovery_log
           WHERE tenant_id = $1 AND occurred_at >= $2 AND occurred_at < $3
             AND replied_at IS NOT NULL""",
        principal.tenant_id, since, until,
    )  # fmt: skip
    return RecoveryStats(
        since=since,
        until=until,
        attempts=attempts,
        replies=replies,
        success_rate=round(replies / attempts, 4) if attempts else 0.0,
        median_time_to_reply_s=None if median is None else round(float(median), 3),
        steps=steps,
    )
