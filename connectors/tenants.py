"""Per-tenant settings the workers need, cached (they change rarely; a minute's delay is fine)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import asyncpg


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
        self._cache: dict[str, tuple[float, int, str]] = {}

    async def _load(self, tenant_id: str) -> tuple[int, str]:
        cached = self._cache.get(tenant_id)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1], cached[2]
        pool = await self._pool_factory()
        row = await pool.fetchrow(
            "SELECT leak_threshold_s, time_zone FROM tenants WHERE tenant_id = $1", tenant_id
        )
        threshold = self._default
        time_zone = "UTC"
        if row is not None:
            threshold = int(row["leak_threshold_s"] or self._default)
            time_zone = row["time_zone"] or "UTC"
        self._cache[tenant_id] = (time.monotonic() + self._ttl_s, threshold, time_zone)
        return threshold, time_zone

    async def leak_threshold_s(self, tenant_id: str) -> int:
        return (await self._load(tenant_id))[0]

    async def time_zone(self, tenant_id: str) -> str:
        return (await self._load(tenant_id))[1]
