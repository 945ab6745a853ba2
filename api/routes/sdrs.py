"""The tenant's SDR roster, which qualification routes leads to (round robin)."""

from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, EmailStr, Field

from api.deps import AdminDep, PrincipalDep, ServicesDep
from api.errors import ApiError
from api.models import RequestBody

router = APIRouter(tags=["sdrs"])


class SdrRequest(RequestBody):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    email: EmailStr
    active: bool = True
    max_open_leads: int = Field(50, ge=0, le=100_000)


class SdrView(BaseModel):
    sdr_id: str
    name: str
    email: str
    active: bool
    max_open_leads: int
    open_leads: int
    last_assigned_at: datetime | None


_COLUMNS = "sdr_id, name, email, active, max_open_leads, open_leads, last_assigned_at"


def _view(row: asyncpg.Record) -> SdrView:
    return SdrView(**{**dict(row), "sdr_id": str(row["sdr_id"])})


@router.post("/api/sdrs", status_code=201, response_model=SdrView, responses={409: {}})
async def add_sdr(body: SdrRequest, principal: AdminDep, services: ServicesDep) -> SdrView:
    row = await _write(
        services,
        f"""INSERT INTO sdrs (sdr_id, tenant_id, name, email, active, max_open_leads)
            VALUES ($1, $2, $3, $4, $5, $6) RETURNING {_COLUMNS}""",
        uuid.uuid4(),
        principal.tenant_id,
        body,
    )
    assert row is not None
    return _view(row)


async def _write(
    services: ServicesDep, sql: str, sdr_id: uuid.UUID, tenant_id: str, body: SdrRequest
) -> asyncpg.Record | None:
    """An SDR row written from `body`; another SDR of the tenant with its email is a 409."""
    try:
        row: asyncpg.Record | None = await services.pool.fetchrow(
            sql, sdr_id, tenant_id, body.name, str(body.email).lower(), body.active,
            body.max_open_leads,
        )  # fmt: skip
    except asyncpg.UniqueViolationError as exc:
        raise ApiError(409, f"another SDR has the email {body.email}") from exc
    return row


@router.get("/api/sdrs", response_model=list[SdrView])
async def list_sdrs(principal: PrincipalDep, services: ServicesDep) -> list[SdrView]:
    rows = await services.pool.fetch(
        f"SELECT {_COLUMNS} FROM sdrs WHERE tenant_id = $1 ORDER BY created_at",
        principal.tenant_id,
    )
    return [_view(row) for row in rows]


@router.put("/api/sdrs/{sdr_id}", response_model=SdrView, responses={404: {}})
async def update_sdr(
    sdr_id: str, body: SdrRequest, principal: AdminDep, services: ServicesDep
) -> SdrView:
    try:
        parsed = uuid.UUID(sdr_id)
    except ValueError as exc:
        raise ApiError(404, "SDR not found") from exc
    row = await _write(
        services,
        f"""UPDATE sdrs SET name = $3, email = $4, active = $5, max_open_leads = $6
            WHERE sdr_id = $1 AND tenant_id = $2 RETURNING {_COLUMNS}""",
        parsed,
        principal.tenant_id,
        body,
    )
    if row is None:
        raise ApiError(404, "SDR not found")
    return _view(row)
