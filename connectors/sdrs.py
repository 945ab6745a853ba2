"""SDR routing: round robin among the tenant's active SDRs that are under their maximum."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from asyncpg.pool import PoolConnectionProxy


@dataclass(frozen=True, slots=True)
class Assignment:
    sdr_id: str
    name: str
    email: str
    newly_assigned: bool


class SdrRouter:
    def __init__(self, pool_factory: Callable[[], Awaitable[asyncpg.Pool]]) -> None:
        self._pool_factory = pool_factory

    async def assign(self, tenant_id: str, lead_id: str, reason: str) -> Assignment | None:
        """The lead's SDR: its existing assignment, else the least recently assigned eligible
        SDR. Idempotent per lead, so a replayed event never assigns twice."""
        pool = await self._pool_factory()
        async with pool.acquire() as conn, conn.transaction():
            existing = await conn.fetchrow(
                """SELECT s.sdr_id, s.name, s.email, s.active, a.closed_at FROM sdr_assignments a
                   JOIN sdrs s USING (sdr_id) WHERE a.lead_id = $1 FOR UPDATE OF a""",
                lead_id,
            )
            if existing is not None and existing["closed_at"] is None and not existing["active"]:
                # Its SDR left (deactivated): the lead goes to an active one, not stays with
                # someone who will never answer it.
                moved = await _reassign(
                    conn, tenant_id, lead_id, reason, f"inactive:{existing['sdr_id']}"
                )
                return moved.to_sdr if moved is not None else None  # none free: the admins'
            if existing is not None:
                # Closed (won, lost) stays closed, with its SDR: the interview that escalated
                # it goes on and completes, and reopening it then wiped the SDR's outcome.
                return Assignment(
                    str(existing["sdr_id"]), existing["name"], existing["email"], False
                )
            await _hold_rotation(conn, tenant_id)
            chosen = await conn.fetchrow(
                """SELECT sdr_id, name, email FROM sdrs
                   WHERE tenant_id = $1 AND active AND open_leads < max_open_leads
                   ORDER BY last_assigned_at NULLS FIRST, created_at, sdr_id
                   LIMIT 1 FOR UPDATE""",
                tenant_id,
            )
            if chosen is None:
                return None
            await conn.execute(
                "INSERT INTO sdr_assignments (lead_id, tenant_id, sdr_id, reason)"
                " VALUES ($1, $2, $3, $4)",
                lead_id,
                tenant_id,
                chosen["sdr_id"],
                reason,
            )
            await conn.execute(
                "UPDATE sdrs SET open_leads = open_leads + 1, last_assigned_at = clock_timestamp()"
                " WHERE sdr_id = $1",
                chosen["sdr_id"],
            )
            return Assignment(str(chosen["sdr_id"]), chosen["name"], chosen["email"], True)

    async def reassign(
        self, tenant_id: str, lead_id: str, reason: str, cause: str
    ) -> Reassignment | None:
        """Move the lead to another eligible SDR (round robin); None if there is none.
        Idempotent per `cause` (the id of what moved it): the same cause repeats its move."""
        pool = await self._pool_factory()
        async with pool.acquire() as conn, conn.transaction():
            return await _reassign(conn, tenant_id, lead_id, reason, cause)


async def close_lead(
    pool: asyncpg.Pool, tenant_id: str, lead_id: str, outcome: str
) -> tuple[str, str, datetime] | None:
    """Closes the tenant's lead's assignment with `outcome`, releasing its SDR's slot once:
    (sdr_id, outcome, closed_at), those of the first close when it was closed before; None if
    the tenant has no such assigned lead."""
    async with pool.acquire() as conn, conn.transaction():
        closed = await conn.fetchrow(
            "UPDATE sdr_assignments SET closed_at = now(), outcome = $3"
            " WHERE lead_id = $1 AND tenant_id = $2 AND closed_at IS NULL"
            " RETURNING sdr_id, outcome, closed_at",
            lead_id, tenant_id, outcome,
        )  # fmt: skip
        if closed is not None:
            await conn.execute(
                "UPDATE sdrs SET open_leads = greatest(open_leads - 1, 0) WHERE sdr_id = $1",
                closed["sdr_id"],
            )
        else:
            closed = await conn.fetchrow(
                "SELECT sdr_id, outcome, closed_at FROM sdr_assignments"
                " WHERE lead_id = $1 AND tenant_id = $2",
                lead_id, tenant_id,
            )  # fmt: skip
    if closed is None:
        return None
    return str(closed["sdr_id"]), closed["outcome"], closed["closed_at"]


@dataclass(frozen=True, slots=True)
class Reassignment:
    from_sdr: Assignment | None
    to_sdr: Assignment


async def _reassign(
    conn: PoolConnectionProxy[asyncpg.Record],
    tenant_id: str,
    lead_id: str,
    reason: str,
    cause: str,
) -> Reassignment | None:
    current = await conn.fetchrow(
        """SELECT s.sdr_id, s.name, s.email, a.cause, a.closed_at, p.sdr_id AS previous_id,
                  p.name AS previous_name, p.email AS previous_email
           FROM sdr_assignments a JOIN sdrs s USING (sdr_id)
           LEFT JOIN sdrs p ON p.sdr_id = a.previous_sdr_id
           WHERE a.lead_id = $1 FOR UPDATE OF a""",
        lead_id,
    )
    if current is not None and current["closed_at"] is not None:
        # Closed (won, lost): a leak of its later message is no reason to reopen it with
        # another SDR, its outcome erased.
        return None
    if current is not None and current["cause"] == cause:
        # Done before: the worker stopped after the move and before it was marked fired.
        before = (
            Assignment(str(current["previous_id"]), current["previous_name"],
                       current["previous_email"], False)
            if current["previous_id"] is not None
            else None
        )  # fmt: skip
        return Reassignment(
            before, Assignment(str(current["sdr_id"]), current["name"], current["email"], False)
        )
    await _hold_rotation(conn, tenant_id)
    chosen = await conn.fetchrow(
        """SELECT sdr_id, name, email FROM sdrs
           WHERE tenant_id = $1 AND active AND open_leads < max_open_leads
             AND ($2::uuid IS NULL OR sdr_id <> $2::uuid)
           ORDER BY last_assigned_at NULLS FIRST, created_at, sdr_id
           LIMIT 1 FOR UPDATE""",
        tenant_id,
        current["sdr_id"] if current else None,
    )
    if chosen is None:
        return None
    await conn.execute(
        """INSERT INTO sdr_assignments (lead_id, tenant_id, sdr_id, reason, cause,
                                        previous_sdr_id)
           VALUES ($1, $2, $3, $4, $5, $6)
           ON CONFLICT (lead_id) DO UPDATE SET sdr_id = EXCLUDED.sdr_id,
               reason = EXCLUDED.reason, assigned_at = now(), cause = EXCLUDED.cause,
               previous_sdr_id = EXCLUDED.previous_sdr_id, closed_at = NULL, outcome = NULL""",
        lead_id,
        tenant_id,
        chosen["sdr_id"],
        reason,
        cause,
        current["sdr_id"] if current else None,
    )
    if current is not None and current["closed_at"] is None:  # a closed one was released
        await conn.execute(
            "UPDATE sdrs SET open_leads = greatest(open_leads - 1, 0) WHERE sdr_id = $1",
            current["sdr_id"],
        )
    await conn.execute(
        "UPDATE sdrs SET open_leads = open_leads + 1, last_assigned_at = clock_timestamp()"
        " WHERE sdr_id = $1",
        chosen["sdr_id"],
    )
    previous = (
        Assignment(str(current["sdr_id"]), current["name"], current["email"], False)
        if current
        else None
    )
    return Reassignment(
        previous, Assignment(str(chosen["sdr_id"]), chosen["name"], chosen["email"], True)
    )


async def _hold_rotation(conn: PoolConnectionProxy[asyncpg.Record], tenant_id: str) -> None:
    """Takes the tenant's rotation until the transaction ends. FOR UPDATE on the chosen SDR
    did not serialise it: a transaction that waited for the row lock re-checks only the WHERE
    clause, not the ORDER BY, so two leads assigned at once both went to the same SDR."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('sdr-rotation:' || $1))", tenant_id)
