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
        self._cache: dict[str, tuple[float, int]] = {}

    async def leak_threshold_s(self, tenant_id: str) -> int:
        cached = self._cache.get(tenant_id)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        pool = await self._pool_factory()
        value = await pool.fetchval(
            "SELECT leak_threshold_s FROM tenants WHERE tenant_id = $1", tenant_id
        )
        threshold = int(value) if value is not None else self._default
        self._cache[tenant_id] = (time.monotonic() + self._ttl_s, threshold)
        return threshold
