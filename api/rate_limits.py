"""Rate limits per API key and per webhook sender (429 with Retry-After).

Counters are kept in this process (`limits`' in-memory sliding-window storage): with N API
replicas behind a load balancer a key gets at most N times its limit. A shared store (Redis)
is one `storage` URI away if that ever matters more than the extra moving part.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from collections.abc import AsyncIterator

from limits import RateLimitItem, parse_many
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from api.errors import ApiError


class RateLimiter:
    def __init__(self, api_limits: str, webhook_limits: str, auth_failure_limits: str) -> None:
        storage = MemoryStorage()
        self._limiter = SlidingWindowCounterRateLimiter(storage)
        self._api: list[RateLimitItem] = parse_many(api_limits)
        self._webhook: list[RateLimitItem] = parse_many(webhook_limits)
        self._auth_failures: list[RateLimitItem] = parse_many(auth_failure_limits)
        # Per client address, its lookups of keys not verified before that are under way.
        self._lookups: Counter[str] = Counter()

    @contextlib.asynccontextmanager
    async def unverified_key_lookup(self, source: str) -> AsyncIterator[None]:
        """Around the lookup of a key not verified before: 429 for an address whose keys kept
        failing, before its next key costs a lookup (keys nobody issued were an unlimited
        stream of database queries). The address's lookups under way count as failures until
        they end: counted only once failed, any number sent at once all passed the check."""
        in_flight = self._lookups[source] + 1
        for item in self._auth_failures:
            if not await self._limiter.test(item, "auth-failure", source, cost=in_flight):
                what = "client address's failed keys"
                raise await self._limited_error(item, "auth-failure", source, what)
        self._lookups[source] = in_flight
        try:
            yield
        finally:
            self._lookups[source] -= 1
            if not self._lookups[source]:
                del self._lookups[source]

    async def count_auth_failure(self, source: str) -> None:
        for item in self._auth_failures:
            await self._limiter.hit(item, "auth-failure", source)

    async def check_api_key(self, key_id: str) -> None:
        await self._check(self._api, "key", key_id, "API key")

    async def check_webhook(self, source: str) -> None:
        await self._check(self._webhook, "webhook", source, "webhook sender")

    async def _check(self, items: list[RateLimitItem], scope: str, who: str, what: str) -> None:
        for item in items:
            if not await self._limiter.hit(item, scope, who):
                raise await self._limited_error(item, scope, who, what)

    async def _limited_error(
        self, item: RateLimitItem, scope: str, who: str, what: str
    ) -> ApiError:
        stats = await self._limiter.get_window_stats(item, scope, who)
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        return ApiError(
            429,
            f"rate limit of {item} per {what} exceeded; retry after {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )
