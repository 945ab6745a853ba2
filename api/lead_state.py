"""Reads live table state from the workers (any worker routes to the partition owner)."""

from __future__ import annotations

from typing import Any

import httpx


class StateUnavailable(RuntimeError):
    """No worker answered; the live state cannot be read right now."""


class LeadStateClient:
    def __init__(self, worker_url: str, timeout_s: float = 2.0) -> None:
        self._client = httpx.AsyncClient(
            base_url=worker_url,
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
        )

    async def session(self, lead_id: str) -> dict[str, Any] | None:
        state = await self.lead(lead_id)
        return None if state is None else state["session"]

    async def lead(self, lead_id: str) -> dict[str, Any] | None:
        """The lead's live tables: {"session": …, "qualification": … or None}."""
        try:
            response = await self._client.get(f"/internal/leads/{lead_id}")
        except httpx.HTTPError as exc:
            raise StateUnavailable(f"worker unreachable: {exc!r}") from exc
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise StateUnavailable(f"worker answered {response.status_code}: {response.text[:200]}")
        state: dict[str, Any] = response.json()
        return state

    async def tenant_tokens(self, tenant_id: str) -> dict[str, Any]:
        """The tenant's live token account (zeros before its first credit)."""
        try:
            response = await self._client.get(f"/internal/tenants/{tenant_id}/tokens")
        except httpx.HTTPError as exc:
            raise StateUnavailable(f"worker unreachable: {exc!r}") from exc
        if response.status_code != 200:
            raise StateUnavailable(f"worker answered {response.status_code}: {response.text[:200]}")
        account: dict[str, Any] = response.json()
        return account

    async def is_reachable(self) -> bool:
        try:
            response = await self._client.get("/health")
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def close(self) -> None:
        await self._client.aclose()
