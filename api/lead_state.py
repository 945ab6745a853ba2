"""Reads live table state from the workers (any worker routes to the partition owner)."""

from __future__ import annotations

from typing import Any

import aiohttp


class StateUnavailable(RuntimeError):
    """No worker answered; the live state cannot be read right now."""


class LeadStateClient:
    """aiohttp, not httpx: httpx's pool polls every idle connection's socket on each request,
    and that took a quarter of the API's time at 420 reads/s (py-spy, bench.reads), which was
    then the API's ceiling."""

    def __init__(self, worker_url: str, timeout_s: float = 2.0) -> None:
        self._base = worker_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Created on first use, inside the running loop.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=200), timeout=self._timeout
            )
        return self._session

    async def _get(self, path: str) -> tuple[int, Any]:
        try:
            async with self._client().get(f"{self._base}{path}") as response:
                if response.status == 200:
                    return response.status, await response.json()
                return response.status, (await response.text())[:200]
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise StateUnavailable(f"worker unreachable: {exc!r}") from exc

    async def session(self, lead_id: str) -> dict[str, Any] | None:
        state = await self.lead(lead_id)
        return None if state is None else state["session"]

    async def lead(self, lead_id: str) -> dict[str, Any] | None:
        """The lead's live tables: {"session": …, "qualification": … or None, "deferred_ai"}."""
        status, body = await self._get(f"/internal/leads/{lead_id}")
        if status == 404:
            return None
        if status != 200:
            raise StateUnavailable(f"worker answered {status}: {body}")
        state: dict[str, Any] = body
        return state

    async def tenant_tokens(self, tenant_id: str) -> dict[str, Any]:
        """The tenant's live token account (zeros before its first credit)."""
        status, body = await self._get(f"/internal/tenants/{tenant_id}/tokens")
        if status != 200:
            raise StateUnavailable(f"worker answered {status}: {body}")
        account: dict[str, Any] = body
        return account

    async def is_reachable(self) -> bool:
        try:
            status, _ = await self._get("/health")
        except StateUnavailable:
            return False
        return status == 200

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
