"""Rate limits per API key and per webhook sender (429 with Retry-After).

Counters are kept in this process (`limits`' in-memory sliding-window storage): with N API
replicas behind a load balancer a key gets at most N times its limit. A shared store (Redis)
is one `storage` URI away if that ever matters more than the extra moving part.
"""

from __future__ import annotations

import math
import time

from limits import RateLimitItem, parse_many
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from api.errors import ApiError


class RateLimiter:
    def __init__(self, api_limits: str, webhook_limits: str) -> None:
        storage = MemoryStorage()
        self._limiter = SlidingWindowCounterRateLimiter(storage)
        self._api: list[RateLimitItem] = parse_many(api_limits)
        self._webhook: list[RateLimitItem] = parse_many(webhook_limits)

    async def check_api_key(self, key_id: str) -> None:
        await self._check(self._api, "key", key_id, "API key")

    async def check_webhook(self, source: str) -> None:
        await self._check(self._webhook, "webhook", source, "webhook sender")

    async def _check(self, items: list[RateLimitItem], scope: str, who: str, what: str) -> None:
        for item in items:
            if not await self._limiter.hit(item, scope, who):
                stats = await self._limiter.get_window_stats(item, scope, who)
                retry_after = max(1, math.ceil(stats.reset_time - time.time()))
                raise ApiError(
                    429,
                    f"rate limit of {item} per {what} exceeded; retry after {retry_after} s",
                    headers={"Retry-After": str(retry_after)},
                )
