"""Tenant administration: API keys and the audit log (admin keys only)."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response
from pydantic import AwareDatetime, BaseModel, ConfigDict

from api.deps import PrincipalDep, ServicesDep
from api.errors import ApiError
from api.tenants import Principal, create_api_key
from flexoraa import audit

router = APIRouter(tags=["admin"])


def _require_admin(principal: Principal) -> None:
    if principal.role != "admin":
        raise ApiError(403, "this needs an admin API key")


class KeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["admin", "sdr", "connector"] = "sdr"


@router.post("/api/keys", status_code=201, responses={403: {}})
async def create_key(
    body: KeyRequest, principal: PrincipalDep, services: ServicesDep
) -> dict[str, Any]:
    """A new API key, shown once (stored only as a hash)."""
    _require_admin(principal)
    async with services.pool.acquire() as conn, conn.transaction():
        key_id, api_key = await create_api_key(
            conn, principal.tenant_id, body.role, actor=f"key:{principal.key_id}"
        )
    return {"key_id": key_id, "api_key": api_key, "role": body.role}


@router.get("/api/keys", responses={403: {}})
async def list_keys(principal: PrincipalDep, services: ServicesDep) -> list[dict[str, Any]]:
    _require_admin(principal)
    rows = await services.pool.fetch(
        "SELECT key_id::text, key_prefix, role, created_at, revoked_at FROM api_keys"
        " WHERE tenant_id = $1 ORDER BY created_at",
        principal.tenant_id,
    )
    return [dict(r) for r in rows]


@router.delete("/api/keys/{key_id}", status_code=204, responses={403: {}, 404: {}})
async def revoke_key(key_id: str, principal: PrincipalDep, services: ServicesDep) -> Response:
    _require_admin(principal)
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
    services.principals.forget_key(key_id)
    return Response(status_code=204)


@router.get("/api/audit-log", responses={403: {}})
async def audit_log(
    principal: PrincipalDep,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    before: AwareDatetime | None = None,
) -> dict[str, Any]:
    """The tenant's audit entries, newest first (append-only: nothing here can be edited)."""
    _require_admin(principal)
    rows = await services.pool.fetch(
        "SELECT audit_id, actor, action, target, details::text AS details, occurred_at"
        " FROM audit_log WHERE tenant_id = $1 AND ($2::timestamptz IS NULL OR occurred_at < $2)"
        " ORDER BY occurred_at DESC, audit_id DESC LIMIT $3",
        principal.tenant_id, before, limit,
    )  # fmt: skip
    entries = [{**dict(r), "details": json.loads(r["details"])} for r in rows]
    last: datetime | None = entries[-1]["occurred_at"] if len(entries) == limit else None
    return {"entries": entries, "next_before": last.isoformat() if last else None}
