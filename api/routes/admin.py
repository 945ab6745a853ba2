"""Tenant administration: API keys and the audit log (admin keys only)."""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response
from pydantic import ConfigDict, Field, field_validator

from api.deps import AdminDep, PrincipalDep, ServicesDep
from api.errors import ApiError
from api.models import RequestBody
from api.paging import CursorQuery, cursor_time, decode_cursor, encode_cursor
from api.tenants import create_api_key
from flexoraa import audit
from schemas.events import EventTime
from streams.rules.recovery import known_zone

router = APIRouter(tags=["admin"])


class KeyRequest(RequestBody):
    model_config = ConfigDict(extra="forbid")
    role: Literal["admin", "sdr", "connector"] = "sdr"


@router.post("/api/keys", status_code=201, responses={403: {}})
async def create_key(
    body: KeyRequest, principal: AdminDep, services: ServicesDep
) -> dict[str, Any]:
    """A new API key, shown once (stored only as a hash)."""
    async with services.pool.acquire() as conn, conn.transaction():
        key_id, api_key = await create_api_key(
            conn, principal.tenant_id, body.role, actor=f"key:{principal.key_id}"
        )
    return {"key_id": key_id, "api_key": api_key, "role": body.role}


@router.get("/api/keys", responses={403: {}})
async def list_keys(principal: AdminDep, services: ServicesDep) -> list[dict[str, Any]]:
    rows = await services.pool.fetch(
        "SELECT key_id::text, key_prefix, role, created_at, revoked_at FROM api_keys"
        " WHERE tenant_id = $1 ORDER BY created_at",
        principal.tenant_id,
    )
    return [dict(r) for r in rows]


@router.delete("/api/keys/{key_id}", status_code=204, responses={403: {}, 404: {}})
async def revoke_key(key_id: str, principal: AdminDep, services: ServicesDep) -> Response:
    try:
        parsed = uuid.UUID(key_id)
    except ValueError:
        raise ApiError(404, "no such API key") from None
    async with services.pool.acquire() as conn, conn.transaction():
        revoked = await conn.fetchval(
            "UPDATE api_keys SET revoked_at = now() WHERE key_id = $1 AND tenant_id = $2"
            " AND revoked_at IS NULL RETURNING 1",
            parsed, principal.tenant_id,
        )  # fmt: skip
        if revoked is None:
            raise ApiError(404, "no such API key")
        await audit.record(conn, tenant_id=principal.tenant_id, actor=f"key:{principal.key_id}",
                           action="api_key.revoked", target=key_id)  # fmt: skip
    # The canonical text: the cache holds principals by it, and the path may be any form a
    # UUID can take (upper case, braces), which left the revoked key cached.
    services.principals.forget_key(str(parsed))
    return Response(status_code=204)


@router.get("/api/audit-log", responses={403: {}})
async def audit_log(
    principal: AdminDep,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    before: EventTime | None = None,
    cursor: CursorQuery = None,
) -> dict[str, Any]:
    """The tenant's audit entries, newest first (append-only: nothing here can be edited);
    `before` filters by time, `cursor` pages."""
    after_at, after_id = None, None
    if cursor is not None:
        # Keyset on (time, id): entries of one transaction share their time, and paging by
        # time alone skipped those past a page's end.
        at, audit_id = decode_cursor(cursor, 2)
        after_at, after_id = cursor_time(at), _cursor_int(audit_id)
    rows = await services.pool.fetch(
        "SELECT audit_id, actor, action, target, details::text AS details, occurred_at"
        " FROM audit_log WHERE tenant_id = $1 AND ($2::timestamptz IS NULL OR occurred_at < $2)"
        " AND ($3::timestamptz IS NULL OR (occurred_at, audit_id) < ($3, $4::bigint))"
        " ORDER BY occurred_at DESC, audit_id DESC LIMIT $5",
        principal.tenant_id, before, after_at, after_id, limit,
    )  # fmt: skip
    entries = [{**dict(r), "details": json.loads(r["details"])} for r in rows]
    next_cursor, next_before = None, None
    if len(entries) == limit:
        last = entries[-1]
        next_cursor = encode_cursor(last["occurred_at"].isoformat(), str(last["audit_id"]))
        next_before = last["occurred_at"].isoformat()
    # next_before: kept for clients written before the cursor (it skips entries of one instant).
    return {"entries": entries, "next_cursor": next_cursor, "next_before": next_before}


def _cursor_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise ApiError(400, "cursor: not a cursor returned by this API") from exc
    if not 0 <= value < 2**63:
        raise ApiError(400, "cursor: not a cursor returned by this API")
    return value


class TenantSettingsBody(RequestBody):
    """The tenant's own policy; null restores the platform's setting."""

    model_config = ConfigDict(extra="forbid")
    time_zone: str = "UTC"
    leak_threshold_s: int | None = Field(None, gt=0, le=7 * 86_400)
    qualification_budget_threshold: float | None = Field(None, gt=0)
    qualification_escalation_days: int | None = Field(None, ge=0, le=3650)

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        if known_zone(value) is None:
            raise ValueError(f"unknown time zone {value!r} (an IANA name like Asia/Kolkata)")
        return value


_SETTINGS_COLUMNS = (
    "time_zone, leak_threshold_s, qualification_budget_threshold::float8"
    " AS qualification_budget_threshold, qualification_escalation_days"
)


@router.get("/api/tenant/settings", response_model=TenantSettingsBody)
async def tenant_settings(principal: PrincipalDep, services: ServicesDep) -> TenantSettingsBody:
    row = await services.pool.fetchrow(
        f"SELECT {_SETTINGS_COLUMNS} FROM tenants WHERE tenant_id = $1", principal.tenant_id
    )
    assert row is not None  # the key's tenant exists
    return TenantSettingsBody(**dict(row))


@router.put("/api/tenant/settings", response_model=TenantSettingsBody, responses={403: {}})
async def change_tenant_settings(
    body: TenantSettingsBody, principal: AdminDep, services: ServicesDep
) -> TenantSettingsBody:
    """Workers pick the change up within TENANT_SETTINGS_TTL_S (a minute by default: they
    cache tenant settings)."""
    async with services.pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "UPDATE tenants SET time_zone = $2, leak_threshold_s = $3,"
            " qualification_budget_threshold = $4, qualification_escalation_days = $5"
            " WHERE tenant_id = $1",
            principal.tenant_id, body.time_zone, body.leak_threshold_s,
            body.qualification_budget_threshold, body.qualification_escalation_days,
        )  # fmt: skip
        await audit.record(conn, tenant_id=principal.tenant_id, actor=f"key:{principal.key_id}",
                           action="tenant.settings_changed", target=principal.tenant_id,
                           details=body.model_dump())  # fmt: skip
    return body
