"""SLA monitoring for a tenant: current rolling figures and the last hours as series.

Everything latency-related is the caller's tenant only (`sla_metrics.tenant_key` = tenant id).
Uptime is platform-wide (every tenant runs on the same API, workers, Kafka and PostgreSQL), so
it is the one all-tenants figure shown.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated

import asyncpg
from fastapi import APIRouter, Query
from pydantic import BaseModel

from api.deps import PrincipalDep, ServicesDep
from api.errors import ApiError
from flexoraa.db import DB_ERRORS
from streams.agents.sla_store import SlaStore, from_ms, violation_from_row
from streams.rules.sla import (
    MINUTE_MS,
    WINDOWS_MIN,
    MinuteRow,
    Rolling,
    Violation,
    day_bounds_ms,
    minute_of,
    month_bounds_ms,
    summarise_rows,
)

router = APIRouter(tags=["monitoring"])


class WindowFigures(BaseModel):
    calls: int
    errors: int
    error_rate: float | None
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    p90_met: bool | None
    error_rate_met: bool | None


class OperationNow(BaseModel):
    p90_target_ms: float | None
    windows: dict[str, WindowFigures]


class ViolationView(BaseModel):
    violation_id: str
    operation: str
    metric: str
    target: float
    worst_value: float
    started_at: datetime
    ended_at: datetime | None


class UptimeView(BaseModel):
    day: float | None
    month: float | None
    downtime_s_month: float
    probes_month: int


class Targets(BaseModel):
    p90_ms: dict[str, float]
    error_rate: float
    uptime: float


class SlaCurrent(BaseModel):
    tenant_id: str
    at: datetime
    targets: Targets
    operations: dict[str, OperationNow]
    open_violations: list[ViolationView]
    uptime: dict[str, UptimeView]


class SeriesPoint(BaseModel):
    at: datetime
    calls: int
    errors: int
    error_rate: float | None
    p90_ms: float | None
    p99_ms: float | None


class SlaDashboard(BaseModel):
    tenant_id: str
    start: datetime
    end: datetime
    step_min: int
    targets: Targets
    series: dict[str, list[SeriesPoint]]
    violations: list[ViolationView]


def _targets(services: ServicesDep) -> Targets:
    s = services.settings
    return Targets(
        p90_ms={
            "ai_message": s.sla_target_ai_message_p90_ms,
            "verification": s.sla_target_verification_p90_ms,
            "routing": s.sla_target_routing_p90_ms,
        },
        error_rate=s.sla_target_error_rate,
        uptime=s.sla_target_uptime,
    )


def _view(v: Violation) -> ViolationView:
    return ViolationView(
        violation_id=v.violation_id,
        operation=v.operation,
        metric=v.metric,
        target=v.target,
        worst_value=v.worst_value,
        started_at=from_ms(v.started_ms),
        ended_at=from_ms(v.ended_ms) if v.ended_ms is not None else None,
    )


def _figures(summary: Rolling, targets: Targets, operation: str) -> WindowFigures:
    p90_target = targets.p90_ms.get(operation)
    rate = summary.error_rate
    return WindowFigures(
        calls=summary.calls,
        errors=summary.errors,
        error_rate=rate,
        p50_ms=summary.p50_ms,
        p90_ms=summary.p90_ms,
        p99_ms=summary.p99_ms,
        p90_met=None
        if p90_target is None or summary.p90_ms is None
        else summary.p90_ms <= p90_target,
        error_rate_met=None if rate is None else rate <= targets.error_rate,
    )


async def _violations(
    pool: asyncpg.Pool, tenant_id: str, since: datetime, *, open_only: bool
) -> list[Violation]:
    rows = await pool.fetch(
        """SELECT * FROM sla_violations
           WHERE tenant_key = $1
             AND (ended_at IS NULL OR (NOT $3 AND ended_at > $2))
           ORDER BY started_at DESC LIMIT 500""",
        tenant_id,
        since,
        open_only,
    )
    return [violation_from_row(r) for r in rows]


def _store(pool: asyncpg.Pool) -> SlaStore:
    async def factory() -> asyncpg.Pool:
        return pool

    return SlaStore(factory)


@router.get("/api/monitoring/sla/current", response_model=SlaCurrent, responses={503: {}})
async def sla_current(principal: PrincipalDep, services: ServicesDep) -> SlaCurrent:
    """Rolling P50/P90/P99 and error rate over 5 minutes and 1 hour per operation, the open
    violations (this tenant's), and platform uptime today and this month."""
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    targets = _targets(services)
    store = _store(services.pool)
    last_minute = minute_of(now_ms)
    longest = max(WINDOWS_MIN.values())
    today = datetime.now(UTC).date()
    try:
        rows = await store.minute_rows(
            last_minute - (longest - 1) * MINUTE_MS,
            last_minute + MINUTE_MS,
            tenant_key=principal.tenant_id,
        )
        open_violations = await _violations(
            services.pool, principal.tenant_id, from_ms(now_ms), open_only=True
        )
        day = await store.uptime_between(day_bounds_ms(today)[0], now_ms + 1)
        month = await store.uptime_between(month_bounds_ms(today)[0], now_ms + 1)
    except DB_ERRORS as exc:
        raise ApiError(503, "SLA figures are unavailable: database unreachable") from exc

    def compute() -> dict[str, OperationNow]:
        operations: dict[str, OperationNow] = {}
        for operation in sorted({r.operation for r in rows}):
            windows = {}
            for name, minutes in WINDOWS_MIN.items():
                first = last_minute - (minutes - 1) * MINUTE_MS
                chosen = [r for r in rows if r.operation == operation and r.minute_ms >= first]
                windows[name] = _figures(summarise_rows(chosen), targets, operation)
            operations[operation] = OperationNow(
                p90_target_ms=targets.p90_ms.get(operation), windows=windows
            )
        return operations

    operations = await asyncio.to_thread(compute)
    uptime = {
        component: UptimeView(
            day=day[component].ratio if component in day else None,
            month=figures.ratio,
            downtime_s_month=round(figures.downtime_s, 3),
            probes_month=figures.probes,
        )
        for component, figures in sorted(month.items())
    }
    return SlaCurrent(
        tenant_id=principal.tenant_id,
        at=from_ms(now_ms),
        targets=targets,
        operations=operations,
        open_violations=[_view(v) for v in open_violations],
        uptime=uptime,
    )


@router.get(
    "/api/monitoring/sla/dashboard", response_model=SlaDashboard, responses={422: {}, 503: {}}
)
async def sla_dashboard(
    principal: PrincipalDep,
    services: ServicesDep,
    hours: Annotated[int, Query(ge=1, le=24, description="how far back")] = 24,
    step_min: Annotated[int, Query(ge=1, le=60, description="minutes per point")] = 5,
) -> SlaDashboard:
    """The last `hours` hours per operation as series (one point per `step_min` minutes, every
    point present, empty ones with no calls), and the violations of that period."""
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    step_ms = step_min * MINUTE_MS
    end_ms = minute_of(now_ms) + MINUTE_MS
    start_ms = end_ms - hours * 3_600_000
    start_ms -= start_ms % step_ms  # points aligned on the step (UTC)
    store = _store(services.pool)
    try:
        rows = await store.minute_rows(start_ms, end_ms, tenant_key=principal.tenant_id)
        violations = await _violations(
            services.pool, principal.tenant_id, from_ms(start_ms), open_only=False
        )
    except DB_ERRORS as exc:
        raise ApiError(503, "SLA figures are unavailable: database unreachable") from exc

    def compute() -> dict[str, list[SeriesPoint]]:
        buckets: dict[tuple[str, int], list[MinuteRow]] = {}
        for row in rows:
            bucket = row.minute_ms - (row.minute_ms - start_ms) % step_ms
            buckets.setdefault((row.operation, bucket), []).append(row)
        series: dict[str, list[SeriesPoint]] = {}
        for operation in sorted({r.operation for r in rows}):
            points = []
            for bucket in range(start_ms, end_ms, step_ms):
                summary = summarise_rows(buckets.get((operation, bucket), []))
                points.append(
                    SeriesPoint(
                        at=from_ms(bucket),
                        calls=summary.calls,
                        errors=summary.errors,
                        error_rate=summary.error_rate,
                        p90_ms=summary.p90_ms,
                        p99_ms=summary.p99_ms,
                    )
                )
            series[operation] = points
        return series

    # Merging a day of minute sketches is CPU work; off the event loop it delays no request.
    series = await asyncio.to_thread(compute)
    return SlaDashboard(
        tenant_id=principal.tenant_id,
        start=from_ms(start_ms),
        end=from_ms(end_ms),
        step_min=step_min,
        targets=_targets(services),
        series=series,
        violations=[_view(v) for v in violations if v.started_ms < end_ms],
    )
