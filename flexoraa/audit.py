"""The audit log (append-only in PostgreSQL): record an action in the caller's transaction."""

from __future__ import annotations

import json
from typing import Any

import asyncpg


async def record(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy | asyncpg.Pool,
    *,
    tenant_id: str | None,
    actor: str,
    action: str,
    target: str | None = None,
    details: dict[str, Any] | None = None,
    event_key: str | None = None,
) -> None:
    await conn.execute(
        # text → jsonb in SQL: the same with or without a connection's jsonb codec.
        "INSERT INTO audit_log (tenant_id, actor, action, target, details, event_key)"
        " VALUES ($1, $2, $3, $4, $5::text::jsonb, $6) ON CONFLICT (event_key) DO NOTHING",
        tenant_id,
        actor,
        action,
        target,
        json.dumps(details or {}),
        event_key,
    )
