"""Uptime probes of the API, the workers, Kafka and PostgreSQL.

The prober runs on the leader worker only (a Faust `on_leader` timer), because:
* exactly one prober in the cluster means each probe round is counted once;
* it is independent of the API, so an API outage is observed and recorded (an API background
  task could not record its own downtime);
* the worker already holds the clients it needs (Kafka, a PostgreSQL pool, an HTTP session),
  and when the leader dies another worker becomes leader and probing continues.
What it cannot see is a moment with no worker at all; the reports show probe counts, so such
a gap is visible as missing probes rather than hidden as uptime.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import aiohttp
import asyncpg

from flexoraa.db import DB_ERRORS
from flexoraa.kafka import EventPublisher

logger = logging.getLogger(__name__)

COMPONENTS = ("api", "workers", "kafka", "postgres")


class Prober:
    def __init__(
        self,
        *,
        http: Callable[[], aiohttp.ClientSession],
        api_url: str,
        worker_urls: Callable[[], set[str]],
        publisher: EventPublisher,
        pool: Callable[[], Awaitable[asyncpg.Pool]],
        timeout_s: float,
    ) -> None:
        self._http = http
        self._api_url = api_url.rstrip("/")
        self._worker_urls = worker_urls
        self._publisher = publisher
        self._pool = pool
        self._timeout_s = timeout_s

    async def probe(self) -> dict[str, bool]:
        """One round: every component probed concurrently; 'platform' is up when all are."""
        results = await asyncio.gather(
            self._api(), self._workers(), self._kafka(), self._postgres()
        )
        found = dict(zip(COMPONENTS, results, strict=True))
        found["platform"] = all(results)
        return found

    async def _get_ok(self, url: str) -> bool:
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._http().get(url) as response:
                    return response.status == 200
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False

    async def _api(self) -> bool:
        return await self._get_ok(f"{self._api_url}/health")

    async def _workers(self) -> bool:
        # Every worker the group knows (its table routing metadata) must be ready; a worker
        # that is rebalancing or recovering answers 503 and counts as down for that round.
        urls = self._worker_urls()
        if not urls:
            return False
        answers = await asyncio.gather(*(self._get_ok(f"{u.rstrip('/')}/ready") for u in urls))
        return all(answers)

    async def _kafka(self) -> bool:
        try:
            async with asyncio.timeout(self._timeout_s):
                return await self._publisher.is_reachable()
        except TimeoutError:
            return False

    async def _postgres(self) -> bool:
        try:
            async with asyncio.timeout(self._timeout_s):
                pool = await self._pool()
                return bool(await pool.fetchval("SELECT 1") == 1)
        except DB_ERRORS:
            return False
