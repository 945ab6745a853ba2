"""The tenant's in-app notifications (alerts for admins and SDRs)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel

from api.deps import PrincipalDep, ServicesDep
from api.errors import ApiError

router = APIRouter(tags=["notifications"])


class NotificationView(BaseModel):
    notification_id: str
    recipient: str
    category: str
    title: str
    body: str
    data: dict[str, Any]
    created_at: datetime
    read_at: datetime | None


_COLUMNS = "notification_id, recipient, kind, title, body, data, created_at, read_at"


def _view(row: Any) -> NotificationView:
    return NotificationView(
        notification_id=str(row["notification_id"]),
        recipient=row["recipient"],
        category=row["kind"],
        title=row["title"],
        body=row["body"],
        data=row["data"],
        created_at=row["created_at"],
        read_at=row["read_at"],
    )


@router.get("/api/notifications", response_model=list[NotificationView])
async def list_notifications(
    principal: PrincipalDep,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    unread: Annotated[bool, Query(description="only unread ones")] = False,
) -> list[NotificationView]:
    """Newest first."""
    rows = await services.pool.fetch(
        f"""SELECT {_COLUMNS} FROM notifications
            WHERE tenant_id = $1 AND (NOT $2 OR read_at IS NULL)
            ORDER BY created_at DESC LIMIT $3""",
        principal.tenant_id,
        unread,
        limit,
    )
    return [_view(row) for row in rows]


@router.post(
    "/api/notifications/{notification_id}/read",
    response_model=NotificationView,
    responses={404: {}},
)
async def mark_read(
    notification_id: str, principal: PrincipalDep, services: ServicesDep
) -> NotificationView:
    try:
        parsed = uuid.UUID(notification_id)
    except ValueError as exc:
        raise ApiError(404, "notification not found") from exc
    row = await services.pool.fetchrow(
        f"""UPDATE notifications SET read_at = coalesce(read_at, now())
            WHERE notification_id = $1 AND tenant_id = $2 RETURNING {_COLUMNS}""",
        parsed,
        principal.tenant_id,
    )
    if row is None:
        raise ApiError(404, "notification not found")
    return _view(row)
