"""PostgreSQL side of SLA monitoring: minute aggregates, violations, uptime, daily reports.

Every write is idempotent: minute rows and uptime rows are upserts of absolute values (never
increments), violations are keyed by a deterministic id, and a day's reports are inserted once.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, date, datetime
from typing import Any

import asyncpg

from streams.rules.sla import (
    MinuteRow,
    MinuteWindow,
    Transition,
    Uptime,
    Violation,
    sketch_from_bytes,
    sketch_to_bytes,
    summarise,
)

PoolFactory = Callable[[], Awaitable[asyncpg.Pool]]


def from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def to_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def violation_from_row(row: asyncpg.Record) -> Violation:
    return Violation(
        violation_id=str(row["violation_id"]),
        tenant_key=row["tenant_key"],
        operation=row["operation"],
        metric=row["metric"],
        target=row["target"],
        worst_value=row["worst_value"],
        started_ms=to_ms(row["started_at"]),
        ended_ms=to_ms(row["ended_at"]) if row["ended_at"] is not None else None,
    )


class SlaStore:
    def __init__(self, pool: PoolFactory) -> None:
        self._pool = pool

    async def upsert_minutes(self, windows: Sequence[MinuteWindow]) -> None:
        if not windows:
            return
        summaries = [summarise(w.calls, w.errors, w.sketch) for w in windows]
        pool = await self._pool()
        await pool.execute(
            """INSERT INTO sla_metrics (operation, tenant_key, minute, calls, errors, p50_ms,
                                        p90_ms, p99_ms, sketch)
               SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::int[],
                                    $5::int[], $6::float8[], $7::float8[], $8::float8[],
                                    $9::bytea[])
               ON CONFLICT (operation, tenant_key, minute) DO UPDATE SET
                   calls = EXCLUDED.calls, errors = EXCLUDED.errors, p50_ms = EXCLUDED.p50_ms,
                   p90_ms = EXCLUDED.p90_ms, p99_ms = EXCLUDED.p99_ms, sketch = EXCLUDED.sketch
               -- A worker that restarted with fewer events of a minute must not shrink it.
               WHERE EXCLUDED.calls >= sla_metrics.calls""",
            [w.operation for w in windows],
            [w.tenant_key for w in windows],
            [from_ms(w.minute_ms) for w in windows],
            [w.calls for w in windows],
            [w.errors for w in windows],
            [s.p50_ms for s in summaries],
            [s.p90_ms for s in summaries],
            [s.p99_ms for s in summaries],
            [sketch_to_bytes(w.sketch) for w in windows],
        )

    async def minute_rows(
        self, start_ms: int, end_ms: int, tenant_key: str | None = None
    ) -> list[MinuteRow]:
        pool = await self._pool()
        rows = await pool.fetch(
            """SELECT operation, tenant_key, minute, calls, errors, sketch FROM sla_metrics
               WHERE minute >= $1 AND minute < $2 AND ($3::text IS NULL OR tenant_key = $3)""",
            from_ms(start_ms),
            from_ms(end_ms),
            tenant_key,
        )
        # Decoded in a thread: a day of every tenant's minutes (the daily report) is about
        # 40 us a row, seconds of a worker's event loop (its probes, its agents) otherwise.
        return await asyncio.to_thread(_minute_rows, rows)

    async def open_violations(self) -> list[Violation]:
        pool = await self._pool()
        rows = await pool.fetch("SELECT * FROM sla_violations WHERE ended_at IS NULL")
        return [violation_from_row(r) for r in rows]

    async def violations_between(self, start_ms: int, end_ms: int) -> list[Violation]:
        pool = await self._pool()
        rows = await pool.fetch(
            """SELECT * FROM sla_violations
               WHERE started_at < $2 AND (ended_at IS NULL OR ended_at > $1)""",
            from_ms(start_ms),
            from_ms(end_ms),
        )
        return [violation_from_row(r) for r in rows]

    async def save_transition(self, transition: Transition) -> bool:
        """Applies one transition; returns False when it had been applied already."""
        v = transition.violation
        pool = await self._pool()
        if transition.kind == "opened":
            status = await pool.execute(
                """INSERT INTO sla_violations (violation_id, tenant_key, operation, metric,
                                               target, worst_value, started_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING""",
                uuid.UUID(v.violation_id), v.tenant_key, v.operation, v.metric, v.target,
                v.worst_value, from_ms(v.started_ms),
            )  # fmt: skip
        elif transition.kind == "worsened":
            status = await pool.execute(
                "UPDATE sla_violations SET worst_value = $2 WHERE violation_id = $1",
                uuid.UUID(v.violation_id),
                v.worst_value,
            )
        else:
            assert v.ended_ms is not None
            status = await pool.execute(
                """UPDATE sla_violations SET ended_at = $2, worst_value = $3
                   WHERE violation_id = $1 AND ended_at IS NULL""",
                uuid.UUID(v.violation_id),
                from_ms(v.ended_ms),
                v.worst_value,
            )
        return not status.endswith(" 0")

    async def record_uptime(
        self,
        prober_id: str,
        minute_ms: int,
        counts: Mapping[str, tuple[int, int]],
        interval_s: float,
    ) -> None:
        components = sorted(counts)
        pool = await self._pool()
        await pool.execute(
            """INSERT INTO sla_uptime (component, minute, prober_id, probes, up, interval_s)
               SELECT c, $2, $3, p, u, $4
               FROM unnest($1::text[], $5::int[], $6::int[]) AS x(c, p, u)
               ON CONFLICT (component, minute, prober_id) DO UPDATE SET
                   probes = EXCLUDED.probes, up = EXCLUDED.up, interval_s = EXCLUDED.interval_s""",
            components,
            from_ms(minute_ms),
            uuid.UUID(prober_id),
            interval_s,
            [counts[c][0] for c in components],
            [counts[c][1] for c in components],
        )

    async def uptime_between(self, start_ms: int, end_ms: int) -> dict[str, Uptime]:
        pool = await self._pool()
        rows = await pool.fetch(
            """SELECT component, sum(probes)::bigint AS probes, sum(up)::bigint AS up,
                      sum((probes - up) * interval_s) AS downtime_s
               FROM sla_uptime WHERE minute >= $1 AND minute < $2 GROUP BY component""",
            from_ms(start_ms),
            from_ms(end_ms),
        )
        return {
            r["component"]: Uptime(r["probes"], r["up"], float(r["downtime_s"] or 0.0))
            for r in rows
        }

    async def report_exists(self, day: date) -> bool:
        pool = await self._pool()
        found = await pool.fetchval(
            "SELECT 1 FROM sla_daily_reports WHERE day = $1 AND tenant_key = ''", day
        )
        return found is not None

    async def save_reports(self, day: date, reports: Mapping[str, Mapping[str, Any]]) -> int:
        """Inserts a day's reports once; a second run of the same day changes nothing."""
        keys = sorted(reports)
        pool = await self._pool()
        status = await pool.execute(
            """INSERT INTO sla_daily_reports (day, tenant_key, report)
               SELECT $1, k, r::jsonb FROM unnest($2::text[], $3::text[]) AS x(k, r)
               ON CONFLICT (day, tenant_key) DO NOTHING""",
            day,
            keys,
            [json.dumps(reports[k]) for k in keys],
        )
        return int(status.rsplit(" ", 1)[-1])


def _minute_rows(rows: list[asyncpg.Record]) -> list[MinuteRow]:
    return [
        MinuteRow(
            operation=r["operation"],
            tenant_key=r["tenant_key"],
            minute_ms=to_ms(r["minute"]),
            calls=r["calls"],
            errors=r["errors"],
            sketch=sketch_from_bytes(r["sketch"]),
        )
        for r in rows
    ]
