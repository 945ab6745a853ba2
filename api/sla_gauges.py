"""SLA gauges on the API's `/metrics`, read from the minute sketches the workers persist.

The workers publish rolling P90/P99 and error ratios from their in-memory windows; the API has
no windows of its own, so before a scrape it merges the all-tenants rows of `sla_metrics` (the
same sketches, persisted at most a second behind) into the same gauges. A scraper of the API
alone thus sees the SLA figures, and a dashboard taking `max by (operation)` over both jobs is
unchanged. The rows are re-read at most once per `refresh_s`, so scrapes cost one query at most
per interval; when PostgreSQL is unreachable the last figures stay for a minute, then show
empty, and `flexoraa_sla_gauges_age_seconds` tells how old they are.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

from prometheus_client import Gauge

from flexoraa.db import DB_ERRORS
from streams.agents.sla_metrics import publish_rolling
from streams.agents.sla_store import SlaStore
from streams.rules.sla import (
    MINUTE_MS,
    OPERATIONS,
    PLATFORM,
    WINDOWS_MIN,
    MinuteRow,
    minute_of,
    summarise_rows,
)

logger = logging.getLogger(__name__)

SLA_GAUGES_AGE = Gauge(
    "flexoraa_sla_gauges_age_seconds",
    "Seconds since the API last read the SLA gauges from sla_metrics",
)

_QUERY_TIMEOUT_S = 2.0
# Figures older than this are no SLA figures any more: shown empty until PostgreSQL is back.
_STALE_AFTER_S = 60


class SlaGauges:
    def __init__(self, store: SlaStore, refresh_s: float) -> None:
        self._store = store
        self._refresh_s = refresh_s
        self._read_at: float | None = None  # monotonic time of the last successful read
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        """Bring the gauges up to date if they are older than the refresh interval."""
        async with self._lock:  # concurrent scrapes share one query
            if self._read_at is None or time.monotonic() - self._read_at >= self._refresh_s:
                await self._read()
            if self._read_at is not None:
                SLA_GAUGES_AGE.set(time.monotonic() - self._read_at)

    async def _read(self) -> None:
        now_ms = int(datetime.now(UTC).timestamp() * 1000)
        last_minute = minute_of(now_ms)
        longest = max(WINDOWS_MIN.values())
        try:
            async with asyncio.timeout(_QUERY_TIMEOUT_S):
                rows = await self._store.minute_rows(
                    last_minute - (longest - 1) * MINUTE_MS,
                    last_minute + MINUTE_MS,
                    tenant_key=PLATFORM,
                )
        except DB_ERRORS as exc:
            if self._read_at is not None and time.monotonic() - self._read_at > _STALE_AFTER_S:
                # Kept through a long outage, an hour-old P90 fired the alerts (they take the
                # max of the API's figures and the workers' live ones) till it ended.
                logger.warning("SLA gauges not refreshed for over %d s, shown empty: %r",
                               _STALE_AFTER_S, exc)  # fmt: skip
                await asyncio.to_thread(_publish, [], last_minute)
            else:
                logger.warning("SLA gauges not refreshed, keeping the last figures: %r", exc)
            return
        await asyncio.to_thread(_publish, rows, last_minute)
        self._read_at = time.monotonic()


def _publish(rows: list[MinuteRow], last_minute: int) -> None:
    # Every operation, not only those with rows: one quiet for an hour kept its last figures
    # (an 8 s P90 a day later), and the dashboards' max() picked them.
    for operation in sorted({r.operation for r in rows} | set(OPERATIONS)):
        for name, minutes in WINDOWS_MIN.items():
            first = last_minute - (minutes - 1) * MINUTE_MS
            chosen = [r for r in rows if r.operation == operation and r.minute_ms >= first]
            publish_rolling(operation, name, summarise_rows(chosen))
