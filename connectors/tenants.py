"""Per-tenant settings the workers need, cached (they change rarely; a minute's delay is fine)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg


@dataclass(frozen=True)
class TenantProfile:
    leak_threshold_s: int
    time_zone: str
    # None: the platform's QUALIFICATION_* setting applies.
    budget_threshold: float | None
    escalation_days: int | None
    # A connected Gmail mailbox: an e-mail lead's messages can go out (streams.rules.sending).
    mailbox_connected: bool = False


class TenantSettings:
    def __init__(
        self,
        pool_factory: Callable[[], Awaitable[asyncpg.Pool]],
        default_leak_threshold_s: int,
        ttl_s: float = 60.0,
    ) -> None:
        self._pool_factory = pool_factory
        self._default = default_leak_threshold_s
        self._ttl_s = ttl_s
        self._cache: dict[str, tuple[float, TenantProfile]] = {}

    async def profile(self, tenant_id: str) -> TenantProfile:
        cached = self._cache.get(tenant_id)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        pool = await self._pool_factory()
        row = await pool.fetchrow(
            "SELECT leak_threshold_s, time_zone, qualification_budget_threshold,"
            " qualification_escalation_days, EXISTS (SELECT 1 FROM integration_credentials c"
            " WHERE c.tenant_id = t.tenant_id AND c.provider = 'gmail'"
            " AND c.status = 'connected') AS mailbox_connected"
            " FROM tenants t WHERE tenant_id = $1",
            tenant_id,
        )
        profile = TenantProfile(self._default, "UTC", None, None)
        if row is not None:
            budget = row["qualification_budget_threshold"]
            profile = TenantProfile(
                int(row["leak_threshold_s"] or self._default),
                row["time_zone"] or "UTC",
                float(budget) if budget is not None else None,
                row["qualification_escalation_days"],
                row["mailbox_connected"],
            )
        self._cache[tenant_id] = (time.monotonic() + self._ttl_s, profile)
        return profile

    async def leak_threshold_s(self, tenant_id: str) -> int:
        return (await self.profile(tenant_id)).leak_threshold_s

    async def time_zone(self, tenant_id: str) -> str:
        return (await self.profile(tenant_id)).time_zone

    async def mailbox_connected(self, tenant_id: str) -> bool:
        return (await self.profile(tenant_id)).mailbox_connected
