"""Registering Meta channels (WhatsApp numbers, Instagram accounts, Facebook pages)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

import asyncpg
from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from api.deps import AdminDep, PrincipalDep, ServicesDep
from api.errors import ApiError
from api.models import RequestBody
from api.tenants import Principal
from connectors.channels import ChannelTaken, register_channel
from flexoraa import audit

router = APIRouter(tags=["channels"])

_SECRET = Field(min_length=1, max_length=1024)


class WhatsAppChannelRequest(RequestBody):
    model_config = ConfigDict(extra="forbid")

    phone_number_id: str = Field(min_length=1, max_length=64, pattern=r"^[0-9]+$")
    waba_id: str | None = Field(None, max_length=64)
    display_phone_number: str | None = Field(None, max_length=32)
    app_secret: str = _SECRET
    verify_token: str = _SECRET
    access_token: str = _SECRET


class MetaPageChannelRequest(RequestBody):
    """An Instagram professional account or a Facebook page (the webhook's `entry[].id`)."""

    model_config = ConfigDict(extra="forbid")

    page_id: str = Field(min_length=1, max_length=64, pattern=r"^[0-9]+$")
    app_secret: str = _SECRET
    verify_token: str = _SECRET
    access_token: str = _SECRET


class ChannelView(BaseModel):
    channel_id: str
    kind: Literal["whatsapp", "instagram", "facebook"]
    external_id: str
    waba_id: str | None
    display_phone_number: str | None
    created_at: datetime


async def _register(
    services: ServicesDep,
    principal: Principal,
    kind: str,
    external_id: str,
    body: WhatsAppChannelRequest | MetaPageChannelRequest,
) -> JSONResponse:
    whatsapp = body if isinstance(body, WhatsAppChannelRequest) else None
    try:
        async with services.pool.acquire() as conn, conn.transaction():
            channel_id, created = await register_channel(
                conn,
                services.secret_box,
                tenant_id=principal.tenant_id,
                kind=kind,
                external_id=external_id,
                app_secret=body.app_secret,
                verify_token=body.verify_token,
                access_token=body.access_token,
                waba_id=whatsapp.waba_id if whatsapp else None,
                display_phone_number=whatsapp.display_phone_number if whatsapp else None,
            )
            await audit.record(
                conn, tenant_id=principal.tenant_id, actor=f"key:{principal.key_id}",
                action="channel.registered" if created else "channel.updated",
                target=channel_id, details={"kind": kind, "external_id": external_id},
            )  # fmt: skip
    except ChannelTaken as exc:
        raise ApiError(409, str(exc)) from exc
    except asyncpg.UniqueViolationError as exc:
        # Registered by a request at the same moment (UNIQUE (kind, external_id)); a retry
        # finds it and answers as above.
        raise ApiError(409, f"{kind} {external_id} is being registered by another request") from exc
    services.channels.invalidate()
    return JSONResponse(
        {"channel_id": channel_id, "kind": kind, "external_id": external_id},
        status_code=201 if created else 200,
    )


@router.post("/api/channels/whatsapp", status_code=201, responses={200: {}, 409: {}})
async def register_whatsapp(
    body: WhatsAppChannelRequest, principal: AdminDep, services: ServicesDep
) -> JSONResponse:
    """Register a WhatsApp business number; secrets are stored encrypted, never returned."""
    return await _register(services, principal, "whatsapp", body.phone_number_id, body)


@router.post("/api/channels/instagram", status_code=201, responses={200: {}, 409: {}})
async def register_instagram(
    body: MetaPageChannelRequest, principal: AdminDep, services: ServicesDep
) -> JSONResponse:
    return await _register(services, principal, "instagram", body.page_id, body)


@router.post("/api/channels/facebook", status_code=201, responses={200: {}, 409: {}})
async def register_facebook(
    body: MetaPageChannelRequest, principal: AdminDep, services: ServicesDep
) -> JSONResponse:
    return await _register(services, principal, "facebook", body.page_id, body)


@router.get("/api/channels", response_model=list[ChannelView])
async def list_channels(principal: PrincipalDep, services: ServicesDep) -> list[ChannelView]:
    """The tenant's channels, without any secret."""
    rows = await services.pool.fetch(
        """SELECT channel_id, kind, external_id, waba_id, display_phone_number, created_at
           FROM channels WHERE tenant_id = $1 ORDER BY created_at""",
        principal.tenant_id,
    )
    return [ChannelView(**{**dict(row), "channel_id": str(row["channel_id"])}) for row in rows]


class SessionStats(BaseModel):
    open_windows: int
    expiring_within_hour: int
    expired_last_24h: int
    sends_since: datetime
    freeform_sends: int
    template_sends: int
    failed_sends: int
    failures_by_error_code: dict[str, int]


@router.get("/api/whatsapp/sessions/stats", response_model=SessionStats)
async def session_stats(
    principal: PrincipalDep,
    services: ServicesDep,
    hours: Annotated[int, Query(ge=1, le=24 * 90, description="send statistics window")] = 24,
) -> SessionStats:
    """The tenant's WhatsApp customer-service windows and sends."""
    now = datetime.now(UTC)
    day_ago, hour_left, two_days_ago = (
        now - timedelta(hours=24),
        now - timedelta(hours=23),
        now - timedelta(hours=48),
    )
    windows = await services.pool.fetchrow(
        """SELECT
             count(*) FILTER (WHERE last_activity_at > $2) AS open,
             count(*) FILTER (WHERE last_activity_at > $2 AND last_activity_at <= $3) AS expiring,
             count(*) FILTER (WHERE last_activity_at > $4 AND last_activity_at <= $2) AS expired
           FROM leads WHERE tenant_id = $1 AND channel = 'whatsapp'""",
        principal.tenant_id,
        day_ago,
        hour_left,
        two_days_ago,
    )
    since = now - timedelta(hours=hours)
    sends = await services.pool.fetch(
        """SELECT send_status, send_kind, error_code, count(*) AS n
           FROM messages
           WHERE tenant_id = $1 AND direction = 'outbound' AND channel = 'whatsapp'
             AND occurred_at > $2
           GROUP BY send_status, send_kind, error_code""",
        principal.tenant_id,
        since,
    )
    accepted = [row for row in sends if row["send_status"] == "accepted"]
    failed = [row for row in sends if row["send_status"] == "failed"]
    failures: dict[str, int] = {}
    for row in failed:
        code = row["error_code"] or "unknown"
        failures[code] = failures.get(code, 0) + row["n"]
    assert windows is not None
    return SessionStats(
        open_windows=windows["open"],
        expiring_within_hour=windows["expiring"],
        expired_last_24h=windows["expired"],
        sends_since=since,
        freeform_sends=sum(r["n"] for r in accepted if r["send_kind"] == "freeform"),
        template_sends=sum(r["n"] for r in accepted if r["send_kind"] == "template"),
        failed_sends=sum(r["n"] for r in failed),
        failures_by_error_code=failures,
    )
